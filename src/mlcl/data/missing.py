"""Missing-label simulation: hide observed positives as -1 (spec clml.md §9, §14.3).

Targets use ``1`` = observed positive, ``0`` = negative and ``-1`` = unobserved (a hidden positive,
kept as -1 for bookkeeping such as measuring label-correction recall). Whether a loss may see the
difference between 0 and -1 is the loss plugin's business (reference-faithful losses map -1 to 0).

Three sources of missing labels:

* :func:`drop_labels` hides positives at random ("uniform", "single_positive", "fixed_count");
  ``fixed_count`` with rate 0.5 / 0.8 reproduces the per-image counts of the reference COCO files
  ``coco_train_0.75left`` / ``coco_train_0.4left`` exactly;
* :func:`read_observed_file` / :func:`apply_observed_file` use a reference observed-label file
  (``<file_name>,<space-separated 0-based class indices>`` per line);
* :func:`apply_missing` is the single entry point of the datamodule (the ``missing`` config group:
  ``mode``, ``rate``, ``seed``, ``path``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DROP_MODES",
    "MODES",
    "apply_missing",
    "apply_observed_file",
    "drop_labels",
    "label_stats",
    "read_observed_file",
]

#: modes of :func:`drop_labels`
DROP_MODES = ("uniform", "single_positive", "fixed_count")
#: modes of :func:`apply_missing`
MODES = ("none", *DROP_MODES, "file")


def _as_label_matrix(targets: Tensor) -> Tensor:
    """Targets (int, bool or float, values in {1, 0, -1}) as an int64 CPU copy; other values raise."""
    if targets.dim() != 2:
        raise ValueError(f"targets must be [N, C], got shape {tuple(targets.shape)}")
    t = targets.detach().cpu()
    if t.dtype != torch.bool:
        bad = (t != 1) & (t != 0) & (t != -1)
        if bool(bad.any()):
            i, c = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"targets must be in {{1, 0, -1}}; found {t[i, c].item()!r} at [{i}, {c}]")
    return t.to(torch.long)  # .to() after .cpu() may alias: callers copy before writing


def drop_labels(targets: Tensor, rate: float, mode: str, seed: int) -> Tensor:
    """Hide positives of ``targets`` [N, C]: int64 [N, C] with 1 kept, 0 negative, -1 hidden/unknown.

    One float64 draw ``u = torch.rand((N, C))`` from ``torch.Generator().manual_seed(seed)`` on CPU;
    within a row the positives are ranked by ascending u (stable; rank 0 = smallest u).

    * ``uniform``: keep a positive iff u < 1 - rate or it has rank 0 (each row keeps >= 1 positive);
    * ``single_positive``: keep only the rank-0 positive (``rate`` ignored);
    * ``fixed_count``: keep the k lowest-ranked positives, k = min(n, floor(n (1 - rate) + 1e-9) + 1).

    Pre-existing -1 entries pass through and do not count as positives; rows without positives and
    negatives never change. The result lives on ``targets``' device; the input is not modified.
    """
    if mode not in DROP_MODES:
        raise ValueError(f"unknown drop mode {mode!r}; expected one of {DROP_MODES}")
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    t = _as_label_matrix(targets)
    n_rows, n_cls = t.shape
    pos = t == 1
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand((n_rows, n_cls), generator=g, dtype=torch.float64)

    # non-positives get key 2 > any u, so they rank after every positive of their row
    order = torch.argsort(torch.where(pos, u, torch.full_like(u, 2.0)), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_cls).expand(n_rows, n_cls).contiguous())

    if mode == "uniform":
        keep = (u < 1.0 - float(rate)) | (rank == 0)
    elif mode == "single_positive":
        keep = rank == 0
    else:
        n = pos.sum(1).to(torch.float64)
        # the 1e-9 guard: 1 - 0.8 is 0.19999... in binary, which would floor 5 * 0.2 to 0
        k = torch.minimum(n, torch.floor(n * (1.0 - float(rate)) + 1e-9) + 1.0).to(torch.long)
        keep = rank < k.unsqueeze(1)
    out = t.clone()
    out[pos & ~keep] = -1
    return out.to(targets.device)


def read_observed_file(path: str | os.PathLike[str], num_classes: int | None = None) -> dict[str, list[int]]:
    """Read a reference observed-label file: ``{file_name: [class indices]}`` in file order.

    Each non-blank line is ``<file_name>,<0-based class indices separated by spaces>``, optionally with
    a space after the comma; an empty index list is allowed. Malformed lines (e.g. the token ``2.`` in
    the reference NUS files), indices >= ``num_classes`` and one name listed with two different label
    sets raise ``ValueError`` naming the file and line.
    """
    labels: dict[str, list[int]] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            name, sep, rest = line.rpartition(",")
            name = name.strip()
            if not sep or not name:
                raise ValueError(f"{path}:{lineno}: expected '<file_name>,<class indices>', got {line!r}")
            idx: list[int] = []
            for token in rest.split():
                if not (token.isascii() and token.isdigit()):
                    raise ValueError(
                        f"{path}:{lineno}: malformed class index {token!r} for {name!r} "
                        "(expected non-negative integers separated by spaces)"
                    )
                value = int(token)
                if num_classes is not None and value >= num_classes:
                    raise ValueError(
                        f"{path}:{lineno}: class index {value} of {name!r} is out of range "
                        f"for {num_classes} classes"
                    )
                idx.append(value)
            if name in labels:
                if sorted(set(labels[name])) != sorted(set(idx)):
                    raise ValueError(
                        f"{path}:{lineno}: {name!r} is listed again with different labels "
                        f"(first at line {first_line[name]})"
                    )
                continue
            labels[name] = idx
            first_line[name] = lineno
    return labels


def apply_observed_file(
    targets: Tensor, file_names: Sequence[str], path: str | os.PathLike[str], *, strict: bool = True
) -> Tensor:
    """Observe exactly the positives listed in ``path``: int64 [N, C], other positives become -1.

    ``targets`` [N, C] are the full labels of the images ``file_names`` (length N, same order). Every
    image must appear in the file (the file may list more). With ``strict`` a listed index that is not
    a positive of ``targets`` (a class-mapping mismatch) raises; without it, the file wins and the entry
    becomes 1. Negatives and pre-existing -1 entries are otherwise unchanged.
    """
    t = _as_label_matrix(targets)
    n_rows, n_cls = t.shape
    if len(file_names) != n_rows:
        raise ValueError(f"{len(file_names)} file names for {n_rows} target rows")
    observed = read_observed_file(path, num_classes=n_cls)
    missing = [name for name in file_names if name not in observed]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} of {n_rows} images are not listed, e.g. {missing[:3]} "
            f"(the file lists names like {list(observed)[:2]})"
        )
    listed = torch.zeros((n_rows, n_cls), dtype=torch.bool)
    rows = [i for i, name in enumerate(file_names) for _ in observed[name]]
    cols = [c for name in file_names for c in observed[name]]
    listed[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = True
    pos = t == 1
    extra = listed & ~pos
    if strict and bool(extra.any()):
        i, c = (int(v) for v in extra.nonzero()[0])
        raise ValueError(
            f"{path}: {int(extra.sum())} listed labels are not positives of the full targets, e.g. class {c} "
            f"of {file_names[i]!r} (class index mapping mismatch?); pass strict=False to trust the file"
        )
    out = t.clone()
    out[pos & ~listed] = -1
    out[listed] = 1
    return out.to(targets.device)


def apply_missing(
    targets: Tensor,
    mode: str,
    rate: float,
    seed: int,
    path: str | None = None,
    file_names: list[str] | None = None,
) -> Tensor:
    """Entry point of the ``missing`` config group: int64 [N, C] observed targets (1 / 0 / -1).

    ``mode``: "none" (a copy of the targets), one of :data:`DROP_MODES` (:func:`drop_labels` with
    ``rate`` and ``seed``) or "file" (:func:`apply_observed_file` with ``path`` and ``file_names``).
    """
    if mode == "none":
        return _as_label_matrix(targets).clone().to(targets.device)
    if mode in DROP_MODES:
        return drop_labels(targets, rate, mode, seed)
    if mode == "file":
        if path is None or file_names is None:
            raise ValueError("missing mode 'file' needs both path and the dataset's file_names")
        return apply_observed_file(targets, file_names, path)
    raise ValueError(f"unknown missing-label mode {mode!r}; expected one of {MODES}")


def label_stats(original: Tensor, observed: Tensor) -> dict[str, float]:
    """Summary of hiding for logging: counts of positives in ``original`` [N, C] kept/hidden in ``observed``.

    Keys: positives, kept, hidden (original positives that are not 1 in ``observed``), kept_fraction
    (kept / positives; 1.0 without positives), positives_per_row and kept_per_row (means over rows),
    rows_without_kept (rows with a positive but none kept).
    """
    if original.shape != observed.shape:
        raise ValueError(f"shape mismatch: {tuple(original.shape)} vs {tuple(observed.shape)}")
    pos = original == 1
    kept = pos & (observed == 1)
    n_pos, n_kept = int(pos.sum()), int(kept.sum())
    n_rows = max(int(original.shape[0]), 1)
    return {
        "positives": n_pos,
        "kept": n_kept,
        "hidden": n_pos - n_kept,
        "kept_fraction": n_kept / n_pos if n_pos else 1.0,
        "positives_per_row": n_pos / n_rows,
        "kept_per_row": n_kept / n_rows,
        "rows_without_kept": int((pos.any(1) & ~kept.any(1)).sum()),
    }
