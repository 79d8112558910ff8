"""MS-COCO 2014 / 2017 multi-label classification (80 classes) from the official instance annotations.

Expected layout (nothing is downloaded)::

    <root>/annotations/instances_train2014.json   <root>/train2014/<file_name>
    <root>/annotations/instances_val2014.json     <root>/val2014/<file_name>

(2017 likewise). An image's label vector is 1 for every category with at least one instance
annotation (crowd regions included, all object sizes: the union of the references' per-size
targets). Class index = rank of the COCO category id among the sorted ids, the mapping of the
reference loaders and of the reference observed-label files; ``class_names`` are the category names
in that order. Rows are ordered by image id.

Splits (the reference protocol evaluates on val20xx and, lacking a test set, selects on it too):

* default: ``train`` = train20xx, ``val`` = ``test`` = val20xx;
* ``val_from_train=f`` (a fraction in (0, 1) or an image count): ``val`` is a held-out subset of
  train20xx drawn with ``split_seed``, ``train`` the rest of train20xx, ``test`` = val20xx, so model
  selection never sees the test images.

Images without any annotation (702 of train2014, 367 of val2014) are left out by default, as in
every reference loader (ASL/KMCL ``imgToAnns``, ML-GCN and CLML annotation files: 82,081 / 40,137
images), which keeps ``missing=file`` compatible with the reference observed-label files;
``include_unannotated=true`` keeps them with all-zero labels.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mlcl.data.datasets.images import ImageListSource, check_split, holdout_split, require_path
from mlcl.errors import DataError

YEARS = (2014, 2017)


@lru_cache(maxsize=4)
def _read_instances(ann_file: str, mtime_ns: int, include_unannotated: bool) -> tuple:
    """(file names, image ids, targets [N, 80] int8, class names) of one instances json, cached so the
    ``val`` and ``test`` splits do not parse the same file twice."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            coco = COCO(ann_file)
        cat_ids = sorted(coco.getCatIds())
    except json.JSONDecodeError as err:
        raise DataError(f"malformed COCO annotation JSON: {err.msg}", ann_file, line=err.lineno) from err
    except (KeyError, TypeError, AttributeError) as err:  # valid JSON, not the instances layout
        raise DataError(
            f"not a COCO instances file (no {err} entry where expected)",
            ann_file,
            "use the official annotations/instances_<split><year>.json",
        ) from err
    col = {cid: k for k, cid in enumerate(cat_ids)}
    class_names = [coco.loadCats(cid)[0]["name"] for cid in cat_ids]
    img_ids = sorted(coco.getImgIds())
    if not include_unannotated:
        img_ids = [i for i in img_ids if coco.imgToAnns.get(i)]
    row = {iid: r for r, iid in enumerate(img_ids)}
    targets = np.zeros((len(img_ids), len(cat_ids)), dtype=np.int8)
    for ann in coco.dataset.get("annotations", []):
        r = row.get(ann["image_id"])
        if r is not None:
            targets[r, col[ann["category_id"]]] = 1
    file_names = [coco.imgs[i]["file_name"] for i in img_ids]
    return file_names, np.asarray(img_ids, dtype=np.int64), targets, class_names


class COCOSource(ImageListSource):
    """One split of MS-COCO (see the module docstring for layout, classes and split rules).

    Args:
        split: "train", "val" or "test".
        root: directory holding ``annotations/`` and the image folders.
        year: 2014 or 2017.
        val_from_train: 0 (val = val20xx) or the fraction / count of train20xx held out as val.
        split_seed: seed of that held-out draw.
        include_unannotated: keep images without annotations (all-zero labels).
        annotations_dir: override of ``<root>/annotations``.
        image_dirs: override of the image folders, ``{"train": ..., "val": ...}``.
        on_bad_image, check_files: see :class:`ImageListSource`.
    """

    def __init__(
        self,
        split: str,
        *,
        root: str,
        year: int = 2014,
        val_from_train: float = 0.0,
        split_seed: int = 0,
        include_unannotated: bool = False,
        annotations_dir: str | None = None,
        image_dirs: dict[str, str] | None = None,
        on_bad_image: str = "raise",
        check_files: str = "none",
    ) -> None:
        check_split(split)
        year = int(year)
        if year not in YEARS:
            raise ValueError(f"data.source.year must be one of {YEARS}, got {year}")
        root_p = require_path(root, "data.root", "COCO root", is_dir=True)
        part = "train" if split == "train" or (split == "val" and val_from_train) else "val"
        ann_dir = Path(annotations_dir) if annotations_dir else root_p / "annotations"
        ann_key = "data.source.annotations_dir" if annotations_dir else "data.root"
        ann_file = require_path(
            ann_dir / f"instances_{part}{year}.json", ann_key, f"COCO {part}{year} annotations"
        )
        dirs = dict(image_dirs or {})
        img_dir = Path(dirs[part]) if part in dirs else root_p / f"{part}{year}"
        if not img_dir.is_dir():
            key = f"data.source.image_dirs.{part}" if part in dirs else "data.root"
            raise FileNotFoundError(f"COCO image folder {str(img_dir)!r} not found; set {key}")

        names, ids, targets, class_names = _read_instances(
            str(ann_file), os.stat(ann_file).st_mtime_ns, bool(include_unannotated)
        )
        rows = np.arange(len(names))
        if part == "train" and val_from_train:
            kept, held = holdout_split(len(names), val_from_train, split_seed)
            rows = kept if split == "train" else held
        self.split, self.year = split, year
        super().__init__(
            [os.path.join(img_dir, names[r]) for r in rows],
            torch.from_numpy(targets[rows].astype(np.int64)),
            class_names,
            file_names=[names[r] for r in rows],
            on_bad_image=on_bad_image,
            check_files=check_files,
        )
        self.image_ids = ids[rows][self.kept_rows]
