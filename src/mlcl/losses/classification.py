"""Classification baselines on logits (spec: baselines.md §2, contract §9).

Pure functions (one per method) plus their ``LossPlugin`` adapters:

* ASL family: :func:`bce_loss`, :func:`focal_loss`, :func:`asymmetric_loss` — reference "sum"
  reduction over all entries, ``unknown`` = how ``-1`` targets are treated.
* :func:`hill_loss`, :func:`splc_loss` (robust-loss-mlml).
* :func:`large_loss` (LL-R / LL-Ct) and :func:`large_loss_correction_mask` (LL-Cp helper).
* Single-positive baselines :func:`an_loss`, :func:`wan_loss`, :func:`epr_loss`, :func:`role_loss`
  (defined in :mod:`mlcl.losses.spml`, re-exported here).

Each plugin declares its hyper-parameters once, as ``hyperparams`` (types, ranges, defaults): the
constructor checks and stores them and :func:`mlcl.config.validate` checks a config against them.

Targets are ``[B, C]`` in ``{1, 0, -1}`` (``-1`` = unobserved) of any integer or floating dtype.
Every function returns a dict of 0-dim tensors in the logits' dtype whose per-term keys sum to
``"loss"``; counters are detached. Half-precision logits are upcast to float32 internally.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl.config.params import Bool, Choice, Float, Int
from mlcl.losses.base import LossContext, register_loss
from mlcl.losses.logit_utils import REDUCTIONS as _REDUCTIONS
from mlcl.losses.logit_utils import UNKNOWN as _UNKNOWN
from mlcl.losses.logit_utils import LogitsPlugin
from mlcl.losses.logit_utils import check_choice as _check
from mlcl.losses.logit_utils import divisor as _divisor
from mlcl.losses.logit_utils import out as _out
from mlcl.losses.logit_utils import split_sums as _split_sums
from mlcl.losses.logit_utils import working as _working
from mlcl.losses.spml import AN, EPR, ROLE, WAN, an_loss, epr_loss, role_loss, wan_loss

__all__ = [
    "AN",
    "ASL",
    "BCE",
    "EPR",
    "ROLE",
    "SPLC",
    "WAN",
    "Focal",
    "Hill",
    "LargeLoss",
    "an_loss",
    "asymmetric_loss",
    "bce_loss",
    "epr_loss",
    "focal_loss",
    "hill_loss",
    "large_loss",
    "large_loss_correction_mask",
    "role_loss",
    "splc_loss",
    "wan_loss",
]


# ------------------------------------------------------------------------------------ ASL family
def _asl_family(
    logits: Tensor,
    targets: Tensor,
    *,
    gamma_pos: float,
    gamma_neg: float,
    clip: float | None,
    eps: float | None,
    reduction: str,
    unknown: str,
    detach_focal_weight: bool,
) -> dict[str, Tensor]:
    """Shared body of BCE / focal / ASL (§2.1); ``eps=None`` means log-sigmoid without clamp."""
    _check("reduction", reduction, _REDUCTIONS)
    _check("unknown", unknown, _UNKNOWN)
    x = _working(logits)
    pos = targets == 1
    tp = pos.to(x.dtype)
    # ignored entries get zero weight in both halves (and z = 0 below, which is harmless)
    tn = (targets == 0).to(x.dtype) if unknown == "ignore" else 1.0 - tp
    # Flipping the sign of the negatives' logits makes sigmoid give p on positives and 1 - p on
    # negatives, so both halves share one sigmoid/log (and one backward node each).
    z = x * (tp - tn)
    if unknown == "ignore" and reduction == "mean":
        scale = -1.0 / (tp + tn).sum().clamp(min=1)
    else:
        scale = -1.0 / _divisor(reduction, x.numel())

    if eps is None:
        ell = F.logsigmoid(z)
        plain = True
    else:
        shifted = clip is not None and clip > 0
        # probability margin on negatives only: q = min(1 - p + m, 1)
        u = torch.add(z.sigmoid(), tn, alpha=clip) if shifted else z.sigmoid()
        ell = u.clamp(min=eps, max=1.0 if shifted else None).log()
        plain = gamma_pos == 0 and gamma_neg == 0
        if not plain and not detach_focal_weight:
            base = (1.0 - u).clamp(min=0.0) if shifted else 1.0 - u
            w = (
                base.pow(gamma_pos)
                if gamma_pos == gamma_neg
                else torch.where(pos, base.pow(gamma_pos), base.pow(gamma_neg))
            )
            ell = ell * w
            plain = True
    # Constant [2, B, C] weights (masks x detached focal factors x reduction scale), built in
    # place: both partial sums then come from one matrix-vector product.
    with torch.no_grad():
        weights = x.new_empty((2, *x.shape))
        if plain:
            weights[0] = tp
            weights[1] = tn
        else:
            base = (1.0 - u).clamp_(min=0.0) if shifted else 1.0 - u
            if gamma_pos == 0:
                weights[0] = tp
            else:
                torch.pow(base, gamma_pos, out=weights[0]).mul_(tp)
            torch.pow(base, gamma_neg, out=weights[1]).mul_(tn)
        weights.mul_(scale)
    parts = weights.view(2, -1) @ ell.reshape(-1)
    return _out(logits.dtype, loss=parts.sum(), loss_pos=parts[0], loss_neg=parts[1])


def bce_loss(
    logits: Tensor, targets: Tensor, *, reduction: str = "sum", unknown: str = "negative"
) -> dict[str, Tensor]:
    """Binary cross-entropy on logits ``[B, C]`` with log-sigmoid (no eps clamp) (§2.1).

    ``unknown="negative"`` treats ``-1`` as ``0``; ``"ignore"`` drops those entries (also from the
    ``"mean"`` divisor). Returns ``loss``, ``loss_pos`` (entries with target 1), ``loss_neg``.
    """
    return _asl_family(
        logits,
        targets,
        gamma_pos=0.0,
        gamma_neg=0.0,
        clip=None,
        eps=None,
        reduction=reduction,
        unknown=unknown,
        detach_focal_weight=True,
    )


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    gamma: float = 2.0,
    eps: float = 1e-8,
    reduction: str = "sum",
    unknown: str = "negative",
    detach_focal_weight: bool = True,
) -> dict[str, Tensor]:
    """Focal loss without alpha balancing (ASL with ``gamma_pos = gamma_neg = gamma``, no clip).

    Logs are clamped at ``eps``; the modulating factor is a constant when ``detach_focal_weight``
    (reference training scripts). Keys and ``unknown``/``reduction`` as :func:`bce_loss`.
    """
    return _asl_family(
        logits,
        targets,
        gamma_pos=gamma,
        gamma_neg=gamma,
        clip=None,
        eps=eps,
        reduction=reduction,
        unknown=unknown,
        detach_focal_weight=detach_focal_weight,
    )


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    reduction: str = "sum",
    unknown: str = "negative",
    detach_focal_weight: bool = True,
) -> dict[str, Tensor]:
    """Asymmetric loss (ASL, §2.1) on logits ``[B, C]``.

    Positives: ``-(1-p)^gamma_pos log(max(p, eps))``; negatives with ``q = min(1-p+clip, 1)``:
    ``-(1-q)^gamma_neg log(max(q, eps))``. Keys and ``unknown``/``reduction`` as :func:`bce_loss`.
    """
    return _asl_family(
        logits,
        targets,
        gamma_pos=gamma_pos,
        gamma_neg=gamma_neg,
        clip=clip,
        eps=eps,
        reduction=reduction,
        unknown=unknown,
        detach_focal_weight=detach_focal_weight,
    )


# ----------------------------------------------------------------------------------- Hill / SPLC
def hill_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    lamb: float = 1.5,
    margin: float = 1.0,
    gamma: float = 2.0,
    reduction: str = "sum",
    unknown: str = "negative",
) -> dict[str, Tensor]:
    """Hill loss (§2.2): positives ``-(1-p_m)^gamma log p_m`` with ``p_m = sigmoid(x - margin)``
    (gradient through the weight), negatives ``(lamb - p) p^2``. Keys/keywords as :func:`bce_loss`.
    """
    _check("reduction", reduction, _REDUCTIONS)
    _check("unknown", unknown, _UNKNOWN)
    x = _working(logits)
    pos = targets == 1
    neg = (targets == 0) if unknown == "ignore" else ~pos
    tp = pos.to(x.dtype)
    tn = neg.to(x.dtype)
    xm = x - margin
    pos_term = -torch.sigmoid(-xm).pow(gamma) * F.logsigmoid(xm)
    p = torch.sigmoid(x)
    neg_term = (lamb - p) * p.square()
    ell = torch.where(pos, pos_term, neg_term)
    count = (tp + tn).sum() if unknown == "ignore" else x.numel()
    scale = 1.0 / _divisor(reduction, count)
    parts = _split_sums(ell, tp * scale, tn * scale)
    return _out(logits.dtype, loss=parts.sum(), loss_pos=parts[0], loss_neg=parts[1])


def splc_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    epoch: int,
    tau: float = 0.6,
    change_epoch: int = 1,
    margin: float = 1.0,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> dict[str, Tensor]:
    """Self-paced loss correction (§2.3) on logits ``[B, C]``; ``epoch`` is 0-based.

    Labelled positives get the logit margin; from ``change_epoch`` on, every non-positive entry
    (``0`` or ``-1``) with ``sigmoid(x) > tau`` is used as a positive (decision without gradient).
    Focal-margin terms with gradient through the focal factors; ``"mean"`` divides by ``B*C``.
    Returns ``loss``, ``loss_pos`` (corrected included), ``loss_neg``, ``num_corrected``.
    """
    _check("reduction", reduction, _REDUCTIONS)
    x = _working(logits)
    pos = targets == 1
    xm = x - margin * pos.to(x.dtype)
    if epoch >= change_epoch:
        with torch.no_grad():
            corrected = ~pos & (torch.sigmoid(xm) > tau)
        use_pos = pos | corrected
    else:
        corrected = torch.zeros_like(pos)
        use_pos = pos
    p = torch.sigmoid(xm)
    pos_term = -torch.sigmoid(-xm).pow(gamma) * F.logsigmoid(xm)
    neg_term = -p.pow(gamma) * F.logsigmoid(-xm)
    ell = torch.where(use_pos, pos_term, neg_term)
    tq = use_pos.to(x.dtype)
    scale = 1.0 / _divisor(reduction, x.numel())
    parts = _split_sums(ell, tq * scale, (1.0 - tq) * scale)
    return _out(
        logits.dtype,
        loss=parts.sum(),
        loss_pos=parts[0],
        loss_neg=parts[1],
        num_corrected=corrected.sum().to(x.dtype),
    )


# ------------------------------------------------------------------------------------ Large loss
def _large_loss_selection(z: Tensor, unk: Tensor, rejection_rate: float) -> tuple[Tensor, Tensor]:
    """Unobserved losses ``u`` (0 elsewhere, detached) and the threshold ``theta`` = k-th largest."""
    with torch.no_grad():
        u = torch.where(unk, -F.logsigmoid(z), torch.zeros((), dtype=z.dtype, device=z.device))
        k = math.ceil(u.numel() * rejection_rate)
        theta = torch.topk(u.reshape(-1), k, sorted=False).values.min()
    return u, theta


def _check_rate(rejection_rate: float) -> float:
    r = float(rejection_rate)
    if not 0.0 <= r < 1.0:
        raise ValueError(f"rejection_rate must be in [0, 1), got {r}")
    return r


def large_loss(
    logits: Tensor, targets: Tensor, *, rejection_rate: float, mode: str = "reject"
) -> dict[str, Tensor]:
    """Large-loss rejection / correction (LL-R / LL-Ct, §2.4) on logits ``[B, C]``.

    All non-positives are BCE negatives; among unobserved (``-1``) entries, those whose loss is at
    least the ``ceil(B*C*rejection_rate)``-th largest unobserved loss (ties included) are zeroed
    (``"reject"``) or flipped to positive targets (``"correct"``). Divided by all ``B*C`` entries;
    ``rejection_rate = 0`` is plain assume-negative BCE. Returns ``loss``, ``num_rejected``.
    """
    _check("mode", mode, ("reject", "correct"))
    r = _check_rate(rejection_rate)
    x = _working(logits)
    pos = targets == 1
    z = x * (2.0 * pos.to(x.dtype) - 1.0)
    ell = -F.logsigmoid(z)
    if r == 0.0:
        return _out(logits.dtype, loss=ell.mean(), num_rejected=x.new_zeros(()))
    unk = targets == -1
    u, theta = _large_loss_selection(z.detach(), unk, r)
    selected = unk & (u >= theta)
    if mode == "reject":
        ell = ell.masked_fill(selected, 0.0)
    else:
        ell = torch.where(selected, -F.logsigmoid(-z), ell)
    return _out(logits.dtype, loss=ell.sum() / x.numel(), num_rejected=selected.sum().to(x.dtype))


def large_loss_correction_mask(logits: Tensor, targets: Tensor, *, rejection_rate: float) -> Tensor:
    """LL-Cp helper (§2.4): boolean ``[B, C]`` mask ``{y = -1 and u > theta}`` of unobserved labels
    to switch permanently to positive after the step (``rejection_rate`` = the constant ``delta``).
    """
    r = _check_rate(rejection_rate)
    unk = targets == -1
    if r == 0.0:
        return torch.zeros_like(unk)
    x = _working(logits).detach()
    z = x * (2.0 * (targets == 1).to(x.dtype) - 1.0)
    u, theta = _large_loss_selection(z, unk, r)
    return unk & (u > theta)


# ---------------------------------------------------------------------------------------- plugins
# hyper-parameters shared by several plugins (declared once; ranges checked on construction and by
# mlcl.config.validate before anything is built)
_REDUCTION = Choice("sum", *_REDUCTIONS, doc="sum over all B*C entries (reference) or mean")
_UNKNOWN_P = Choice("negative", *_UNKNOWN, doc="-1 targets: treated as 0, or dropped")
_GAMMA = Float(2.0, ge=0, doc="focusing exponent")
_LOG_EPS = Float(1e-8, gt=0, lt=1, doc="clamp of the probabilities inside the log")
_MARGIN = Float(1.0, ge=0, doc="logit margin of the positive term")
_DETACH = Bool(True, doc="focal weight treated as a constant")


@register_loss("bce")
class BCE(LogitsPlugin):
    """Binary cross-entropy (sum over entries by default, as in the ASL-family references)."""

    hyperparams = {"reduction": _REDUCTION, "unknown": _UNKNOWN_P}
    loss_fn = staticmethod(bce_loss)


@register_loss("focal")
class Focal(LogitsPlugin):
    """Focal loss (no alpha balancing), detached modulating factor by default."""

    hyperparams = {
        "gamma": _GAMMA,
        "eps": _LOG_EPS,
        "reduction": _REDUCTION,
        "unknown": _UNKNOWN_P,
        "detach_focal_weight": _DETACH,
    }
    loss_fn = staticmethod(focal_loss)


@register_loss("asl")
class ASL(LogitsPlugin):
    """Asymmetric loss (published setting gamma_pos=0, gamma_neg=4, clip=0.05)."""

    hyperparams = {
        "gamma_pos": Float(0.0, ge=0, doc="focusing exponent on positives"),
        "gamma_neg": Float(4.0, ge=0, doc="focusing exponent on negatives"),
        "clip": Float(0.05, ge=0, lt=1, doc="probability margin of the negatives"),
        "eps": _LOG_EPS,
        "reduction": _REDUCTION,
        "unknown": _UNKNOWN_P,
        "detach_focal_weight": _DETACH,
    }
    loss_fn = staticmethod(asymmetric_loss)


@register_loss("hill")
class Hill(LogitsPlugin):
    """Hill loss: focal-margin positives, hill-shaped negative term ``(lamb - p) p^2``."""

    hyperparams = {
        "lamb": Float(1.5, gt=0, doc="lambda of the negative term"),
        "margin": _MARGIN,
        "gamma": _GAMMA,
        "reduction": _REDUCTION,
        "unknown": _UNKNOWN_P,
    }
    loss_fn = staticmethod(hill_loss)


@register_loss("splc")
class SPLC(LogitsPlugin):
    """Self-paced loss correction; uses ``ctx.epoch`` (0-based) for the correction start."""

    unknown_policy = (
        "treated as negative; from change_epoch on, any non-positive entry with sigmoid > tau is "
        "used as a positive"
    )
    hyperparams = {
        "tau": Float(0.6, ge=0, le=1, doc="correction threshold on sigmoid(x)"),
        "change_epoch": Int(1, ge=0, doc="0-based epoch the correction starts"),
        "margin": _MARGIN,
        "gamma": _GAMMA,
        "reduction": _REDUCTION,
    }
    loss_fn = staticmethod(splc_loss)

    def loss_kwargs(self, ctx: LossContext) -> dict[str, Any]:
        return {**super().loss_kwargs(ctx), "epoch": int(ctx.epoch)}


@register_loss("large_loss")
class LargeLoss(LogitsPlugin):
    """Large-loss rejection (``mode="reject"``, LL-R) or correction (``"correct"``, LL-Ct).

    The rejection rate follows the reference schedule ``r = (epoch_1based - 1) * delta_rel / 100``
    computed from the 0-based ``ctx.epoch`` (so the first epoch is plain assume-negative BCE).
    """

    unknown_policy = (
        "treated as negative, except the unobserved entries with the largest losses, which are "
        "rejected (LL-R) or flipped to positive (LL-Ct)"
    )
    hyperparams = {
        "mode": Choice("reject", "reject", "correct", doc="LL-R (reject) or LL-Ct (correct)"),
        "delta_rel": Float(0.2, ge=0, lt=100, doc="rejection-rate growth in percent per epoch"),
    }
    loss_fn = staticmethod(large_loss)

    def rejection_rate(self, epoch: int) -> float:
        """``r`` for a 0-based epoch index (``epoch * delta_rel / 100``)."""
        return max(int(epoch), 0) * self.delta_rel / 100.0

    def loss_kwargs(self, ctx: LossContext) -> dict[str, Any]:
        return {"rejection_rate": self.rejection_rate(ctx.epoch), "mode": self.mode}
