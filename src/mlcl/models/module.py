"""The LightningModule: backbone -> head -> loss plugin, with metrics, optimiser and scheduler.

Built entirely from plain config dicts (saved as hyper-parameters), so a checkpoint alone is enough
to rebuild the model: ``MLCLModule.load_from_checkpoint(path)``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import get_class
from torch import Tensor, nn

from mlcl.losses.base import LossContext, LossPlugin
from mlcl.metrics import MultilabelReport
from mlcl.models.backbones import build_backbone, pool

log = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


def _float32(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Half-precision head outputs up-cast so every loss runs in float32 outside autocast."""
    return {k: v.float() if torch.is_tensor(v) and v.dtype in _HALF else v for k, v in outputs.items()}


def masked_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE-with-logits over observed entries (targets != -1); a loss-independent monitor."""
    known = targets != -1
    t = (targets == 1).to(logits.dtype)
    ell = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    return (ell * known).sum() / known.sum().clamp_min(1)


class MLCLModule(L.LightningModule):
    """Multi-label model with a swappable loss plugin.

    Args:
        backbone: ``{"name": ..., "pretrained": ..., **kwargs}`` for :func:`build_backbone`.
        loss: the loss config (``_target_`` = plugin class, its hyper-parameters, optional ``head_kwargs``).
        optimizer: ``{"_target_": "torch.optim.AdamW", "lr": ..., ...}``.
        scheduler: ``{"name": "cosine"|"onecycle"|"step"|"none", ...}`` (see :meth:`configure_optimizers`).
        num_classes: C. num_samples: training-set size (per-sample state). num_views: views per sample.
        in_chans / in_features: input channels (images) or width (vectors), read off the data.
        lr_mults: learning-rate multipliers by parameter-name prefix, e.g. ``{"backbone": 0.1,
            "head": 0.1, "head.classifier": 1.0}`` (longest prefix wins; default 1).
        no_decay_1d: exempt biases and 1-D parameters (norms) from weight decay.
        on_nonfinite: "raise" (stop with an explanation) or "skip" (skip the step) on a NaN/inf loss.
        threshold / top_k: for CP/CR/CF1/OP/OR/OF1.
        freeze_backbone: train only head and plugin (linear probing).
    """

    def __init__(
        self,
        *,
        backbone: dict[str, Any],
        loss: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        num_classes: int,
        num_samples: int = 0,
        num_views: int = 1,
        in_chans: int = 3,
        in_features: int | None = None,
        lr_mults: dict[str, float] | None = None,
        no_decay_1d: bool = False,
        on_nonfinite: str = "raise",
        threshold: float = 0.5,
        top_k: int = 3,
        freeze_backbone: bool = False,
        class_names: list[str] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"model.on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        loss_cfg = dict(loss)
        target = loss_cfg.pop("_target_", None)
        if target is None:
            raise ValueError("the loss config has no _target_ (pick one with loss=<name>)")
        plugin_cls = get_class(target)
        if not (isinstance(plugin_cls, type) and issubclass(plugin_cls, LossPlugin)):
            raise TypeError(f"loss._target_={target} is not a mlcl.losses.base.LossPlugin subclass")
        head_kwargs = loss_cfg.pop("head_kwargs", None) or {}
        bb = dict(backbone)
        name = bb.pop("name")
        self.backbone = build_backbone(
            name, in_chans=in_chans, in_features=in_features, spatial=plugin_cls.spatial, **bb
        )
        self.head = plugin_cls.build_head(self.backbone.num_features, num_classes, head_kwargs)
        self.loss_fn: LossPlugin = plugin_cls(
            num_classes=num_classes,
            feature_dim=self.head.out_features,
            num_samples=num_samples,
            head_kwargs=head_kwargs,
            **loss_cfg,
        )
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.loss_fn.attach(self)
        # ranked on logits: float32 sigmoids saturate and would tie distinct scores in mAP
        self.val_metrics = MultilabelReport(num_classes, threshold=threshold, top_k=top_k, from_logits=True)
        self.test_metrics = MultilabelReport(num_classes, threshold=threshold, top_k=top_k, from_logits=True)
        self.num_views = int(num_views)
        self.skipped_steps = 0
        self.test_per_class: dict[str, Tensor] | None = None
        self.test_outputs: tuple[Tensor, Tensor] | None = None
        self._epoch_sums: dict[str, Tensor] = {}  # batch-size-weighted sums of the loss terms this epoch
        self._epoch_rows = 0

    # ------------------------------------------------------------------ model
    def encode(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``[B, F]``."""
        return pool(self.backbone(x))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Head outputs (at least ``"logits"`` ``[B, C]``) for inputs ``x``."""
        return self.head(self.backbone(x))

    def _views(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, int]:
        """Flatten ``[B, V, ...]`` inputs view-major to ``[V*B, ...]``; repeat targets and indices."""
        x, y, idx = batch["input"], batch["target"], batch["index"]
        v = self.num_views
        if v > 1:
            x = x.transpose(0, 1).reshape(v * x.shape[0], *x.shape[2:])
            y, idx = y.repeat(v, 1), idx.repeat(v)
        return x, y, idx, v

    # ------------------------------------------------------------------ steps
    def on_train_epoch_start(self) -> None:
        self.loss_fn.on_train_epoch_start(self.current_epoch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        x, y, idx, v = self._views(batch)
        out = self(x)
        ctx = LossContext(
            indices=idx, epoch=self.current_epoch, step=self.global_step, num_views=v, training=True, inputs=x
        )
        with torch.autocast(device_type=self.device.type, enabled=False):
            terms = self.loss_fn(_float32(out), y, ctx)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            bad = {
                k: float(t.detach())
                for k, t in terms.items()
                if torch.is_tensor(t) and not torch.isfinite(t).all()
            }
            msg = (
                f"non-finite loss at epoch {self.current_epoch}, step {self.global_step} "
                f"(loss={self.loss_fn.name}, non-finite terms: {bad or {'loss': float(loss)}}). "
                "Checkpoints already written are kept. Try a lower optimizer.lr, trainer.precision=32, "
                "trainer.gradient_clip_val=1.0, or model.on_nonfinite=skip to skip such steps."
            )
            if self.hparams.on_nonfinite == "raise":
                raise FloatingPointError(msg)
            self.skipped_steps += 1
            log.warning(msg)
            return None
        self._log_train_terms(terms, batch["target"].shape[0])
        return loss

    # ------------------------------------------------------------------ training logs
    # One ``self.log`` costs milliseconds (Lightning copies its result state on every call), more than a
    # whole step of a small model. So the per-epoch means are summed here with plain tensor adds and
    # logged once per epoch, and the step values reach Lightning only on the steps its loggers write
    # (every ``trainer.log_every_n_steps``); metrics.csv gets the same columns and rows as with
    # ``log_dict(on_step=True, on_epoch=True)``: ``train/<term>_step`` and ``train/<term>_epoch``.
    def _log_train_terms(self, terms: dict[str, Tensor], batch_size: int) -> None:
        values = {k: t.detach().float() for k, t in terms.items() if torch.is_tensor(t)}
        sums = self._epoch_sums
        for k, v in values.items():
            sums[k] = sums[k] + v * batch_size if k in sums else v * batch_size
        self._epoch_rows += batch_size
        connector = getattr(self._trainer, "_logger_connector", None)
        logger_step = connector is None or connector.should_update_logs
        if logger_step:
            self.log_dict({f"train/{k}_step": v for k, v in values.items()}, on_step=True, on_epoch=False)
        if logger_step or self._epoch_rows == batch_size:  # a loss on the bar from the first step on
            self.log("loss", values["loss"], prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        sums, rows = self._epoch_sums, self._epoch_rows
        self._epoch_sums, self._epoch_rows = {}, 0
        if not rows:
            return
        means = {k: s / rows for k, s in sums.items()}
        self.log_dict({f"train/{k}_epoch": v for k, v in means.items()}, on_step=False, on_epoch=True)
        # the un-suffixed names stay in callback_metrics (what monitors and callbacks may read)
        self.log_dict({f"train/{k}": v for k, v in means.items()}, on_step=False, on_epoch=True, logger=False)

    def _eval_step(self, batch: dict[str, Tensor], metrics: MultilabelReport, stage: str) -> None:
        x, y = batch["input"], batch["target"]
        logits = self(x)["logits"].float()
        metrics.update(logits, y)
        self.log(f"{stage}/bce", masked_bce(logits, y), on_epoch=True, batch_size=y.shape[0], sync_dist=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def _log_report(self, metrics: MultilabelReport, stage: str) -> None:
        report = metrics.compute()
        if stage == "test":  # per-class AP and the test scores, for metrics.json and W&B
            self.test_per_class, self.test_outputs = metrics.last_per_class, metrics.last_outputs
        self.log(f"{stage}/mAP", report["mAP"], prog_bar=True)
        self.log_dict({f"{stage}/{k}": v for k, v in report.items() if k != "mAP"})
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_report(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_report(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return torch.sigmoid(self(batch["input"])["logits"].float())

    # ------------------------------------------------------------------ optimisation
    def _lr_mult(self, name: str) -> float:
        """Learning-rate multiplier of a parameter: the longest matching prefix in ``lr_mults``."""
        best, mult = -1, 1.0
        for prefix, m in (self.hparams.lr_mults or {}).items():
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, mult = len(prefix), float(m)
        return mult

    def _param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups: backbone/head parameters by ``lr_mults`` prefix, then the plugin's groups.

        With ``no_decay_1d`` biases and other 1-D parameters (norms) get ``weight_decay=0``.
        """
        buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad or name.startswith("loss_fn."):
                continue
            no_decay = bool(self.hparams.no_decay_1d) and p.ndim <= 1
            buckets.setdefault((self._lr_mult(name), no_decay), []).append(p)
        groups: list[dict[str, Any]] = []
        for (mult, no_decay), params in buckets.items():
            g: dict[str, Any] = {"params": params, "lr_mult": mult}
            if no_decay:
                g["weight_decay"] = 0.0
            groups.append(g)
        for g in self.loss_fn.param_groups():  # the plugin's groups keep their own options
            params = [p for p in g["params"] if p.requires_grad]
            if params:
                groups.append({**g, "params": params, "lr_mult": float(g.get("lr_mult", 1.0))})
        return groups

    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer)
        cls = get_class(opt_cfg.pop("_target_"))
        lr = float(opt_cfg.pop("lr"))
        groups = self._param_groups()
        for g in groups:
            g["lr"] = lr * g.pop("lr_mult")
            g.pop("name", None)
        optimizer = cls(groups, lr=lr, **opt_cfg)
        sched = dict(self.hparams.scheduler or {"name": "none"})
        name = sched.pop("name", "none")
        if name in ("none", None):
            return optimizer
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max_epochs)
        if name == "cosine_restarts":
            s = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                optimizer,
                T_0=int(sched.get("T_0", 50)),
                T_mult=int(sched.get("T_mult", 2)),
                eta_min=float(sched.get("eta_min", 0.0)),
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": s, "interval": "epoch"}}
        if name == "cosine":
            warm = int(sched.get("warmup_epochs", 0))
            eta = float(sched.get("min_lr_ratio", 0.0))

            def factor(epoch: int) -> float:
                if epoch < warm:
                    return (epoch + 1) / (warm + 1)
                t = (epoch - warm) / max(1, max_epochs - warm)
                return eta + (1 - eta) * 0.5 * (1 + math.cos(math.pi * t))

            s = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": s, "interval": "epoch"}}
        if name == "onecycle":
            s = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in optimizer.param_groups],
                # planned_epochs > max_epochs reproduces references that stop before the cycle ends
                total_steps=steps_per_epoch * int(sched.get("planned_epochs") or max_epochs),
                pct_start=float(sched.get("pct_start", 0.2)),
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": s, "interval": "step"}}
        if name == "step":
            s = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=int(sched.get("step_size", 20)), gamma=float(sched.get("gamma", 0.1))
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": s, "interval": "epoch"}}
        if name == "plateau":
            s = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="min",
                factor=float(sched.get("factor", 0.1)),
                patience=int(sched.get("patience", 2)),
                cooldown=int(sched.get("cooldown", 1)),
                threshold=float(sched.get("threshold", 1e-3)),
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": s, "interval": "epoch", "monitor": "val/bce"},
            }
        raise ValueError(
            f"unknown scheduler.name {name!r}; valid: none, cosine, cosine_restarts, onecycle, step, plateau"
        )
