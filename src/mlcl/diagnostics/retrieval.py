"""Label-aware retrieval: neighbours ranked by cosine similarity, scored by label overlap.

Definitions (query i, database = every other row j != i, ranked by cosine similarity, ties broken by
row index; ``rel_i(r)`` is the relevance of the neighbour at rank r = 1, 2, ...):

* relevance ``rel(i, j) = |Y_i ∩ Y_j| / |Y_i ∪ Y_j|`` (Jaccard overlap of the positive label sets, 0 when
  both are empty); ``R_i`` = number of rows j != i with ``rel(i, j) > 0``. Queries with ``R_i = 0`` are
  left out of every mean.
* Jaccard-weighted average precision (the "weighted mAP" of multi-label retrieval, with Jaccard gains):
  ``ACG_i@r = (1/r) Σ_{s<=r} rel_i(s)`` and
  ``wAP_i@k = Σ_{r<=k} 1[rel_i(r) > 0] · ACG_i@r / min(k, R_i)``; ``wAP_i`` is ``wAP_i@(N-1)`` (over all).
  With 0/1 relevance this is the usual average precision (at k).
* ``nDCG_i@k = Σ_{r<=k} rel_i(r) / log2(r+1)`` divided by the same sum for the relevances sorted
  in decreasing order (the ideal ranking).

Scores are means over queries, in percent (0-100).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl.diagnostics.geometry import BUDGET, positives, row_chunks

__all__ = ["jaccard", "label_retrieval_ap", "retrieval_scores"]

# a sort needs its values, int64 indices and a few same-sized temporaries: keep each block smaller
_SORT_BUDGET = BUDGET // 4


def jaccard(yb: Tensor, y: Tensor) -> Tensor:
    """Jaccard overlap ``[b, N]`` of positive label sets ``yb`` ``[b, C]`` and ``y`` ``[N, C]`` (0/1)."""
    inter = yb @ y.T
    union = yb.sum(1, keepdim=True) + y.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))


def _self_excluded_order(sims: Tensor, first: int) -> Tensor:
    """Neighbour order ``[b, N-1]``: descending similarity, ties by index, the query itself dropped."""
    b = sims.shape[0]
    idx = torch.arange(b, device=sims.device)
    sims[idx, idx + first] = -math.inf  # cosine >= -1, so the query sorts last and is cut off
    return torch.sort(sims, dim=-1, descending=True, stable=True).indices[..., :-1]


def retrieval_scores(
    z: Tensor, labels: Tensor, ks: tuple[int, ...] = (10,), budget: int = _SORT_BUDGET
) -> dict[str, float]:
    """Jaccard-weighted retrieval scores of the rows of ``z`` ``[N, D]`` with ``labels`` ``[N, C]``.

    Returns ``{"wAP": ..., "wAP@k": ..., "nDCG@k": ...}`` for every k in ``ks`` (percent; NaN when no
    query has a relevant neighbour). See the module docstring for the definitions.
    """
    z = F.normalize(z.float(), dim=1)
    y = positives(labels).to(z.device)
    n = z.shape[0]
    m = n - 1
    ranks = torch.arange(1, max(m, 1) + 1, device=z.device, dtype=torch.float32)
    discount = 1.0 / torch.log2(ranks + 1.0)
    sums = {"wAP": 0.0, **{f"wAP@{k}": 0.0 for k in ks}, **{f"nDCG@{k}": 0.0 for k in ks}}
    queries = 0
    for rows in row_chunks(n, n, budget):
        if m < 1:
            break
        order = _self_excluded_order(z[rows] @ z.T, rows.start)
        rel = jaccard(y[rows], y).gather(1, order)  # [b, N-1] relevance in rank order
        hit = rel > 0
        total = hit.sum(1)
        valid = total > 0
        if not valid.any():
            continue
        rel, hit, total = rel[valid], hit[valid], total[valid].float()
        queries += int(valid.sum())
        acg = rel.cumsum(1) / ranks
        gain = hit * acg
        sums["wAP"] += float((gain.sum(1) / total).sum())
        for k in ks:
            kk = min(k, m)
            ideal = torch.topk(rel, kk, dim=1).values  # sorted, the best possible ranking
            sums[f"wAP@{k}"] += float((gain[:, :kk].sum(1) / total.clamp_max(kk)).sum())
            dcg = (rel[:, :kk] * discount[:kk]).sum(1)
            idcg = (ideal[:, :kk] * discount[:kk]).sum(1)
            sums[f"nDCG@{k}"] += float((dcg / idcg).sum())
    if queries == 0:
        return {key: math.nan for key in sums}
    return {key: 100.0 * v / queries for key, v in sums.items()}


def label_retrieval_ap(e: Tensor, labels: Tensor, budget: int = _SORT_BUDGET) -> Tensor:
    """Per-label retrieval AP ``[C]`` (percent, float64) of label-level embeddings ``e`` ``[N, C, E]``.

    For label c every sample i with ``y_ic = 1`` queries the other samples by cosine similarity of
    ``e[:, c]``; a neighbour is relevant when it is also positive for c (binary relevance, so this is
    the plain average precision over all N-1 neighbours). ``AP[c]`` is the mean over those queries
    (NaN for a label with fewer than two positives). Only the (sample, label) positives are ranked,
    in chunks of query pairs, so the cost is ``#positives x N`` rather than ``C x N x N``.
    """
    n, c, _ = e.shape
    e = F.normalize(e.float(), dim=2).transpose(0, 1)  # [C, N, E]
    y = positives(labels).to(e.device).T  # [C, N]
    total = torch.zeros(c, dtype=torch.float64, device=e.device)
    count = torch.zeros(c, dtype=torch.float64, device=e.device)
    if n < 2:
        return torch.full_like(total, math.nan)
    cls, query = y.nonzero(as_tuple=True)  # every positive (label, sample) pair is one query
    ranks = torch.arange(1, n, device=e.device, dtype=torch.float32)
    for pairs in row_chunks(cls.shape[0], n * e.shape[2], budget):
        cp, qp = cls[pairs], query[pairs]
        sims = torch.einsum("pne,pe->pn", e[cp], e[cp, qp])  # [p, N] similarities within each label
        idx = torch.arange(sims.shape[0], device=e.device)
        sims[idx, qp] = -math.inf  # the query itself sorts last and is cut off
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :-1]
        rel = y[cp].gather(1, order)  # [p, N-1]
        relevant = rel.sum(1)
        ap = (rel * rel.cumsum(1) / ranks).sum(1) / relevant.clamp_min(1.0)
        valid = (relevant > 0).double()
        total.index_add_(0, cp, ap.double() * valid)
        count.index_add_(0, cp, valid)
    return torch.where(count > 0, 100.0 * total / count.clamp_min(1), torch.full_like(total, math.nan))
