"""NUS-WIDE (81 concepts) from reference-format label lists plus an image folder.

A label list has one image per line, ``<file_name>,<space-separated 0-based class indices>`` with
an optional space after the comma (the format of CLML's ``nus_train_full.txt`` / ``nus_val.txt``,
clml.md §9.1); the listed classes are the image's positives and every other class is 0. A
malformed token (the reference NUS train files contain ``2.`` on line 118,776) raises an error
naming the file and line: fix the file rather than guess. Images are read from
``<root>/<file_name>``; NUS-WIDE images lost from Flickr are common, see ``check_files`` and
``on_bad_image``.

Splits: ``train`` = ``train_list``; ``test`` = ``test_list``; ``val`` = ``val_list`` if given, else a
seeded held-out part of ``train_list`` if ``val_from_train`` is set, else ``test_list`` (the
reference protocol, which has no separate validation list).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from mlcl.data.datasets.images import ImageListSource, check_split, holdout_split, require_path
from mlcl.data.missing import read_observed_file

NUM_CLASSES = 81


@lru_cache(maxsize=4)
def _read_list(path: str, mtime_ns: int, num_classes: int) -> tuple[list[str], np.ndarray]:
    """(file names in file order, multi-hot targets [N, C] int8) of one label list."""
    labels = read_observed_file(path, num_classes=num_classes)
    names = list(labels)
    targets = np.zeros((len(names), num_classes), dtype=np.int8)
    rows = [r for r, n in enumerate(names) for _ in labels[n]]
    cols = [c for n in names for c in labels[n]]
    targets[rows, cols] = 1
    return names, targets


def read_class_names(path: str, num_classes: int) -> list[str]:
    """One class name per non-blank line (e.g. NUS-WIDE's Concepts81.txt), exactly ``num_classes``."""
    p = require_path(path, "data.source.class_names_file", "NUS-WIDE class names")
    names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(names) != num_classes:
        raise ValueError(f"{p}: {len(names)} class names for {num_classes} classes")
    return names


class NUSWideSource(ImageListSource):
    """One split of NUS-WIDE (see the module docstring for the list format and the split rules).

    Args:
        split: "train", "val" or "test".
        root: image folder; image paths are ``<root>/<file_name>``.
        train_list, test_list: label lists of the training and test images.
        val_list: label list of the validation images (optional).
        val_from_train: without ``val_list``: 0 (val = test list) or the fraction / count of the
            training list held out as val.
        split_seed: seed of that held-out draw.
        num_classes: 81 for NUS-WIDE.
        class_names_file: one concept name per line (default: "0".."80").
        on_bad_image, check_files: see :class:`ImageListSource`.
    """

    def __init__(
        self,
        split: str,
        *,
        root: str,
        train_list: str,
        test_list: str,
        val_list: str | None = None,
        val_from_train: float = 0.0,
        split_seed: int = 0,
        num_classes: int = NUM_CLASSES,
        class_names_file: str | None = None,
        on_bad_image: str = "raise",
        check_files: str = "none",
    ) -> None:
        check_split(split)
        root_p = require_path(root, "data.root", "NUS-WIDE image root", is_dir=True)
        holdout = split in ("train", "val") and val_list is None and bool(val_from_train)
        if split == "train" or (split == "val" and holdout):
            key, path = "train_list", train_list
        elif split == "val" and val_list is not None:
            key, path = "val_list", val_list
        else:
            key, path = "test_list", test_list
        list_file = require_path(path, f"data.source.{key}", f"NUS-WIDE {key}")
        names, targets = _read_list(str(list_file), os.stat(list_file).st_mtime_ns, int(num_classes))
        rows = np.arange(len(names))
        if holdout:
            kept, held = holdout_split(len(names), val_from_train, split_seed)
            rows = kept if split == "train" else held
        class_names = (
            read_class_names(class_names_file, int(num_classes))
            if class_names_file
            else [str(c) for c in range(int(num_classes))]
        )
        self.split, self.list_file = split, str(list_file)
        super().__init__(
            [os.path.join(root_p, names[r]) for r in rows],
            torch.from_numpy(targets[rows].astype(np.int64)),
            class_names,
            file_names=[names[r] for r in rows],
            on_bad_image=on_bad_image,
            check_files=check_files,
        )
