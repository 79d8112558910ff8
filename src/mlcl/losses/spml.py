"""Single-positive (SPML) baselines on probabilities with the ``-log(z + eps)`` convention (spec:
baselines.md §2.5-2.7): :func:`an_loss`, :func:`wan_loss`, :func:`epr_loss`, :func:`role_loss`, each a
mean over all ``B*C`` entries, and their plugins (re-exported by :mod:`mlcl.losses.classification`,
which the YAMLs' ``_target_`` names).

Targets are ``[B, C]`` in ``{1, 0, -1}`` (``-1`` = unobserved); every function returns a dict of 0-dim
tensors in the logits' dtype (half precision is upcast to float32 internally).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mlcl.config.params import Float
from mlcl.losses.base import LossContext, register_loss
from mlcl.losses.logit_utils import LogitsPlugin, rows_targets
from mlcl.losses.logit_utils import out as _out
from mlcl.losses.logit_utils import split_sums as _split_sums
from mlcl.losses.logit_utils import working as _working

__all__ = ["AN", "EPR", "ROLE", "WAN", "an_loss", "epr_loss", "role_loss", "wan_loss"]


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
_SPML_EPS = Float(1e-5, gt=0, lt=1, doc="shift inside the log, -log(z + eps)")
_EXPECTED_POS = Float(2.9, gt=0, doc="expected positives per image")


@register_loss("an")
class AN(LogitsPlugin):
    """Assume-negative loss on probabilities (mean over all entries, ``-log(z + eps)``)."""

    unknown_policy = "treated as negative"
    hyperparams = {"eps": _SPML_EPS}
    loss_fn = staticmethod(an_loss)


@register_loss("wan")
class WAN(LogitsPlugin):
    """Weak assume-negative loss: unobserved entries are negatives down-weighted by ``neg_weight``."""

    unknown_policy = "treated as negative with weight neg_weight (default 1/(C-1))"
    hyperparams = {
        "eps": _SPML_EPS,
        "neg_weight": Float(None, ge=0, nullable=True, doc="weight of unobserved negatives; null = 1/(C-1)"),
    }
    loss_fn = staticmethod(wan_loss)


@register_loss("epr")
class EPR(LogitsPlugin):
    """Observed-label loss plus the expected-positive regulariser (``expected_num_pos`` per image)."""

    unknown_policy = (
        "ignored by the observed-label terms; only the batch-level positive-count regulariser sees them"
    )
    hyperparams = {"expected_num_pos": _EXPECTED_POS, "eps": _SPML_EPS}
    loss_fn = staticmethod(epr_loss)


@register_loss("role")
class ROLE(LogitsPlugin):
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
    hyperparams = {
        "expected_num_pos": _EXPECTED_POS,
        "eps": _SPML_EPS,
        "lr_mult": Float(10.0, gt=0, doc="learning-rate multiplier of the label estimates"),
    }

    #: initial estimate of observed positives / negatives; unobserved ~ U[-logit(0.6), logit(0.6)]
    init_pos: float = 0.995
    init_neg: float = 0.005
    init_unknown_prob: float = 0.6

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.num_samples <= 0:
            raise ValueError("ROLE needs num_samples > 0 (one label-estimate row per training sample)")
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
        targets = rows_targets(targets, logits.shape[0])
        est = self.estimates(ctx.indices)
        if est.shape != logits.shape:
            raise ValueError(f"ctx.indices select {est.shape[0]} rows, logits have {logits.shape[0]}")
        logits, targets, est = self.all_gather(logits, targets, est)
        return role_loss(logits, targets, est, expected_num_pos=self.expected_num_pos, eps=self.eps)
