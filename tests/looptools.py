"""Tiny real building blocks for the training-loop tests: digit-mosaic datamodule, module, trainer.

Everything here is the production code (no stubs), only made small: a few dozen 24x24 mosaics, a
``small_cnn`` of width 4, CPU, no loggers, no checkpoint callback unless a test adds one.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor

from mlcl.data.datamodule import MultiLabelDataModule
from mlcl.data.datasets.digits import DigitsMosaic
from mlcl.models.module import MLCLModule

SIZES = {"train": 24, "val": 24, "test": 24}


def digits_source(sizes: dict[str, int] | None = None, data_seed: int = 0) -> partial:
    """The source factory the Hydra config builds: ``source(split=...) -> DigitsMosaic``."""
    return partial(DigitsMosaic, sizes={**SIZES, **(sizes or {})}, data_seed=data_seed)


def datamodule(
    *, sizes: dict[str, int] | None = None, batch_size: int = 8, **kw: Any
) -> MultiLabelDataModule:
    """A set-up datamodule over tiny digit mosaics (``kw`` go to :class:`MultiLabelDataModule`)."""
    kw.setdefault("eval_batch_size", 16)
    dm = MultiLabelDataModule(digits_source(sizes), batch_size=batch_size, **kw)
    dm.setup("fit")
    return dm


def module(dm: MultiLabelDataModule, loss: dict[str, Any] | str = "bce", **kw: Any) -> MLCLModule:
    """An :class:`MLCLModule` for ``dm``: small_cnn width 4, AdamW; ``loss`` a name or a config dict."""
    if isinstance(loss, str):
        from mlcl.losses.base import get_loss_class

        cls = get_loss_class(loss)
        loss = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
    args: dict[str, Any] = dict(
        backbone={"name": "small_cnn", "width": 4},
        loss=loss,
        optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-2, "weight_decay": 0.0},
        scheduler={"name": "none"},
        num_classes=dm.num_classes,
        num_samples=dm.num_train,
        num_views=dm.num_views,
        in_chans=1,
    )
    args.update(kw)
    return MLCLModule(**args)


def trainer(max_epochs: int, callbacks: list[L.Callback] | None = None, **kw: Any) -> L.Trainer:
    """A quiet CPU trainer: no logger, no checkpoints, no sanity validation (``kw`` override)."""
    args: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
    )
    args.update(kw)
    return L.Trainer(**args)


def split_tensors(dm: MultiLabelDataModule, split: str) -> tuple[Tensor, Tensor]:
    """Un-augmented inputs ``[N, 1, 24, 24]`` and served targets ``[N, C]`` of a split, in index order."""
    items = [dm.splits[split][i] for i in range(len(dm.splits[split]))]
    return torch.stack([it["input"] for it in items]), torch.stack([it["target"] for it in items])


def model_state(m: torch.nn.Module) -> dict[str, Tensor]:
    """A detached float64 copy of every floating tensor of the model (metrics excluded)."""
    return {
        k: v.detach().to(torch.float64).clone()
        for k, v in m.state_dict().items()
        if v.dtype.is_floating_point and not k.startswith(("val_metrics", "test_metrics"))
    }
