"""Helpers shared by the logit-based losses (classification and SPML baselines) and their plugin base."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mlcl.losses.base import LossContext, LossPlugin

REDUCTIONS = ("sum", "mean")
UNKNOWN = ("negative", "ignore")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def working(logits: Tensor) -> Tensor:
    """Logits in a dtype accurate enough for log/sigmoid terms (half precision -> float32)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def out(dtype: torch.dtype, **terms: Tensor) -> dict[str, Tensor]:
    """Every term cast to ``dtype`` (the logits' dtype)."""
    return {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in terms.items()}


def split_sums(ell: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``[first . ell, second . ell]`` for constant ``[B, C]`` weights: both partial sums in one
    matrix-vector product (one autograd node instead of two masked reductions)."""
    weights = torch.stack((first, second)).reshape(2, -1)
    return weights @ ell.reshape(-1)


def divisor(reduction: str, count: Tensor | int) -> Tensor | float:
    """1 for ``"sum"``, else the (at least 1) entry count."""
    if reduction == "sum":
        return 1.0
    if isinstance(count, Tensor):
        return count.clamp(min=1)
    return float(max(count, 1))


def rows_targets(targets: Tensor, num_rows: int) -> Tensor:
    """Targets for every row of a view-major batch (given per row, or once per sample)."""
    if targets.shape[0] == num_rows:
        return targets
    if targets.shape[0] > 0 and num_rows % targets.shape[0] == 0:
        return targets.repeat(num_rows // targets.shape[0], 1)
    raise ValueError(f"targets have {targets.shape[0]} rows, logits {num_rows}")


class LogitsPlugin(LossPlugin):
    """Base of the logit-only baselines: linear head, every row of every view is a sample.

    Subclasses declare ``hyperparams`` (name -> :class:`~mlcl.config.params.Param`) and ``loss_fn`` (the pure
    function); the constructor checks the keywords against ``hyperparams`` and stores them as attributes,
    and :meth:`forward` calls ``loss_fn(logits, targets, **hyper-parameters)``.
    """

    head = "linear"
    unknown_policy = "treated as negative (unknown='negative', default) or ignored (unknown='ignore')"
    hyperparams_as_keywords = True
    loss_fn: Any = None

    def _logits_targets(self, outputs: dict[str, Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = outputs["logits"]
        targets = rows_targets(targets, logits.shape[0])
        logits, targets = self.all_gather(logits, targets)
        return logits, targets

    def loss_kwargs(self, ctx: LossContext) -> dict[str, Any]:
        """Keywords of ``loss_fn`` besides logits and targets (the hyper-parameters by default)."""
        return {name: getattr(self, name) for name in self.hyperparams}

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        logits, targets = self._logits_targets(outputs, targets)
        return type(self).loss_fn(logits, targets, **self.loss_kwargs(ctx))
