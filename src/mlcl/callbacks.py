"""Training callbacks: exponential moving average of the weights (EMA), the skipped-step budget, and
:func:`build_callbacks`, which turns the ``callbacks`` config group into callback objects."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mlcl.errors import UserError

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

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._step_before = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        assert self.shadow is not None
        # only after a real optimiser step: gradient accumulation and skipped (non-finite) steps leave
        # the weights unchanged and must not pull the shadow towards them again
        if trainer.global_step == getattr(self, "_step_before", -1):
            return
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


class SkipBudget(L.Callback):
    """Stop the run when more than ``max_fraction`` of the training steps so far were skipped.

    ``model.on_nonfinite=skip`` skips steps whose loss is NaN/inf; a diverged run would otherwise
    skip every step and finish at chance level with exit status 0. The share is checked at every
    epoch end and, once ``min_steps`` batches were seen, after every batch. Counts are kept in the
    checkpoint, so a resumed run continues them; :attr:`skipped` is reported in ``metrics.json``.
    """

    def __init__(self, max_fraction: float = 0.1, min_steps: int = 50) -> None:
        self.max_fraction, self.min_steps = float(max_fraction), int(min_steps)
        self.seen, self.skipped, self._module_count = 0, 0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._module_count = int(getattr(pl_module, "skipped_steps", 0))

    def _check(self) -> None:
        if self.seen and self.skipped > self.max_fraction * self.seen:
            raise UserError(
                f"{self.skipped} of {self.seen} training steps had a non-finite loss and were skipped "
                f"(more than {self.max_fraction:.0%}); the run has diverged",
                "model.on_nonfinite=skip, model.max_skipped_fraction",
                "lower optimizer.lr, use trainer.precision=32 or trainer.gradient_clip_val=1.0, or raise "
                "model.max_skipped_fraction",
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        count = int(getattr(pl_module, "skipped_steps", 0))
        self.seen += 1
        self.skipped += count - self._module_count
        self._module_count = count
        if self.seen >= self.min_steps:
            self._check()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check()

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen, self.skipped = int(state_dict["seen"]), int(state_dict["skipped"])


def build_callbacks(
    cfg: DictConfig, run_dir: Path, with_logger: bool = True, debug: bool = False
) -> list[L.Callback]:
    """Instantiate ``cfg.callbacks`` (name -> config; null entries are off) for a run in ``run_dir``.

    The checkpoint callback writes into ``<run_dir>/checkpoints`` unless ``dirpath`` is set; the LR
    monitor needs a logger; the legacy keys ``progress_bar: false`` and ``ema.decay: null`` switch
    the progress bar and EMA off. Debug runs (``debug=True``) write no checkpoints.
    """
    cbs: list[L.Callback] = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        spec = OmegaConf.to_container(node, resolve=True)
        if name == "progress_bar" and not cfg.get("progress_bar", True):
            continue
        if (name == "lr_monitor" and not with_logger) or (name == "model_checkpoint" and debug):
            continue
        if spec.get("_target_") == "mlcl.callbacks.EMA" and spec.get("decay") is None:
            continue
        if name == "model_checkpoint" and spec.get("dirpath") is None:
            spec["dirpath"] = str(Path(run_dir) / "checkpoints")
        cbs.append(instantiate(spec))
    return cbs
