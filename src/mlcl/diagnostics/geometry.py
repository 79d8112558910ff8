"""Alignment and uniformity of L2-normalised embeddings (Wang & Isola, 2020), sample- and label-level.

Pairwise quantities are accumulated over row chunks so that memory stays bounded (``budget`` elements
per ``[rows, N]`` block) while every chunk is one vectorised matrix product.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "alignment",
    "alignment_uniformity",
    "label_alignment_uniformity",
    "positives",
    "row_chunks",
    "uniformity",
]

BUDGET = 1 << 24  # elements of one pairwise block (64 MB in float32)


def row_chunks(n: int, width: int, budget: int = BUDGET) -> Iterator[slice]:
    """Slices over ``range(n)`` whose blocks ``[rows, width]`` hold at most ``budget`` elements."""
    rows = max(1, budget // max(1, width))
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def positives(labels: Tensor) -> Tensor:
    """``labels`` ``[N, C]`` in ``{1, 0, -1}`` (or bool) -> float ``[N, C]`` with 1 where the label is 1."""
    return (labels == 1).float() if labels.dtype != torch.bool else labels.float()


def _sq_dist(zb: Tensor, z: Tensor) -> Tensor:
    """Squared distances ``[b, N]`` between unit rows: ``||a - b||^2 = 2 - 2 a.b`` (clamped at 0)."""
    return (2.0 - 2.0 * zb @ z.T).clamp_min(0.0)


def alignment_uniformity(
    z: Tensor, labels: Tensor | None, alpha: float = 2.0, t: float = 2.0, budget: int = BUDGET
) -> tuple[float, float]:
    """Alignment and uniformity of the L2-normalised rows of ``z`` ``[N, D]`` in one pass over the pairs.

    * alignment ``E_{(i,j) positive} ||f_i - f_j||^alpha``: positive pairs are ordered pairs ``i != j``
      sharing at least one positive label of ``labels`` ``[N, C]`` (``{1, 0, -1}``). Lower is better
      (0: all positives coincide); NaN when there is no positive pair or ``labels`` is None.
    * uniformity ``log E_{i != j} exp(-t ||f_i - f_j||^2)``: lower is more uniform (about -4 for many
      points spread over a high-dimensional sphere, t=2); NaN for fewer than two rows. Computed as a
      streamed log-sum-exp, so it never underflows.
    """
    z = F.normalize(z.float(), dim=1)
    y = positives(labels).to(z.device) if labels is not None else None
    n = z.shape[0]
    total = z.new_zeros((), dtype=torch.float64)
    count = 0
    parts = []
    for rows in row_chunks(n, n, budget):
        d2 = _sq_dist(z[rows], z)
        diag = (torch.arange(rows.stop - rows.start), torch.arange(rows.start, rows.stop))
        if y is not None:
            mask = (y[rows] @ y.T) > 0
            mask[diag] = False
            dist = d2 if alpha == 2.0 else d2.sqrt().pow(alpha)
            total += (dist * mask).sum(dtype=torch.float64)
            count += int(mask.sum())
        logits = -t * d2
        logits[diag] = -math.inf
        parts.append(torch.logsumexp(logits.flatten().double(), 0))
    align = float(total / count) if count else math.nan
    unif = float(torch.logsumexp(torch.stack(parts), 0) - math.log(n * (n - 1))) if n > 1 else math.nan
    return align, unif


def alignment(z: Tensor, labels: Tensor, alpha: float = 2.0, budget: int = BUDGET) -> float:
    """Alignment of ``z`` ``[N, D]`` over pairs sharing a label of ``labels`` ``[N, C]``
    (see :func:`alignment_uniformity`)."""
    return alignment_uniformity(z, labels, alpha, budget=budget)[0]


def uniformity(z: Tensor, t: float = 2.0, budget: int = BUDGET) -> float:
    """Uniformity of ``z`` ``[N, D]`` (see :func:`alignment_uniformity`)."""
    return alignment_uniformity(z, None, t=t, budget=budget)[1]


def label_alignment_uniformity(
    e: Tensor, labels: Tensor, alpha: float = 2.0, t: float = 2.0, budget: int = BUDGET
) -> tuple[Tensor, Tensor]:
    """Per-label alignment and uniformity of label-level embeddings.

    ``e`` ``[N, C, E]`` (one embedding per sample and label, e.g. MulCon's label embeddings or KMCL's
    per-class means), ``labels`` ``[N, C]``. For every label c the embeddings ``e[:, c]`` are
    L2-normalised; returns ``(align [C], unif [C])`` (float64) with

    * ``align[c] = E_{i != j, y_ic = y_jc = 1} ||e_ic - e_jc||^alpha`` (NaN with < 2 positives),
    * ``unif[c] = log E_{i != j} exp(-t ||e_ic - e_jc||^2)`` over all samples (NaN with < 2 rows).
    """
    n, c, _ = e.shape
    e = F.normalize(e.float(), dim=2)
    y = positives(labels).to(e.device)  # [N, C]
    e_c = e.transpose(0, 1)  # [C, N, E]
    total = torch.zeros(c, dtype=torch.float64, device=e.device)
    count = torch.zeros(c, dtype=torch.float64, device=e.device)
    parts = []
    for rows in row_chunks(n, n * c, budget):
        b = rows.stop - rows.start
        d2 = (2.0 - 2.0 * torch.einsum("cbe,cne->cbn", e_c[:, rows], e_c)).clamp_min(0.0)  # [C, b, N]
        not_self = torch.ones(b, n, dtype=torch.bool, device=e.device)
        not_self[torch.arange(b), torch.arange(rows.start, rows.stop)] = False
        pair = y[rows].T[:, :, None] * y.T[:, None, :] * not_self  # [C, b, N]: both positive for c
        dist = d2 if alpha == 2.0 else d2.sqrt().pow(alpha)
        total += (dist * pair).sum((1, 2), dtype=torch.float64)
        count += pair.sum((1, 2), dtype=torch.float64)
        logits = (-t * d2).masked_fill(~not_self, -math.inf)
        parts.append(torch.logsumexp(logits.flatten(1).double(), 1))
    align = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))
    if n < 2:
        return align, torch.full_like(total, math.nan)
    unif = torch.logsumexp(torch.stack(parts), 0) - math.log(n * (n - 1))
    return align, unif
