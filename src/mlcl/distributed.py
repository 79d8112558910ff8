"""Cross-rank helpers for batch-coupled (contrastive) losses.

Under DDP every rank sees only its local batch. Contrastive terms need the embeddings of all
ranks, and their gradients must flow back to the rank that produced them. ``all_gather_cat``
concatenates a tensor over ranks (rank order) with a backward that *sums* the incoming gradients
over ranks and returns each rank its slice; DDP's gradient averaging then reproduces the
single-process gradient of the loss computed on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _AllGatherCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ws = dist.get_world_size()
        sizes = torch.tensor([x.shape[0]], device=x.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(ws)]
        dist.all_gather(all_sizes, sizes)
        sizes_list = [int(s.item()) for s in all_sizes]
        max_n = max(sizes_list)
        pad = x.new_zeros((max_n - x.shape[0], *x.shape[1:])) if max_n > x.shape[0] else None
        xp = torch.cat([x, pad]) if pad is not None else x.contiguous()
        bufs = [torch.empty_like(xp) for _ in range(ws)]
        dist.all_gather(bufs, xp)
        ctx.sizes = sizes_list
        ctx.rank = dist.get_rank()
        return torch.cat([b[:n] for b, n in zip(bufs, sizes_list)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # clone: the incoming buffer may be shared with other branches of the graph
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate ``x`` ([n_r, ...], sizes may differ per rank) over ranks along dim 0.

    Differentiable when ``x`` requires grad; a no-op outside DDP. Integer tensors (targets,
    indices) are gathered without autograd.
    """
    if not is_distributed():
        return x
    if x.requires_grad:
        return _AllGatherCat.apply(x)
    with torch.no_grad():
        return _AllGatherCat.forward(_NoCtx(), x)


class _NoCtx:
    """Stand-in autograd context for gathering tensors that need no gradient."""


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum a tensor over ranks (no gradient); identity outside DDP."""
    if not is_distributed():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y
