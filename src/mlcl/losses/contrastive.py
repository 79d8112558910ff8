"""Contrastive baselines: SupCon (HobbitLong) and MulSupCon (MoCo-style, one anchor per label).

Pure functions (``supcon_loss``, ``mulsupcon_loss``) hold the maths of ``specs/baselines.md`` 3.1/3.2;
the plugins ``SupCon`` and ``MulSupCon`` own a projection head (and, for MulSupCon, the momentum key
encoder and the key/label queue) and add an optional BCE classification term for joint training.

Targets follow the project convention ``{1, 0, -1}``; both losses treat ``-1`` (unknown) as ``0``
(never a positive), as the references' multi-hot ``{0, 1}`` encoding requires.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcl.config.params import Choice, Float, Int, List
from mlcl.losses.base import LossContext, LossPlugin, register_loss

__all__ = [
    "MulSupCon",
    "SupCon",
    "build_projector",
    "mulsupcon_loss",
    "positive_pair_mask",
    "supcon_loss",
]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are upcast for the log-sum-exp)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------- SupCon
def positive_pair_mask(targets: Tensor | None, batch_size: int, positive_rule: str = "exact") -> Tensor:
    """Boolean ``[B, B]`` "same positive set" relation between samples (diagonal included).

    ``targets`` None -> identity (SimCLR); ``[B]`` class ids -> equal ids; ``[B, C]`` multi-hot in
    ``{1, 0, -1}`` (``-1`` -> 0) -> identical label sets (``"exact"``) or >= 1 shared label (``"any"``).
    """
    if positive_rule not in ("exact", "any"):
        raise ValueError(f"positive_rule must be 'exact' or 'any', got {positive_rule!r}")
    if targets is None:
        return torch.eye(batch_size, dtype=torch.bool)
    if targets.shape[0] != batch_size:
        raise ValueError(f"targets have {targets.shape[0]} rows, features {batch_size} samples")
    if targets.ndim == 1:
        return targets[:, None] == targets[None, :]
    if targets.ndim != 2:
        raise ValueError(f"targets must be None, [B] or [B, C], got shape {tuple(targets.shape)}")
    # float32 counts are exact (< 2**24); the product gives |Y_i ∩ Y_j| for every pair at once
    y = (targets == 1).to(torch.float32)
    shared = y @ y.T
    if positive_rule == "any":
        return shared > 0
    size = y.sum(1)
    return (shared == size[:, None]) & (shared == size[None, :])


def supcon_loss(
    features: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    positive_rule: str = "exact",
) -> dict[str, Tensor]:
    """Supervised contrastive loss (Khosla et al.; spec 3.1).

    ``features`` ``[B, V, D]`` L2-normalised views; ``targets`` None (SimCLR), ``[B]`` class ids or
    ``[B, C]`` multi-hot in ``{1, 0, -1}``. The contrast set is the ``V*B`` views ordered view-major;
    anchors are all of them (``"all"``) or view 0 (``"one"``); an anchor is never its own candidate.
    Anchors without positives contribute 0 but count in the mean. Returns ``{"loss"}``.
    """
    if contrast_mode not in ("all", "one"):
        raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
    if features.ndim != 3:
        raise ValueError(f"features must be [B, V, D], got shape {tuple(features.shape)}")
    out_dtype = features.dtype
    f = features.to(_compute_dtype(features))
    b, v, d = f.shape
    pairs = positive_pair_mask(targets, b, positive_rule).to(f.device)

    contrast = f.transpose(0, 1).reshape(v * b, d)
    anchors = contrast if contrast_mode == "all" else contrast[:b]
    n_anchor, n_contrast = anchors.shape[0], contrast.shape[0]
    with torch.no_grad():
        # anchors are the first rows of the contrast set, so self-pairs lie on the leading diagonal
        is_self = torch.eye(n_anchor, n_contrast, dtype=torch.bool, device=f.device)
        # a finite "-inf": exp() underflows to exactly 0 (self removed from the softmax), and unlike
        # -inf it leaves 0 · log p finite where the self entry meets a zero weight
        self_bias = torch.zeros(n_anchor, n_contrast, dtype=f.dtype, device=f.device)
        self_bias.masked_fill_(is_self, torch.finfo(f.dtype).min)
        pos = (pairs.repeat(n_anchor // b, v) & ~is_self).to(f.dtype)
        # 1/|P(i)| per positive; |P(i)| = 0 rows get weight 0, i.e. ℓ_i = 0 but still counted in A
        pos_weight = pos / pos.sum(1, keepdim=True).clamp(min=1.0)
    log_prob = torch.log_softmax(torch.addmm(self_bias, anchors, contrast.T, alpha=1.0 / temperature), dim=1)
    loss = (pos_weight * log_prob).sum() * (-(temperature / base_temperature) / n_anchor)
    return {"loss": loss.to(out_dtype)}


# ------------------------------------------------------------------------------------------ MulSupCon
def mulsupcon_loss(
    queries: Tensor,
    query_targets: Tensor,
    keys: Tensor,
    key_targets: Tensor,
    *,
    temperature: float = 0.1,
    weighting: str = "mean",
) -> dict[str, Tensor]:
    """MulSupCon loss (spec 3.2): one anchor row per (query, positive label) pair.

    ``queries`` ``[B, D]``, ``keys`` ``[K, D]`` (L2-normalised), targets ``[B, C]``/``[K, C]`` in
    ``{1, 0, -1}`` (``-1`` -> 0). Row ``(i, c)`` scores query ``i`` against all K keys; its positives
    are the keys with label ``c``. ``weighting="mean"``: rows averaged (``1/R``); ``"per_sample"``:
    ``1/(|Y_i| B)``. ``R = 0`` gives 0; rows whose label no key carries contribute 0 (still counted
    in ``R``). Returns ``{"loss"}``.
    """
    if weighting not in ("mean", "per_sample"):
        raise ValueError(f"weighting must be 'mean' or 'per_sample', got {weighting!r}")
    out_dtype = torch.promote_types(queries.dtype, keys.dtype)
    dt = _compute_dtype(queries, keys)
    q, k = queries.to(dt), keys.to(dt)
    yq = (query_targets == 1).to(dt)
    yk = (key_targets == 1).to(dt)

    if weighting == "mean":
        row_weight = yq / yq.sum().clamp(min=1.0)
    else:
        row_weight = yq / (yq.sum(1, keepdim=True).clamp(min=1.0) * q.shape[0])
    # Σ_r w_r ℓ_r = −Σ_ij log p_ij Σ_c w_ic Y^k_jc / |P_c|: the positives of row (i, c) depend on c
    # only, so all rows fold into one [B, K] weight matrix (|P_c| = 0 -> numerator 0, row adds 0)
    pair_weight = (row_weight / yk.sum(0).clamp(min=1.0)) @ yk.T
    log_prob = torch.log_softmax((q @ k.T) * (1.0 / temperature), dim=1)
    loss = -(pair_weight * log_prob).sum()
    return {"loss": loss.to(out_dtype)}


# -------------------------------------------------------------------------------------------- plugins
def build_projector(
    in_dim: int, dims: Sequence[int], norm: str = "none", dropout: float = 0.0
) -> nn.Sequential:
    """MLP ``in_dim -> dims[0] -> ... -> dims[-1]``; hidden layers get [BN] + ReLU [+ Dropout].

    ``dims=[]`` gives the identity (features are only normalised by the caller).
    """
    if norm not in ("bn", "none"):
        raise ValueError(f"proj_norm must be 'bn' or 'none', got {norm!r}")
    layers: list[nn.Module] = []
    width = in_dim
    for i, out in enumerate(dims):
        layers.append(nn.Linear(width, int(out)))
        if i < len(dims) - 1:
            if norm == "bn":
                layers.append(nn.BatchNorm1d(int(out)))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        width = int(out)
    return nn.Sequential(*layers)


def _rows_of_first_view(t: Tensor, batch_size: int) -> Tensor:
    """Targets of the first view: accepts ``[B, C]`` or view-major ``[V*B, C]``."""
    if t.shape[0] < batch_size or t.shape[0] % batch_size:
        raise ValueError(f"targets have {t.shape[0]} rows, expected a multiple of the batch {batch_size}")
    return t[:batch_size]


class _ProjectedContrastive(LossPlugin):
    """Shared parts: projector, joint BCE term, loss composition."""

    head = "linear"
    unknown_policy = "treated as negative (never a positive, BCE target 0)"

    hyperparams_as_keywords = True

    def __init__(self, **kwargs: Any) -> None:
        """``LossPlugin``'s keywords (num_classes, feature_dim, ...) plus the declared hyper-parameters."""
        super().__init__(**kwargs)  # checks the hyper-parameters and sets them as attributes
        dims = self.projector_dims()
        self.projector = build_projector(self.feature_dim, dims, self.proj_norm, self.proj_dropout)

    def projector_dims(self) -> list[int]:
        """Widths of the projector's linear layers: ``proj_dims``, or the reference's when it is null."""
        raise NotImplementedError

    def project(self, features: Tensor) -> Tensor:
        """L2-normalised projections ``[N, D]`` of pooled features ``[N, F]``."""
        return F.normalize(self.projector(features), dim=1)

    def classification(self, logits: Tensor, targets: Tensor, num_views: int) -> Tensor:
        """BCE-with-logits, mean over every entry of the classified rows; ``-1`` -> target 0."""
        batch = logits.shape[0] // num_views
        if self.classify_views == "first":
            logits, targets = logits[:batch], _rows_of_first_view(targets, batch)
        elif targets.shape[0] != logits.shape[0]:
            targets = _rows_of_first_view(targets, batch).repeat(num_views, 1)
        return F.binary_cross_entropy_with_logits(logits, (targets == 1).to(logits.dtype))

    def compose(self, loss_cls: Tensor, loss_con: Tensor) -> dict[str, Tensor]:
        """Weighted terms (they sum to ``loss``)."""
        cls_term = self.cls_weight * loss_cls
        con_term = self.con_weight * loss_con
        return {"loss": cls_term + con_term, "loss_cls": cls_term, "loss_con": con_term}


#: hyper-parameters of the joint objective cls_weight * BCE + con_weight * contrastive (both plugins)
_JOINT = {
    "cls_weight": Float(1.0, ge=0),
    "con_weight": Float(1.0, ge=0),
    "classify_views": Choice("first", "first", "all"),
}


@register_loss("supcon")
class SupCon(_ProjectedContrastive):
    """SupCon / SimCLR on projected views, optionally joint with BCE (spec 3.1).

    ``positive_rule``: ``"exact"`` (identical label sets), ``"any"`` (>= 1 shared label) or
    ``"simclr"`` (only other views of the same sample; needs ``data.num_views >= 2``).
    """

    num_views = 2

    #: hyper-parameters declared once (types, ranges, defaults; mlcl.config.validate reads them)
    hyperparams = {
        "temperature": Float(0.07, gt=0),
        "base_temperature": Float(0.07, gt=0),
        "contrast_mode": Choice("all", "all", "one"),
        "positive_rule": Choice("exact", "exact", "any", "simclr"),
        "proj_dims": List(None, item="int", ge=1, nullable=True),
        "proj_norm": Choice("none", "none", "bn"),
        "proj_dropout": Float(0.0, ge=0, lt=1),
        **_JOINT,
    }

    def projector_dims(self) -> list[int]:
        # reference "mlp" head: Linear(F, F) + ReLU + Linear(F, 128)
        return [self.feature_dim, 128] if self.proj_dims is None else list(self.proj_dims)

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        views = int(ctx.num_views)
        feats = outputs["features"]
        batch = feats.shape[0] // views
        loss_cls = self.classification(outputs["logits"], targets, views)

        # with identical-label positives one view suffices; SimCLR's only positives are other views
        if views < 2 and self.positive_rule == "simclr":
            if ctx.training:
                raise ValueError(
                    "supcon with positive_rule='simclr' needs at least two views per sample "
                    f"(got num_views={views}): set data.num_views=2"
                )
            return self.compose(loss_cls, feats.new_zeros(()))

        z = self.project(feats).view(views, batch, -1).transpose(0, 1)  # [B, V, D]
        y = _rows_of_first_view(targets, batch)
        z, y = self.all_gather(z, y)
        loss_con = supcon_loss(
            z,
            None if self.positive_rule == "simclr" else y,
            temperature=self.temperature,
            base_temperature=self.base_temperature,
            contrast_mode=self.contrast_mode,
            positive_rule="exact" if self.positive_rule == "simclr" else self.positive_rule,
        )["loss"]
        return self.compose(loss_cls, loss_con)


@register_loss("mulsupcon")
class MulSupCon(_ProjectedContrastive):
    """MulSupCon with a MoCo key encoder and a FIFO key/label queue (spec 3.2, 5.2).

    Queries = projections of view 1 (the trained encoder); keys = momentum-encoder projections of
    view 2 (``ctx.inputs`` rows ``B..2B``), followed by the queue once it has been filled. The key
    encoder (copy of ``model.backbone`` + of the projector) is made by :meth:`attach`, which the
    training module must call before loading a checkpoint (its weights are part of the state dict).
    """

    num_views = 2

    #: hyper-parameters declared once (types, ranges, defaults; mlcl.config.validate reads them)
    hyperparams = {
        "temperature": Float(0.1, gt=0),
        "weighting": Choice("mean", "mean", "per_sample"),
        "queue_size": Int(256, ge=0),
        "momentum": Float(0.999, ge=0, le=1),
        # null = the reference widths [256, 256]
        "proj_dims": List([256, 256], item="int", ge=1, nullable=True),
        "proj_norm": Choice("bn", "bn", "none"),
        "proj_dropout": Float(0.1, ge=0, lt=1),
        **_JOINT,
    }

    def __init__(self, **kwargs: Any) -> None:
        """The base keywords and hyper-parameters; then the key projector and the (empty) queue."""
        super().__init__(**kwargs)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.key_backbone: nn.Module | None = None
        # plain tuple so the online backbone is not registered (and saved) a second time here
        self._online: tuple[nn.Module, ...] = ()
        dims = self.projector_dims()
        out_dim = dims[-1] if dims else self.feature_dim
        self.register_buffer("queue_keys", torch.zeros(self.queue_size, out_dim))
        self.register_buffer("queue_labels", torch.zeros(self.queue_size, self.num_classes, dtype=torch.int8))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    def projector_dims(self) -> list[int]:
        # reference: Linear(F, 256) + BN + ReLU + Dropout(0.1) + Linear(256, 256)
        return [256, 256] if self.proj_dims is None else list(self.proj_dims)

    # ---------------------------------------------------------------- key encoder
    def attach(self, model: nn.Module) -> None:
        """Copy ``model.backbone`` as the momentum key backbone (no gradients)."""
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise TypeError("mulsupcon needs a model with a `backbone` module to copy as key encoder")
        self._online = (backbone,)
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)

    def _pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        online = list(self._online[0].parameters()) + list(self.projector.parameters())
        key = list(self.key_backbone.parameters()) + list(self.key_projector.parameters())
        return online, key

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``θ_k ← m θ_k + (1 − m) θ_q`` over backbone and projector parameters."""
        online, key = self._pairs()
        torch._foreach_lerp_(key, online, 1.0 - self.momentum)

    @torch.no_grad()
    def encode_keys(self, x: Tensor) -> Tensor:
        """L2-normalised key projections ``[B, D]`` of raw inputs ``x``."""
        from mlcl.models.backbones import pool  # same pooling as the module's ``encode``

        feats = pool(self.key_backbone(x))
        if feats.dtype in (torch.float16, torch.bfloat16):  # autocast output; float64 models stay float64
            feats = feats.float()
        return F.normalize(self.key_projector(feats), dim=1)

    # ---------------------------------------------------------------- queue
    @property
    def queue_full(self) -> bool:
        return self.queue_size > 0 and int(self.queue_count) >= self.queue_size

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        """FIFO write of ``keys`` ``[n, D]`` and multi-hot ``labels`` ``[n, C]`` (``-1`` -> 0)."""
        if self.queue_size == 0:
            return
        keys, labels = keys[-self.queue_size :], labels[-self.queue_size :]
        n = keys.shape[0]
        slots = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.queue_size
        self.queue_keys[slots] = keys.to(self.queue_keys.dtype)
        self.queue_labels[slots] = (labels == 1).to(self.queue_labels.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue_size)
        self.queue_count.clamp_(max=self.queue_size - n).add_(n)

    # ---------------------------------------------------------------- loss
    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        views = int(ctx.num_views)
        feats = outputs["features"]
        batch = feats.shape[0] // views
        loss_cls = self.classification(outputs["logits"], targets, views)

        if views != 2 or ctx.inputs is None:
            if not ctx.training:  # e.g. single-view validation: classification only
                return self.compose(loss_cls, feats.new_zeros(()))
            raise ValueError(
                "mulsupcon needs two views per sample and the raw inputs in ctx.inputs "
                f"(got num_views={views}): set data.num_views=2"
            )
        if self.key_backbone is None:
            raise RuntimeError("mulsupcon: call attach(model) before training (it builds the key encoder)")

        if ctx.training:
            self.momentum_update()
        q = self.project(feats[:batch])
        k = self.encode_keys(ctx.inputs[batch : 2 * batch])
        y = _rows_of_first_view(targets, batch)
        q, k, y = self.all_gather(q, k, y)

        keys, key_labels = k, y
        if self.queue_full:
            keys = torch.cat([k, self.queue_keys.to(k.dtype)])
            key_labels = torch.cat([(y == 1).to(self.queue_labels.dtype), self.queue_labels])
        loss_con = mulsupcon_loss(
            q, y, keys, key_labels, temperature=self.temperature, weighting=self.weighting
        )["loss"]
        if ctx.training:  # current keys were scored above, only now do they join the queue
            self.enqueue(k, y)
        return self.compose(loss_cls, loss_con)
