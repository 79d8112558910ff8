"""Pascal VOC 2007 / 2012 multi-label classification (20 classes) from the standard VOCdevkit layout.

``root`` is the ``VOCdevkit`` folder (holding ``VOC2007/``) or the ``VOC<year>`` folder itself::

    VOC2007/ImageSets/Main/<image set>.txt           image ids (optional; else the first class file)
    VOC2007/ImageSets/Main/<class>_<image set>.txt   "<image id> <1|0|-1>" per line
    VOC2007/JPEGImages/<image id>.jpg

Per-class entries are 1 (present), -1 (absent) and 0 ("difficult": only difficult instances of the
class). How a difficult entry becomes a target is configurable, separately for the training split
(``difficult``) and the evaluation splits (``eval_difficult``):

* "positive" -> 1: the KMCL reference trains with ``target >= 0``, i.e. difficult = positive;
* "negative" -> 0;
* "unknown" -> -1: dropped by mAP, as in the VOC devkit / ML-GCN evaluation (the default for
  val/test, which reproduces the reference evaluation).

Image sets per split (``split_map``): VOC2007 train = trainval, val = test = test (the reference
protocol); VOC2012 (no public test labels) train = train, val = test = val. ``val_from_train``
carves a seeded held-out val subset out of the training image set instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mlcl.data.datasets.images import ImageListSource, check_split, holdout_split, require_path

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
DIFFICULT_POLICIES = {"positive": 1, "negative": 0, "unknown": -1}
DEFAULT_SPLIT_MAP = {
    2007: {"train": "trainval", "val": "test", "test": "test"},
    2012: {"train": "train", "val": "val", "test": "val"},
}


def _year_dir(root: str, year: int) -> Path:
    base = require_path(root, "data.root", "VOC root", is_dir=True)
    for cand in (base / f"VOC{year}", base / "VOCdevkit" / f"VOC{year}", base):
        if (cand / "ImageSets" / "Main").is_dir():
            return cand
    raise FileNotFoundError(
        f"no VOC{year}/ImageSets/Main under {str(base)!r}; set data.root to the VOCdevkit folder"
    )


def read_image_set(main_dir: Path, image_set: str, class_names: tuple[str, ...] = VOC_CLASSES) -> tuple:
    """(image ids, raw labels [N, C] int8 in {1, 0, -1}) of ``ImageSets/Main`` for one image set."""
    ids: list[str] | None = None
    list_file = main_dir / f"{image_set}.txt"
    if list_file.is_file():
        ids = [ln.split()[0] for ln in list_file.read_text().splitlines() if ln.strip()]
    per_class: list[dict[str, int]] = []
    for name in class_names:
        path = require_path(
            main_dir / f"{name}_{image_set}.txt",
            "data.root (or data.source.split_map)",
            f"VOC labels of class {name!r}, image set {image_set!r}",
        )
        entries: dict[str, int] = {}
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
                raise ValueError(f"{path}:{lineno}: expected '<image id> <1|0|-1>', got {line!r}")
            entries[parts[0]] = int(parts[1])
        per_class.append(entries)
        if ids is None:
            ids = list(entries)
    assert ids is not None
    labels = np.empty((len(ids), len(class_names)), dtype=np.int8)
    for c, entries in enumerate(per_class):
        try:
            labels[:, c] = [entries[i] for i in ids]
        except KeyError as err:
            raise ValueError(
                f"{main_dir / f'{class_names[c]}_{image_set}.txt'}: image {err.args[0]!r} of image set "
                f"{image_set!r} is not listed"
            ) from None
    return ids, labels


class VOCSource(ImageListSource):
    """One split of Pascal VOC (see the module docstring for layout, difficult entries and splits).

    Args:
        split: "train", "val" or "test".
        root: VOCdevkit folder (or the VOC<year> folder).
        year: 2007 or 2012.
        difficult: difficult entries of the training split: "positive", "negative" or "unknown".
        eval_difficult: the same for val/test.
        split_map: image set per split (default per year, see the module docstring).
        val_from_train: 0, or the fraction / count of the training image set held out as val.
        split_seed: seed of that held-out draw.
        on_bad_image, check_files: see :class:`ImageListSource`.
    """

    def __init__(
        self,
        split: str,
        *,
        root: str,
        year: int = 2007,
        difficult: str = "positive",
        eval_difficult: str = "unknown",
        split_map: dict[str, str] | None = None,
        val_from_train: float = 0.0,
        split_seed: int = 0,
        on_bad_image: str = "raise",
        check_files: str = "none",
    ) -> None:
        check_split(split)
        year = int(year)
        for key, value in (("difficult", difficult), ("eval_difficult", eval_difficult)):
            if value not in DIFFICULT_POLICIES:
                raise ValueError(
                    f"data.source.{key} must be one of {tuple(DIFFICULT_POLICIES)}, got {value!r}"
                )
        smap = {**DEFAULT_SPLIT_MAP.get(year, DEFAULT_SPLIT_MAP[2012]), **(split_map or {})}
        from_train = split == "train" or (split == "val" and bool(val_from_train))
        image_set = smap["train" if from_train else split]
        year_dir = _year_dir(root, year)
        ids, raw = read_image_set(year_dir / "ImageSets" / "Main", image_set)
        rows = np.arange(len(ids))
        if from_train and val_from_train:
            kept, held = holdout_split(len(ids), val_from_train, split_seed)
            rows = kept if split == "train" else held
        policy = difficult if split == "train" else eval_difficult
        targets = torch.from_numpy(raw[rows].astype(np.int64))
        # raw -1 = absent -> 0; raw 0 = difficult -> policy value
        targets = torch.where(targets == 0, DIFFICULT_POLICIES[policy], targets.clamp_min(0))
        self.split, self.year, self.image_set, self.difficult = split, year, image_set, policy
        names = [f"{ids[r]}.jpg" for r in rows]
        super().__init__(
            [os.path.join(year_dir, "JPEGImages", n) for n in names],
            targets,
            VOC_CLASSES,
            file_names=names,
            on_bad_image=on_bad_image,
            check_files=check_files,
        )
        #: raw VOC entries of the kept rows ({1, 0 = difficult, -1}), e.g. for a difficult-aware metric
        self.raw_labels = torch.from_numpy(raw[rows].astype(np.int64))[torch.from_numpy(self.kept_rows)]
