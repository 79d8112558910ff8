"""Timing of the representation diagnostics on synthetic embeddings (rows for ``python -m mlcl.bench``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from mlcl.diagnostics.geometry import alignment_uniformity, label_alignment_uniformity
from mlcl.diagnostics.probe import linear_probe_map
from mlcl.diagnostics.retrieval import label_retrieval_ap, retrieval_scores

__all__ = ["bench_rows"]


def _synthetic(rows: int, dim: int, classes: int, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """Clustered embeddings ``[rows, dim]`` with ~3 positives of ``classes`` per row (COCO-like)."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(rows, classes, generator=g) < 2.9 / classes).long()
    centres = torch.randn(classes, dim, generator=g)
    z = y.float() @ centres + 0.5 * torch.randn(rows, dim, generator=g)
    return z.to(device), y.to(device)


def _timed(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_rows(
    rows: int = 10_000,
    dim: int = 128,
    classes: int = 80,
    label_rows: int = 1000,
    label_dim: int = 64,
    device: str = "cpu",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Wall time of each diagnostic on ``rows`` synthetic test rows (and as many train rows for the probe).

    Returns one dict per diagnostic: ``{"name", "rows", "shape", "seconds"}``; the label-level ones run
    on ``[label_rows, classes, label_dim]`` (the default ``diagnostics.label_max_rows``).
    """
    z, y = _synthetic(rows, dim, classes, seed, device)
    z_train, y_train = _synthetic(rows, dim, classes, seed + 1, device)
    e = torch.randn(label_rows, classes, label_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    ye = y[:label_rows]
    cases: list[tuple[str, str, Callable[[], Any]]] = [
        ("alignment + uniformity", f"[{rows}, {dim}]", lambda: alignment_uniformity(z, y)),
        ("retrieval (wAP, wAP@10, nDCG@10)", f"[{rows}, {dim}]", lambda: retrieval_scores(z, y)),
        ("linear probe (ridge)", f"[{rows}, {dim}] x2", lambda: linear_probe_map(z_train, y_train, z, y)),
        (
            "label alignment + uniformity",
            f"[{label_rows}, {classes}, {label_dim}]",
            lambda: label_alignment_uniformity(e, ye),
        ),
        ("label retrieval AP", f"[{label_rows}, {classes}, {label_dim}]", lambda: label_retrieval_ap(e, ye)),
    ]
    return [
        {"name": name, "rows": rows, "shape": shape, "seconds": _timed(fn, device)}
        for name, shape, fn in cases
    ]


if __name__ == "__main__":
    for row in bench_rows():
        print(f"{row['name']:<36} {row['shape']:<22} {row['seconds']:8.2f} s")
