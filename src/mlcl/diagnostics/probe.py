"""Linear probe on frozen embeddings: closed-form ridge regression onto the labels, scored by test mAP."""

from __future__ import annotations

import torch
from torch import Tensor

from mlcl.diagnostics.geometry import positives
from mlcl.metrics import mean_average_precision

__all__ = ["linear_probe_map", "ridge_fit"]


def ridge_fit(x: Tensor, y: Tensor, reg: float = 1e-3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ridge regression of targets ``y`` ``[N, C]`` on standardised features ``x`` ``[N, D]`` (float64).

    Solves ``W = (Xs^T Xs + reg · N · I)^-1 Xs^T (y - mean y)`` with ``Xs = (x - mean) / std``; returns
    ``(mean [D], std [D], W [D, C], bias [C])`` so that scores are ``((x - mean) / std) @ W + bias``.
    ``reg`` is relative to N so it means the same on any training-set size.
    """
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    xs = (x - mean) / std
    y_mean = y.mean(0)
    gram = xs.T @ xs + reg * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(gram, xs.T @ (y - y_mean))
    return mean, std, w, y_mean


def linear_probe_map(
    train_z: Tensor, train_labels: Tensor, test_z: Tensor, test_labels: Tensor, reg: float = 1e-3
) -> float:
    """Test mAP (percent) of a ridge probe fitted on frozen train embeddings.

    ``train_z`` ``[N, D]``, ``train_labels`` ``[N, C]`` in ``{1, 0, -1}`` (unknown -1 counts as negative),
    ``test_z`` ``[M, D]``, ``test_labels`` ``[M, C]`` (-1 entries are ignored by the mAP).
    """
    mean, std, w, bias = ridge_fit(train_z, positives(train_labels), reg)
    scores = ((test_z.double().to(w.device) - mean) / std) @ w + bias
    return float(mean_average_precision(scores, test_labels.to(scores.device))["mAP"])
