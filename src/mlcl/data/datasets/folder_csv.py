"""Any multi-label image dataset given as an image folder plus CSV annotations.

Image paths are ``<images_dir>/<value of file_column>``. Labels come in one of two forms
(``label_format``):

* "names": one column (``label_column``) of class names joined by ``label_sep`` (an empty cell =
  no label), e.g. ``dog|person``;
* "columns": one column per class holding 0/1 (or -1 = unknown with ``allow_unknown``); every
  column other than the file, split and ignored columns is a class, in CSV order;
* "auto" (default): "names" when ``label_column`` exists in the CSV, otherwise "columns".

``class_names`` may be given; otherwise they are the sorted distinct names over *all* rows of all
splits ("names"; numeric order when every name is an integer) or the class columns in CSV order
("columns"), so every split has the same class indices.

Splits, first match wins:

1. ``csv`` is a mapping ``{train: a.csv, val: b.csv, test: c.csv}``: one file per split;
2. ``csv`` is one file with a ``split_column`` whose values are train/val/test;
3. ``csv`` is one file without it: a seeded split by ``fractions`` (train, val, test).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mlcl.data.datasets.images import SPLITS, ImageListSource, check_split, fraction_split, require_path

LABEL_FORMATS = ("auto", "names", "columns")


def _read_csv(path: Path, key: str):
    import pandas as pd

    try:
        # strings everywhere: file names stay verbatim and label cells are parsed below
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot parse as CSV ({err}); check {key}") from err


@lru_cache(maxsize=4)
def _load_table(
    csv_items: tuple[tuple[str, str], ...],
    stamps: tuple[int, ...],
    file_column: str,
    label_format: str,
    label_column: str,
    label_sep: str,
    split_column: str,
    ignore_columns: tuple[str, ...],
    class_names: tuple[str, ...] | None,
    allow_unknown: bool,
    fractions: tuple[float, ...],
    seed: int,
) -> tuple[dict[str, tuple[list[str], np.ndarray]], list[str]]:
    """``({split: (file names, targets [n, C] int8)}, class names)`` for all three splits at once."""
    tables = {}  # (split or None) -> (frame, path, config key)
    for split, path in csv_items:
        key = "data.source.csv" if split == "" else f"data.source.csv.{split}"
        p = require_path(path, key, "annotation CSV")
        tables[split] = (_read_csv(p, key), p, key)

    for df, p, _ in tables.values():
        if file_column not in df.columns:
            raise ValueError(
                f"{p}: no file-name column {file_column!r} (columns: {list(df.columns)}); "
                "set data.source.file_column"
            )
    fmt = label_format
    if fmt == "auto":
        fmt = "names" if all(label_column in df.columns for df, _, _ in tables.values()) else "columns"

    skip = {file_column, split_column, *ignore_columns}
    if fmt == "names":
        for df, p, _ in tables.values():
            if label_column not in df.columns:
                raise ValueError(
                    f"{p}: no label column {label_column!r} (columns: {list(df.columns)}); "
                    "set data.source.label_column"
                )
        cells = {s: [[t.strip() for t in c.split(label_sep) if t.strip()] for c in df[label_column]]
                 for s, (df, _, _) in tables.items()}  # fmt: skip
        found = {t for v in cells.values() for c in v for t in c}
        # integer class ids sort numerically ("2" before "10"), names alphabetically
        order = (lambda t: (0, int(t), t)) if all(t.isdigit() for t in found) else (lambda t: (0, 0, t))
        names = list(class_names) if class_names else sorted(found, key=order)
        index = {n: k for k, n in enumerate(names)}
        labels = {}
        for s, rows in cells.items():
            y = np.zeros((len(rows), len(names)), dtype=np.int8)
            for r, row in enumerate(rows):
                for t in row:
                    if t not in index:
                        raise ValueError(
                            f"{tables[s][1]}: row {r + 2} has class {t!r}, which is not in "
                            f"data.source.class_names"
                        )
                    y[r, index[t]] = 1
            labels[s] = y
    else:
        col_sets = {s: [c for c in df.columns if c not in skip] for s, (df, _, _) in tables.items()}
        first = next(iter(col_sets.values()))
        for s, cols in col_sets.items():
            if cols != first:
                raise ValueError(
                    f"{tables[s][1]}: class columns {cols} differ from {first} of another split's CSV"
                )
        if not first:
            raise ValueError(f"{next(iter(tables.values()))[1]}: no class columns besides {sorted(skip)}")
        if class_names and list(class_names) != first:
            raise ValueError(
                f"data.source.class_names {list(class_names)} differ from the CSV class columns {first}"
            )
        names = first
        allowed = {"0", "1", "-1"} if allow_unknown else {"0", "1"}
        labels = {}
        for s, (df, p, _) in tables.items():
            vals = df[names].to_numpy(dtype=str)
            vals = np.char.strip(vals)
            vals = np.where(np.isin(vals, ["1.0", "0.0", "-1.0"]), np.char.replace(vals, ".0", ""), vals)
            bad = ~np.isin(vals, list(allowed))
            if bad.any():
                r, c = (int(v) for v in np.argwhere(bad)[0])
                raise ValueError(
                    f"{p}: class column {names[c]!r} row {r + 2} holds {str(vals[r, c])!r}; expected "
                    f"{'0/1/-1' if allow_unknown else '0/1 (set data.source.allow_unknown=true for -1)'}"
                )
            labels[s] = vals.astype(np.int8)

    out: dict[str, tuple[list[str], np.ndarray]] = {}
    if "" not in tables:  # one CSV per split
        for s in SPLITS:
            df = tables[s][0]
            out[s] = (df[file_column].tolist(), labels[s])
        return out, names
    df, p, _ = tables[""]
    files = df[file_column].tolist()
    y = labels[""]
    if split_column in df.columns:
        col = df[split_column].str.strip().to_numpy()
        bad = ~np.isin(col, list(SPLITS))
        if bad.any():
            raise ValueError(
                f"{p}: split column {split_column!r} holds {sorted(set(col[bad]))[:5]}; "
                f"expected {list(SPLITS)}"
            )
        parts = {s: np.flatnonzero(col == s) for s in SPLITS}
        empty = [s for s, idx in parts.items() if len(idx) == 0]
        if empty:
            raise ValueError(f"{p}: split column {split_column!r} has no rows for {empty}")
    else:
        parts = fraction_split(len(files), fractions, seed)
    for s, idx in parts.items():
        out[s] = ([files[i] for i in idx], y[idx])
    return out, names


class FolderCSVSource(ImageListSource):
    """One split of an image folder + CSV dataset (see the module docstring for the formats).

    Args:
        split: "train", "val" or "test".
        images_dir: folder the file names are relative to.
        csv: one CSV file, or a mapping ``{train, val, test}`` of one CSV file per split.
        file_column: column of image file names.
        label_format: "auto", "names" or "columns".
        label_column, label_sep: the joined-names column and its separator ("names").
        split_column: column with train/val/test (single CSV only; used when present).
        ignore_columns: extra non-class columns ("columns").
        class_names: explicit class order (default: inferred).
        allow_unknown: accept -1 (unknown) cells ("columns").
        fractions, seed: train/val/test split of a single CSV without a split column.
        on_bad_image, check_files: see :class:`ImageListSource`.
    """

    def __init__(
        self,
        split: str,
        *,
        images_dir: str,
        csv: str | Mapping[str, str],
        file_column: str = "file_name",
        label_format: str = "auto",
        label_column: str = "labels",
        label_sep: str = "|",
        split_column: str = "split",
        ignore_columns: Sequence[str] = (),
        class_names: Sequence[str] | None = None,
        allow_unknown: bool = False,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        on_bad_image: str = "raise",
        check_files: str = "none",
    ) -> None:
        check_split(split)
        if label_format not in LABEL_FORMATS:
            raise ValueError(f"data.source.label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
        img_dir = require_path(images_dir, "data.source.images_dir", "image folder", is_dir=True)
        if isinstance(csv, Mapping):
            missing = [s for s in SPLITS if s not in csv]
            if missing:
                raise ValueError(f"data.source.csv as a mapping needs train, val and test; missing {missing}")
            items = tuple((s, str(csv[s])) for s in SPLITS)
        else:
            items = (("", str(csv) if csv is not None else ""),)
        stamps = tuple(os.stat(p).st_mtime_ns if os.path.isfile(p) else -1 for _, p in items)
        parts, names = _load_table(
            items, stamps, file_column, label_format, label_column, label_sep, split_column,
            tuple(ignore_columns), tuple(class_names) if class_names else None, bool(allow_unknown),
            tuple(float(f) for f in fractions), int(seed),
        )  # fmt: skip
        files, y = parts[split]
        self.split = split
        super().__init__(
            [os.path.join(img_dir, f) for f in files],
            torch.from_numpy(y.astype(np.int64)),
            names,
            file_names=list(files),
            on_bad_image=on_bad_image,
            check_files=check_files,
        )
