"""MulCon: label-level contrastive learning (spec mulcon.md §6, §7, §14, §15, §17.1).

The contrastive set is made of the label embeddings of the *positive* entries of the batch (plus optional
hard negatives); two entries are positives of each other iff they carry the same label in different rows.
Positives are selected first and only then normalised, so the loss costs O(S²) with S ≈ 3·B, never
O((B·C)²). ``mulcon_loss`` is the pure maths; ``MulCon`` is the plugin that owns the projector.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl import distributed
from mlcl.config.params import Bool, Float, Int
from mlcl.losses.base import LossContext, LossPlugin, register_loss
from mlcl.models.heads.label_attention import ProjectionHead

__all__ = ["MulCon", "mulcon_loss", "select_contrast_set"]

_NORM_EPS = 1e-12


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    # Similarities of half-precision inputs lose ~1e-3 (§15), so the whole loss runs in float32 at least.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def select_contrast_set(
    logits: Tensor, targets: Tensor, denominator_size: int = 0
) -> tuple[Tensor, Tensor, int]:
    """The contrast set 𝒮 of §6.1/§6.5 as flat indices into the ``B·C`` entries.

    Returns ``(index [S], label [S], P)``: the P anchors (``targets == 1``, row-major order) come first with
    their class id as label, then the hard negatives (the ``denominator_size − P`` non-positive entries with
    the largest detached logits, or all of them if fewer exist) with label −1.
    """
    num_classes = targets.shape[1]
    positive = (targets == 1).reshape(-1)
    anchors = positive.nonzero().squeeze(1)
    num_pos = int(anchors.numel())
    labels = anchors % num_classes
    num_neg = min(max(denominator_size - num_pos, 0), positive.numel() - num_pos)
    if num_neg > 0:
        candidates = (~positive).nonzero().squeeze(1)
        ranked = logits.detach().reshape(-1)[candidates].topk(num_neg).indices
        anchors = torch.cat([anchors, candidates[ranked]])
        labels = torch.cat([labels, labels.new_full((num_neg,), -1)])
    return anchors, labels, num_pos


def _anchor_terms(v_rows: Tensor, v: Tensor, labels_rows: Tensor, labels: Tensor, start: int, tau: float):
    """Per-anchor pieces for anchors ``start … start+r−1`` of 𝒮.

    Returns ``(sim [r, S] with −inf on the self entries, lse [r], positive mask [r, S], n [r])`` where
    ``lse_i = logsumexp_{k≠i} v_i·v_k/τ`` and ``n_i = |Π(i)|``.
    """
    rows = v_rows.shape[0]
    sim = torch.matmul(v_rows, v.transpose(0, 1)) / tau
    self_mask = torch.zeros(rows, v.shape[0], dtype=torch.bool, device=v.device)
    self_mask.diagonal(offset=start).fill_(True)
    # −inf before the logsumexp (not a 0/1 mask after exp): stable, and the self term gets zero gradient.
    sim = sim.masked_fill(self_mask, float("-inf"))
    lse = torch.logsumexp(sim, dim=1)
    # Hard negatives carry label −1 and anchors have labels ≥ 0, so negatives never match.
    pos_mask = (labels_rows.unsqueeze(1) == labels.unsqueeze(0)) & ~self_mask
    num_positives = pos_mask.sum(dim=1)
    return sim, lse, pos_mask, num_positives


def _loss_from_terms(sim: Tensor, lse: Tensor, pos_mask: Tensor, num_positives: Tensor) -> Tensor:
    """Σ_i over the given anchors of ℓ_i / (τ/τ_b): mean over Π(i) of (lse_i − s_ij), 0 when Π(i) = ∅."""
    pos_sum = torch.where(pos_mask, sim, torch.zeros((), dtype=sim.dtype, device=sim.device)).sum(dim=1)
    has_pos = num_positives > 0
    per_anchor = lse - pos_sum / num_positives.clamp(min=1).to(sim.dtype)
    return torch.where(has_pos, per_anchor, torch.zeros_like(per_anchor)).sum()


class _ChunkedContrast(torch.autograd.Function):
    """L_con(v) with O(r·S + S·d) memory: anchors in chunks of r, analytic backward of §6.4."""

    @staticmethod
    def forward(ctx, v: Tensor, labels: Tensor, num_pos: int, tau: float, scale: float, chunk: int) -> Tensor:  # type: ignore[override]
        total = v.new_zeros(())
        lse_all = []
        for start in range(0, num_pos, chunk):
            stop = min(start + chunk, num_pos)
            terms = _anchor_terms(v[start:stop], v, labels[start:stop], labels, start, tau)
            lse_all.append(terms[1])
            total = total + _loss_from_terms(*terms)
        ctx.save_for_backward(v, labels, torch.cat(lse_all))
        ctx.num_pos, ctx.tau, ctx.scale, ctx.chunk = num_pos, tau, scale, chunk
        return total * (scale / num_pos)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        v, labels, lse_all = ctx.saved_tensors
        num_pos, tau, chunk = ctx.num_pos, ctx.tau, ctx.chunk
        # G_ij = (τ/τ_b)/(P·τ) · [n_i > 0] · (p_ij − m_ij/n_i); ∂L/∂v = (G + Gᵀ) V.
        coef = grad_out * (ctx.scale / (num_pos * tau))
        grad_v = torch.zeros_like(v)
        for start in range(0, num_pos, chunk):
            stop = min(start + chunk, num_pos)
            v_rows = v[start:stop]
            sim, _, pos_mask, num_positives = _anchor_terms(v_rows, v, labels[start:stop], labels, start, tau)
            prob = torch.exp(sim - lse_all[start:stop].unsqueeze(1))
            weight = (num_positives > 0).to(v.dtype) * coef
            g = (
                prob - pos_mask.to(v.dtype) / num_positives.clamp(min=1).to(v.dtype).unsqueeze(1)
            ) * weight.unsqueeze(1)
            grad_v[start:stop] += torch.matmul(g, v)
            grad_v += torch.matmul(g.transpose(0, 1), v_rows)
        return grad_v, None, None, None, None, None


class _FusedContrast(torch.autograd.Function):
    """L_con(v) in one pass with the analytic gradient of §6.4: two ``[P, S]``-sized matrix products in
    all (one forward, one backward) and no ``[P, S]`` masks.

    The positives of anchor i are the other anchors of its class, so their similarity sum and count come
    from per-class sums of v (``[C, d]``): ``Σ_{j∈Π(i)} v_i·v_j = v_i·(Σ_{class(i)} v − v_i)``. The backward
    uses the same identity for the ``m_ij / n_i`` part of ``G`` and keeps the softmax of the forward.
    """

    @staticmethod
    def forward(
        ctx, v: Tensor, labels: Tensor, num_pos: int, tau: float, scale: float, classes: int
    ) -> Tensor:  # type: ignore[override]
        vp, lab = v[:num_pos], labels[:num_pos]
        sim = torch.mm(vp, v.t()).div_(tau)  # [P, S]
        sim.diagonal().fill_(float("-inf"))  # anchors come first in 𝒮: anchor i is column i
        top = sim.amax(dim=1, keepdim=True)
        prob = sim.sub_(top).exp_()  # reuses the similarity's memory
        total = prob.sum(dim=1, keepdim=True)
        lse = top.squeeze(1) + total.squeeze(1).log()
        prob.div_(total)
        class_sum = v.new_zeros(classes, v.shape[1]).index_add_(0, lab, vp)
        others = class_sum[lab] - vp  # Σ of the other anchors of the same class, [P, d]
        count = torch.bincount(lab, minlength=classes)[lab] - 1  # n_i = |Π(i)|
        has = count > 0
        n = count.clamp(min=1).to(v.dtype)
        per_anchor = lse - (vp * others).sum(dim=1) / (tau * n)
        ctx.save_for_backward(v, lab, prob, n, has)
        ctx.num_pos, ctx.tau, ctx.scale, ctx.classes = num_pos, tau, scale, classes
        return torch.where(has, per_anchor, torch.zeros_like(per_anchor)).sum() * (scale / num_pos)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        v, lab, prob, n, has = ctx.saved_tensors
        num_pos = ctx.num_pos
        vp = v[:num_pos]
        # G_ij = a_i (p_ij − m_ij / n_i) with a_i = (τ/τ_b)/(P·τ)·[n_i > 0]; ∂L/∂v = (G + Gᵀ) V.
        a = has.to(v.dtype) * (grad_out * (ctx.scale / (num_pos * ctx.tau)))
        weighted = prob * a.unsqueeze(1)  # [P, S]
        if weighted.shape[0] == weighted.shape[1]:  # no hard negatives: one product for G_p + G_pᵀ
            grad = torch.mm(weighted + weighted.t(), v)
        else:
            grad = torch.mm(weighted.t(), vp)
            grad[:num_pos] += torch.mm(weighted, v)
        # the m part: −a_i/n_i Σ_{j∈Π(i)} v_j (rows) and −Σ_{i: j∈Π(i)} a_i/n_i v_i (columns)
        b = (a / n).unsqueeze(1)
        class_sum = v.new_zeros(ctx.classes, v.shape[1]).index_add_(0, lab, vp)
        class_wsum = v.new_zeros(ctx.classes, v.shape[1]).index_add_(0, lab, b * vp)
        grad[:num_pos] -= b * (class_sum[lab] - vp) + (class_wsum[lab] - b * vp)
        return grad, None, None, None, None, None


def _plain_contrast(v: Tensor, labels: Tensor, num_pos: int, tau: float, scale: float) -> Tensor:
    """L_con(v) through autograd on the full ``[P, S]`` similarity (the reference for the fused path)."""
    return _loss_from_terms(*_anchor_terms(v[:num_pos], v, labels[:num_pos], labels, 0, tau)) * (
        scale / num_pos
    )


def _graph_zero(t: Tensor, dtype: torch.dtype) -> Tensor:
    """An exact 0-dim zero that still hangs off ``t``'s graph (zero gradient, no NaN, reads no value)."""
    return t.reshape(-1)[:0].sum().to(dtype)


def _check_inputs(
    features: Tensor,
    logits: Tensor,
    targets: Tensor,
    temperature: float,
    base_temperature: float,
    bce_weight: float,
    con_weight: float,
    denominator_size: int,
    chunk_size: int | None,
) -> None:
    if features.dim() != 3 or not features.is_floating_point():
        raise ValueError(
            f"features must be a floating [B, C, d] tensor, got {features.dtype} {tuple(features.shape)}"
        )
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [B, C] tensor, got {logits.dtype} {tuple(logits.shape)}")
    if tuple(logits.shape) != tuple(features.shape[:2]):
        raise ValueError(
            f"logits shape {tuple(logits.shape)} does not match features [B, C] = {tuple(features.shape[:2])}"
        )
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not base_temperature > 0:
        raise ValueError(f"base_temperature must be > 0, got {base_temperature}")
    if not bce_weight >= 0:
        raise ValueError(f"bce_weight must be >= 0, got {bce_weight}")
    if not con_weight >= 0:
        raise ValueError(f"con_weight must be >= 0, got {con_weight}")
    if (
        isinstance(denominator_size, bool)
        or int(denominator_size) != denominator_size
        or denominator_size < 0
    ):
        raise ValueError(f"denominator_size must be an integer >= 0, got {denominator_size}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size}")


def mulcon_loss(
    features: Tensor,
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 0.2,
    base_temperature: float = 0.2,
    bce_weight: float = 1.0,
    con_weight: float = 0.5,
    denominator_size: int = 0,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """MulCon objective ``bce_weight · L_cls + con_weight · L_con`` (spec §6–§7, contract §17.1).

    Args:
        features: ``[B, C, d]`` projector outputs z (not normalised); only rows in 𝒮 are read.
        logits: ``[B, C]`` classifier logits (BCE only; the hard-negative ranking uses them detached).
        targets: ``[B, C]`` in {1, 0, −1}, any dtype; −1 is identical to 0.
        temperature, base_temperature: τ and τ_b; the contrastive term is scaled by τ/τ_b.
        bce_weight, con_weight: term weights (``con_weight=0`` is stage one: the contrastive term is skipped).
        denominator_size: hard negatives fill 𝒮 up to this many rows (§6.5); 0 = off.
        chunk_size: extension. ``None`` computes the ``[P, S]`` similarity at once (autograd). An integer r
            processes r anchors at a time with the analytic gradient of §6.4 (memory O(r·S + S·d)), for very
            large P; value and gradient equal the plain path (to ~1e-15 in float64).

    Returns 0-dim tensors ``loss``, ``loss_cls``, ``loss_con`` and ``num_anchors`` (P, detached) in the
    computation dtype (float64 in → float64; half/bfloat16 → float32).

    Cost, measured on the 2-core dev CPU (float32, forward + backward, C=80, d=128, ~3.5% positives,
    median of 200 runs while the box was shared): B=64 (P=190) 1.35–1.9 ms, B=256 (P=723) 8.8–11.5 ms;
    ``chunk_size=64``: 2.2–3.3 ms and 14–19 ms. Extra peak memory of one forward + backward (growth of the
    process's peak RSS, VmHWM, with ``MALLOC_MMAP_THRESHOLD_=0`` so that freed memory is returned at once):
    **2.5 MiB at B=64** and **11.0 MiB at B=256** (``chunk_size=64``: 2.6 / 10.4 MiB). Most of it is the dense
    ``[B, C, d]`` gradient of ``features`` itself (2.5 / 10 MiB); the ``[P, S]`` similarity is 0.14 / 2.0 MiB.
    The default path is now the fused contrast (``_FusedContrast``: one similarity product forward, one
    backward, no ``[P, S]`` masks); timed interleaved with the autograd path above on a busy machine it
    takes 0.7-0.85x its time at B=64 and B=256 (``mlcl-bench`` measures it against the spec's references).
    """
    _check_inputs(
        features,
        logits,
        targets,
        temperature,
        base_temperature,
        bce_weight,
        con_weight,
        denominator_size,
        chunk_size,
    )
    dtype = _compute_dtype(features, logits)
    batch, num_classes, dim = features.shape
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.to(dtype)
        y = (targets == 1).to(dtype)  # −1 (unknown) is a BCE negative, exactly like 0
        loss_cls = bce_weight * F.binary_cross_entropy_with_logits(x, y)

        index, labels, num_pos = select_contrast_set(logits, targets, int(denominator_size))
        num_anchors = torch.tensor(float(num_pos), dtype=dtype, device=logits.device)
        size = int(index.numel())
        if con_weight == 0 or num_pos == 0 or size < 2:
            # No logsumexp over an empty set (its backward is NaN even when masked): return early (§15).
            loss_con = _graph_zero(features, dtype)
        else:
            z = features.reshape(batch * num_classes, dim)[index].to(dtype)
            v = F.normalize(z, dim=1, eps=_NORM_EPS)
            scale = temperature / base_temperature
            if chunk_size is None:
                l_con = _FusedContrast.apply(v, labels, num_pos, float(temperature), scale, num_classes)
            else:
                l_con = _ChunkedContrast.apply(v, labels, num_pos, float(temperature), scale, int(chunk_size))
            loss_con = con_weight * l_con
    return {
        "loss": loss_cls + loss_con,
        "loss_cls": loss_cls,
        "loss_con": loss_con,
        "num_anchors": num_anchors,
    }


@register_loss("mulcon")
class MulCon(LossPlugin):
    """MulCon (Dao et al. 2021): per-label BCE + supervised contrast of label-level embeddings.

    Needs the ``label_attention`` head on the backbone's spatial map. Owns the projector g (created only when
    ``con_weight > 0``; ``con_weight=0`` is stage one). Only the rows of the contrast set 𝒮 (positives, plus
    hard negatives if ``denominator_size > 0``) are projected; the others stay zero and are never read by the
    loss. With ``gather=True`` projected features, logits and targets are all-gathered over DDP ranks (with
    gradients), so N ranks × B rows give the single-process value on N·B rows (BCE mean, anchors, ranking).

    Logged terms: ``loss``, ``loss_cls`` (weighted BCE), ``loss_con`` (weighted contrast), ``num_anchors``.
    """

    head = "label_attention"
    spatial = True
    unknown_policy = "identical to 0: a BCE negative, never a contrastive anchor, a hard-negative candidate"
    #: reference label module (§3): width 1024, 4 heads, two pixel blocks, one label block, LayerNorm
    default_head_kwargs: ClassVar[dict[str, Any]] = {
        "embed_dim": 1024,
        "num_heads": 4,
        "num_pixel_blocks": 2,
        "num_label_blocks": 1,
        "layer_norm": True,
    }

    #: hyper-parameters declared once (types, ranges, defaults; mlcl.config.validate reads them)
    hyperparams = {
        "temperature": Float(0.2, gt=0),
        "base_temperature": Float(0.2, gt=0),
        "bce_weight": Float(1.0, ge=0),
        "con_weight": Float(0.5, ge=0),
        "denominator_size": Int(0, ge=0),
        "proj_dim": Int(128, ge=1),
        "proj_hidden": Int(1024, ge=1),
        "chunk_size": Int(None, ge=1, nullable=True),
    }
    head_hyperparams = {
        "embed_dim": Int(1024, ge=1),
        "num_heads": Int(4, ge=1),
        "num_pixel_blocks": Int(2, ge=0),
        "num_label_blocks": Int(1, ge=0),
        "layer_norm": Bool(True),
    }

    hyperparams_as_keywords = True

    def __init__(self, **kwargs: Any) -> None:
        """``LossPlugin``'s keywords (num_classes, feature_dim, ...) plus the declared hyper-parameters."""
        super().__init__(**kwargs)  # checks the hyper-parameters and sets them as attributes
        # Stage one has no projector at all, so DDP never sees unused parameters.
        self.projector = (
            ProjectionHead(self.feature_dim, self.proj_hidden, self.proj_dim) if self.con_weight > 0 else None
        )

    def _loss_kwargs(self) -> dict[str, Any]:
        """Keywords of :func:`mulcon_loss`: the hyper-parameters except the projector's widths."""
        projector = ("proj_dim", "proj_hidden")
        return {name: getattr(self, name) for name in self.hyperparams if name not in projector}

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        embeddings, logits = outputs["embeddings"], outputs["logits"]
        if targets.shape[0] != logits.shape[0] and logits.shape[0] == ctx.num_views * targets.shape[0]:
            targets = targets.repeat(ctx.num_views, 1)  # views are view-major and share the label vector
        batch, num_classes = logits.shape
        logits_all, targets_all = self.all_gather(logits, targets)
        if self.projector is None:
            # Stage one: the contrastive term is skipped and its features argument is never read.
            return mulcon_loss(logits_all.unsqueeze(-1), logits_all, targets_all, **self._loss_kwargs())

        # The selection is global (anchors and hard-negative ranking over every rank's rows); project only the
        # local rows that belong to it.
        index, _, _ = select_contrast_set(logits_all, targets_all, self.denominator_size)
        (sizes,) = self.all_gather(torch.tensor([batch], device=logits.device))
        offset = int(sizes[: distributed.rank()].sum()) * num_classes if self.gather else 0
        local = index[(index >= offset) & (index < offset + batch * num_classes)] - offset
        flat = embeddings.reshape(batch * num_classes, embeddings.shape[-1])
        projected = self.projector(
            flat[local]
        )  # always called, even on 0 rows, so DDP sees its parameters used
        features = projected.new_zeros(batch * num_classes, projected.shape[-1]).index_copy(
            0, local, projected
        )
        (features_all,) = self.all_gather(features.reshape(batch, num_classes, -1))
        return mulcon_loss(features_all, logits_all, targets_all, **self._loss_kwargs())

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, temperature={self.temperature}, "
            f"base_temperature={self.base_temperature}, bce_weight={self.bce_weight}, "
            f"con_weight={self.con_weight}, denominator_size={self.denominator_size}"
        )
