"""Training callbacks: exponential moving average of the weights (EMA)."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)


class EMA(L.Callback):
    """Keep ``shadow = decay * shadow + (1 - decay) * weights`` after every optimiser step.

    Floating parameters and buffers are averaged; integer buffers (``num_batches_tracked``) are
    copied. Validation and test run on the averaged weights (``evaluate="ema"``) and the raw
    weights are restored afterwards. The shadow is saved in checkpoints (``checkpoint["ema"]``),
    so resuming is exact and ``mlcl-eval`` / MulCon stage two can load the EMA weights.
    """

    def __init__(self, decay: float = 0.9997, evaluate: str = "ema") -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        if evaluate not in ("ema", "raw"):
            raise ValueError(f"ema.evaluate must be 'ema' or 'raw', got {evaluate!r}")
        self.decay, self.evaluate = float(decay), evaluate
        self.shadow: dict[str, Tensor] | None = None
        self._backup: dict[str, Tensor] | None = None

    @staticmethod
    def _state(module: L.LightningModule) -> dict[str, Tensor]:
        return {
            k: v for k, v in module.state_dict().items() if not k.startswith(("val_metrics", "test_metrics"))
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.shadow is None:
            self.shadow = {k: v.detach().clone() for k, v in self._state(pl_module).items()}
        else:  # restored from a checkpoint
            self.shadow = {k: v.to(pl_module.device) for k, v in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        assert self.shadow is not None
        for k, v in self._state(pl_module).items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.detach(), 1.0 - self.decay)
            else:
                s.copy_(v)

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if self.evaluate != "ema" or self.shadow is None or self._backup is not None:
            return
        self._backup = {k: v.detach().clone() for k, v in self._state(pl_module).items()}
        pl_module.load_state_dict(self.shadow, strict=False)

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._backup is not None:
            pl_module.load_state_dict(self._backup, strict=False)
            self._backup = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.shadow is not None:
            checkpoint["ema"] = {k: v.detach().cpu() for k, v in self.shadow.items()}
            if self._backup is not None:  # saved while EMA weights are swapped in: store the raw ones
                checkpoint["state_dict"].update({k: v.detach().cpu() for k, v in self._backup.items()})

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self.shadow = {k: v.clone() for k, v in checkpoint["ema"].items()}
