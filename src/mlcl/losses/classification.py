"""Classification baselines on logits (spec: baselines.md §2, contract §9).

Pure functions (one per method) plus their ``LossPlugin`` adapters:

* ASL family: :func:`bce_loss`, :func:`focal_loss`, :func:`asymmetric_loss` — reference "sum"
  reduction over all entries, ``unknown`` = how ``-1`` targets are treated.
* :func:`hill_loss`, :func:`splc_loss` (robust-loss-mlml).
* :func:`large_loss` (LL-R / LL-Ct) and :func:`large_loss_correction_mask` (LL-Cp helper).
* Single-positive baselines on probabilities with the ``-log(z + eps)`` convention:
  :func:`an_loss`, :func:`wan_loss`, :func:`epr_loss`, :func:`role_loss` (mean over all ``B*C``).

Targets are ``[B, C]`` in ``{1, 0, -1}`` (``-1`` = unobserved) of any integer or floating dtype.
Every function returns a dict of 0-dim tensors in the logits' dtype whose per-term keys sum to
``"loss"``; counters are detached. Half-precision logits are upcast to float32 internally.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcl.losses.base import LossContext, LossPlugin, register_loss

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

_REDUCTIONS = ("sum", "mean")
_UNKNOWN = ("negative", "ignore")


# ---------------------------------------------------------------------------------------- helpers
def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _working(logits: Tensor) -> Tensor:
    """Logits in a dtype accurate enough for log/sigmoid terms (half precision -> float32)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _out(dtype: torch.dtype, **terms: Tensor) -> dict[str, Tensor]:
    return {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in terms.items()}


def _split_sums(ell: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``[first . ell, second . ell]`` for constant ``[B, C]`` weights: both partial sums in one
    matrix-vector product (one autograd node instead of two masked reductions)."""
    weights = torch.stack((first, second)).reshape(2, -1)
    return weights @ ell.reshape(-1)


def _divisor(reduction: str, count: Tensor | int) -> Tensor | float:
    if reduction == "sum":
        return 1.0
    if isinstance(count, Tensor):
        return count.clamp(min=1)
    return float(max(count, 1))


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


# -------------------------------------------------------------------------- AN / WAN / EPR / ROLE
def _nl_observed(x: Tensor, pos: Tensor, eps: float) -> Tensor:
    """``-log(p + eps)`` on positives and ``-log(1 - p + eps)`` elsewhere, ``p = sigmoid(x)``."""
    return -(torch.sigmoid(x * (2.0 * pos.to(x.dtype) - 1.0)) + eps).log()


def _positive_regulariser(p: Tensor, expected_num_pos: float) -> Tensor:
    """``((1/B) sum_bc p - k)^2 / C^2`` (SPML's squared expected-positive regulariser)."""
    b, c = p.shape
    return (p.sum() / b - expected_num_pos).square() / (c * c)


def an_loss(logits: Tensor, targets: Tensor, *, eps: float = 1e-5) -> dict[str, Tensor]:
    """Assume-negative loss (§2.5): ``-log(p+eps)`` on positives, ``-log(1-p+eps)`` on every other
    entry (``0`` and ``-1``); mean over all ``B*C``. Returns ``loss``, ``loss_pos``, ``loss_neg``."""
    x = _working(logits)
    pos = targets == 1
    tp = pos.to(x.dtype)
    ell = _nl_observed(x, pos, eps)
    scale = 1.0 / x.numel()
    parts = _split_sums(ell, tp * scale, (1.0 - tp) * scale)
    return _out(logits.dtype, loss=parts.sum(), loss_pos=parts[0], loss_neg=parts[1])


def wan_loss(
    logits: Tensor, targets: Tensor, *, eps: float = 1e-5, neg_weight: float | None = None
) -> dict[str, Tensor]:
    """Weak assume-negative loss (§2.5): as :func:`an_loss` but unobserved (``-1``) entries are
    weighted by ``neg_weight`` (``None`` -> ``1/(C-1)``); observed negatives keep weight 1."""
    x = _working(logits)
    num_classes = x.shape[1]
    if neg_weight is None:
        if num_classes < 2:
            raise ValueError("wan_loss needs C >= 2 when neg_weight is None (gamma = 1/(C-1))")
        neg_weight = 1.0 / (num_classes - 1)
    pos = targets == 1
    tp = pos.to(x.dtype)
    unk = (targets == -1).to(x.dtype)
    ell = _nl_observed(x, pos, eps)
    scale = 1.0 / x.numel()
    w_neg = (1.0 - tp - unk) + neg_weight * unk
    parts = _split_sums(ell, tp * scale, w_neg * scale)
    return _out(logits.dtype, loss=parts.sum(), loss_pos=parts[0], loss_neg=parts[1])


def epr_loss(
    logits: Tensor, targets: Tensor, *, expected_num_pos: float, eps: float = 1e-5
) -> dict[str, Tensor]:
    """Expected-positive regulariser loss (§2.6): observed terms (unknowns contribute nothing)
    divided by ``B*C`` plus ``((1/B) sum p - expected_num_pos)^2 / C^2``.
    Returns ``loss``, ``loss_pos``, ``loss_neg``, ``loss_reg``."""
    x = _working(logits)
    pos = targets == 1
    tp = pos.to(x.dtype)
    tn = (targets == 0).to(x.dtype)
    ell = _nl_observed(x, pos, eps)
    scale = 1.0 / x.numel()
    parts = _split_sums(ell, tp * scale, tn * scale)
    reg = _positive_regulariser(torch.sigmoid(x), expected_num_pos)
    return _out(logits.dtype, loss=parts.sum() + reg, loss_pos=parts[0], loss_neg=parts[1], loss_reg=reg)


def role_loss(
    logits: Tensor, targets: Tensor, estimates: Tensor, *, expected_num_pos: float, eps: float = 1e-5
) -> dict[str, Tensor]:
    """Regularised online label estimation (§2.7).

    ``estimates`` ``[B, C]`` are the label estimates ``g = sigmoid(Theta[ids])`` in (0, 1). The
    classifier ``p`` learns from observed positives and the detached ``g``; the estimator ``g``
    from observed positives and the detached ``p``; observed negatives pull both down; both get
    the expected-positive regulariser. Returns ``loss``, ``loss_pos``, ``loss_cross``,
    ``loss_neg``, ``loss_reg`` (all normalised as in the total).
    """
    x = _working(logits)
    g = estimates if estimates.dtype == x.dtype else estimates.to(x.dtype)
    if g.shape != x.shape:
        raise ValueError(f"estimates {tuple(g.shape)} must match logits {tuple(x.shape)}")
    p = torch.sigmoid(x)
    nl_p = -(p + eps).log()
    nl_not_p = -(1.0 - p + eps).log()
    nl_g = -(g + eps).log()
    nl_not_g = -(1.0 - g + eps).log()
    p_sg = p.detach()
    g_sg = g.detach()
    half = 0.5 / x.numel()
    tp = (targets == 1).to(x.dtype) * half
    tn = (targets == 0).to(x.dtype) * half
    loss_pos = (tp * (nl_p + nl_g)).sum()
    cross = g_sg * nl_p + (1.0 - g_sg) * nl_not_p + p_sg * nl_g + (1.0 - p_sg) * nl_not_g
    loss_cross = cross.sum() * half
    loss_neg = (tn * (nl_not_p + nl_not_g)).sum()
    loss_reg = 0.5 * (_positive_regulariser(p, expected_num_pos) + _positive_regulariser(g, expected_num_pos))
    return _out(
        logits.dtype,
        loss=loss_pos + loss_cross + loss_neg + loss_reg,
        loss_pos=loss_pos,
        loss_cross=loss_cross,
        loss_neg=loss_neg,
        loss_reg=loss_reg,
    )


# ---------------------------------------------------------------------------------------- plugins
def _rows_targets(targets: Tensor, num_rows: int) -> Tensor:
    """Targets for every row of a view-major batch (given per row, or once per sample)."""
    if targets.shape[0] == num_rows:
        return targets
    if targets.shape[0] > 0 and num_rows % targets.shape[0] == 0:
        return targets.repeat(num_rows // targets.shape[0], 1)
    raise ValueError(f"targets have {targets.shape[0]} rows, logits {num_rows}")


class _LogitsPlugin(LossPlugin):
    """Base of the logit-only baselines: linear head, every row of every view is a sample."""

    head = "linear"

    def _logits_targets(self, outputs: dict[str, Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = outputs["logits"]
        targets = _rows_targets(targets, logits.shape[0])
        logits, targets = self.all_gather(logits, targets)
        return logits, targets


@register_loss("bce")
class BCE(_LogitsPlugin):
    """Binary cross-entropy (sum over entries by default, as in the ASL-family references)."""

    unknown_policy = "treated as negative (unknown='negative', default) or ignored (unknown='ignore')"

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        reduction: str = "sum",
        unknown: str = "negative",
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=feature_dim,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            gather=gather,
        )
        _check("reduction", reduction, _REDUCTIONS)
        _check("unknown", unknown, _UNKNOWN)
        self.reduction = reduction
        self.unknown = unknown

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits, targets = self._logits_targets(outputs, targets)
        return bce_loss(logits, targets, reduction=self.reduction, unknown=self.unknown)


@register_loss("focal")
class Focal(_LogitsPlugin):
    """Focal loss (no alpha balancing), detached modulating factor by default."""

    unknown_policy = "treated as negative (unknown='negative', default) or ignored (unknown='ignore')"

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        gamma: float = 2.0,
        eps: float = 1e-8,
        reduction: str = "sum",
        unknown: str = "negative",
        detach_focal_weight: bool = True,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=feature_dim,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            gather=gather,
        )
        _check("reduction", reduction, _REDUCTIONS)
        _check("unknown", unknown, _UNKNOWN)
        self.gamma = float(gamma)
        self.eps = float(eps)
        self.reduction = reduction
        self.unknown = unknown
        self.detach_focal_weight = bool(detach_focal_weight)

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits, targets = self._logits_targets(outputs, targets)
        return focal_loss(
            logits,
            targets,
            gamma=self.gamma,
            eps=self.eps,
            reduction=self.reduction,
            unknown=self.unknown,
            detach_focal_weight=self.detach_focal_weight,
        )


@register_loss("asl")
class ASL(_LogitsPlugin):
    """Asymmetric loss (published setting gamma_pos=0, gamma_neg=4, clip=0.05)."""

    unknown_policy = "treated as negative (unknown='negative', default) or ignored (unknown='ignore')"

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        reduction: str = "sum",
        unknown: str = "negative",
        detach_focal_weight: bool = True,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=feature_dim,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            gather=gather,
        )
        _check("reduction", reduction, _REDUCTIONS)
        _check("unknown", unknown, _UNKNOWN)
        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.clip = float(clip)
        self.eps = float(eps)
        self.reduction = reduction
        self.unknown = unknown
        self.detach_focal_weight = bool(detach_focal_weight)

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits, targets = self._logits_targets(outputs, targets)
        return asymmetric_loss(
            logits,
            targets,
            gamma_pos=self.gamma_pos,
            gamma_neg=self.gamma_neg,
            clip=self.clip,
            eps=self.eps,
            reduction=self.reduction,
            unknown=self.unknown,
            detach_focal_weight=self.detach_focal_weight,
        )


@register_loss("hill")
class Hill(_LogitsPlugin):
    """Hill loss: focal-margin positives, hill-shaped negative term ``(lamb - p) p^2``."""

    unknown_policy = "treated as negative (unknown='negative', default) or ignored (unknown='ignore')"

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        lamb: float = 1.5,
        margin: float = 1.0,
        gamma: float = 2.0,
        reduction: str = "sum",
        unknown: str = "negative",
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=feature_dim,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            gather=gather,
        )
        _check("reduction", reduction, _REDUCTIONS)
        _check("unknown", unknown, _UNKNOWN)
        self.lamb = float(lamb)
        self.margin = float(margin)
        self.gamma = float(gamma)
        self.reduction = reduction
        self.unknown = unknown

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits, targets = self._logits_targets(outputs, targets)
        return hill_loss(
            logits,
            targets,
            lamb=self.lamb,
            margin=self.margin,
            gamma=self.gamma,
            reduction=self.reduction,
            unknown=self.unknown,
        )


@register_loss("splc")
class SPLC(_LogitsPlugin):
    """Self-paced loss correction; uses ``ctx.epoch`` (0-based) for the correction start."""

    unknown_policy = (
        "treated as negative; from change_epoch on, any non-positive entry with sigmoid > tau is "
        "used as a positive"
    )

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        tau: float = 0.6,
        change_epoch: int = 1,
        margin: float = 1.0,
        gamma: float = 2.0,
        reduction: str = "sum",
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=feature_dim,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            gather=gather,
        )
        _check("reduction", reduction, _REDUCTIONS)
        self.tau = float(tau)
        self.change_epoch = int(change_epoch)
        self.margin = float(margin)
        self.gamma = float(gamma)
        self.reduction = reduction

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits, targets = self._logits_targets(outputs, targets)
        return splc_loss(
            logits,
            targets,
            epoch=int(ctx.epoch),
            tau=self.tau,
            change_epoch=self.change_epoch,
            margin=self.margin,
            gamma=self.gamma,
            reduction=self.reduction,
        )


@register_loss("large_loss")
class LargeLoss(_LogitsPlugin):
    """Large-loss rejection (``mode="reject"``, LL-R) or correction (``"correct"``, LL-Ct).

    The rejection rate follows the reference schedule ``r = (epoch_1based - 1) * delta_rel / 100``
    computed from the 0-based ``ctx.epoch`` (so the first epoch is plain assume-negative BCE).
    """

    unknown_policy = (
        "treated as negative, except the unobserved entries with the largest losses, which are "
        "rejected (LL-R) or flipped to positive (LL-Ct)"
    )

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        mode: str = "reject",
        delta_rel: float = 0.2,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=feature_dim,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            gather=gather,
        )
        _check("mode", mode, ("reject", "correct"))
        self.mode = mode
        self.delta_rel = float(delta_rel)

    def rejection_rate(self, epoch: int) -> float:
        """``r`` for a 0-based epoch index (``epoch * delta_rel / 100``)."""
        return max(int(epoch), 0) * self.delta_rel / 100.0

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits, targets = self._logits_targets(outputs, targets)
        return large_loss(logits, targets, rejection_rate=self.rejection_rate(ctx.epoch), mode=self.mode)


@register_loss("an")
class AN(_LogitsPlugin):
    """Assume-negative loss on probabilities (mean over all entries, ``-log(z + eps)``)."""

    unknown_policy = "treated as negative"

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=feature_dim,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            gather=gather,
        )
        self.eps = float(eps)

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits, targets = self._logits_targets(outputs, targets)
        return an_loss(logits, targets, eps=self.eps)


@register_loss("wan")
class WAN(_LogitsPlugin):
    """Weak assume-negative loss: unobserved entries are negatives down-weighted by ``neg_weight``."""

    unknown_policy = "treated as negative with weight neg_weight (default 1/(C-1))"

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        eps: float = 1e-5,
        neg_weight: float | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=feature_dim,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            gather=gather,
        )
        self.eps = float(eps)
        self.neg_weight = None if neg_weight is None else float(neg_weight)

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits, targets = self._logits_targets(outputs, targets)
        return wan_loss(logits, targets, eps=self.eps, neg_weight=self.neg_weight)


@register_loss("epr")
class EPR(_LogitsPlugin):
    """Observed-label loss plus the expected-positive regulariser (``expected_num_pos`` per image)."""

    unknown_policy = (
        "ignored by the observed-label terms; only the batch-level positive-count regulariser sees them"
    )

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        expected_num_pos: float = 2.9,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=feature_dim,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            gather=gather,
        )
        self.expected_num_pos = float(expected_num_pos)
        self.eps = float(eps)

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits, targets = self._logits_targets(outputs, targets)
        return epr_loss(logits, targets, expected_num_pos=self.expected_num_pos, eps=self.eps)


@register_loss("role")
class ROLE(_LogitsPlugin):
    """Regularised online label estimation with a learnable per-sample label matrix.

    Owns ``theta`` ``[num_samples, C]`` (estimates ``sigmoid(theta[ids])``), indexed by
    ``ctx.indices``. Call :meth:`init_estimates` once with the (missing-label-masked) training
    targets; before that every entry is initialised like an unobserved one. ``theta`` is trained
    with ``lr_mult`` times the base learning rate and no weight decay (reference: plain Adam).
    """

    unknown_policy = (
        "learned: the classifier is trained towards the per-sample label estimates, which are "
        "trained towards the classifier and the expected positive count"
    )

    #: initial estimate of observed positives / negatives; unobserved ~ U[-logit(0.6), logit(0.6)]
    init_pos: float = 0.995
    init_neg: float = 0.005
    init_unknown_prob: float = 0.6

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        expected_num_pos: float = 2.9,
        eps: float = 1e-5,
        lr_mult: float = 10.0,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            feature_dim=feature_dim,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            gather=gather,
        )
        if self.num_samples <= 0:
            raise ValueError("ROLE needs num_samples > 0 (one label-estimate row per training sample)")
        self.expected_num_pos = float(expected_num_pos)
        self.eps = float(eps)
        self.lr_mult = float(lr_mult)
        self.theta = nn.Parameter(self._unknown_init(self.num_samples, self.num_classes))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def _logit(p: float) -> float:
        # the reference clamps probabilities to [1e-5, 1 - 1e-5] before the logit
        q = min(max(p, 1e-5), 1.0 - 1e-5)
        return math.log(q / (1.0 - q))

    def _unknown_init(self, n: int, c: int, device: torch.device | None = None) -> Tensor:
        a = self._logit(self.init_unknown_prob)
        return (2.0 * torch.rand(n, c, device=device) - 1.0) * a

    @torch.no_grad()
    def init_estimates(self, targets_all: Tensor) -> None:
        """Initialise ``theta`` from the training targets ``[N, C]`` in ``{1, 0, -1}``."""
        if tuple(targets_all.shape) != tuple(self.theta.shape):
            raise ValueError(f"targets_all {tuple(targets_all.shape)} != theta {tuple(self.theta.shape)}")
        t = targets_all.to(self.theta.device)
        theta = self._unknown_init(*self.theta.shape, device=self.theta.device).to(self.theta.dtype)
        theta = torch.where(t == 1, self._logit(self.init_pos), theta)
        theta = torch.where(t == 0, self._logit(self.init_neg), theta)
        self.theta.copy_(theta)
        self.initialised.fill_(True)

    def estimates(self, indices: Tensor | None = None) -> Tensor:
        """Label estimates ``sigmoid(theta)`` of the given rows (all rows when ``None``)."""
        theta = self.theta if indices is None else self.theta[indices.to(self.theta.device)]
        return torch.sigmoid(theta)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.theta], "lr_mult": self.lr_mult, "weight_decay": 0.0}]

    def on_train_targets(self, targets: Tensor) -> None:
        """The training module hands over the (masked) training targets once: initialise Θ."""
        self.init_estimates(targets)

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits = outputs["logits"]
        targets = _rows_targets(targets, logits.shape[0])
        est = self.estimates(ctx.indices)
        if est.shape != logits.shape:
            raise ValueError(f"ctx.indices select {est.shape[0]} rows, logits have {logits.shape[0]}")
        logits, targets, est = self.all_gather(logits, targets, est)
        return role_loss(logits, targets, est, expected_num_pos=self.expected_num_pos, eps=self.eps)
