"""Checks that need more than one key: the loss plugin against data, backbone and trainer, metric
names, settings that have no effect. Each raises :class:`~mlcl.errors.UserError` or adds a warning."""

from __future__ import annotations

import functools
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mlcl.config.params import check_all
from mlcl.errors import UserError

CUSTOM_BACKBONES = ("small_cnn", "mlp")


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _plugin(cfg: DictConfig) -> Any:
    from hydra.utils import get_class

    from mlcl.losses.base import LossPlugin

    target = _get(cfg, "loss._target_")
    if target is None:
        raise UserError("the loss config has no _target_", "loss._target_", "pick a loss with loss=<name>")
    try:
        cls = get_class(str(target))
    except Exception as exc:  # noqa: BLE001 (any import failure is the same user mistake)
        raise UserError(
            f"loss._target_={target} cannot be imported", "loss._target_", "pick loss=<name>"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, LossPlugin)):
        raise UserError(f"loss._target_={target} is not a loss plugin", "loss._target_", "pick loss=<name>")
    return cls


def check_loss(checker: Any) -> Any:
    """Declared loss (and head) hyper-parameters, then the plugin's needs; returns the plugin class."""
    cfg = checker.cfg
    cls = _plugin(cfg)
    loss = _get(cfg, "loss", {})
    hp = {k: v for k, v in loss.items() if k in cls.hyperparams}
    for name, param in cls.hyperparams.items():
        if name in hp:
            param.check(hp[name], f"loss.{name}")
    if "gather" in loss:
        from mlcl.config.params import Bool

        Bool(False).check(loss["gather"], "loss.gather")
    head = {**cls.default_head_kwargs, **(loss.get("head_kwargs") or {})}
    for name, param in cls.head_hyperparams.items():
        if name in head:
            param.check(head[name], f"loss.head_kwargs.{name}")
    name = getattr(cls, "name", "?")
    if name == "kmcl" and head.get("loss_case") != loss.get("loss_case", "anisotropic"):
        raise UserError(
            f"loss.head_kwargs.loss_case={head.get('loss_case')} differs from "
            f"loss.loss_case={loss.get('loss_case')}",
            "loss.head_kwargs.loss_case",
            "leave loss.head_kwargs.loss_case at ${..loss_case} (the default) or set both the same",
        )
    if name == "kmcl" and head.get("loss_case") == "isotropic" and head.get("var_mode") == "shared_dim":
        raise UserError(
            "loss.head_kwargs.var_mode=shared_dim needs anisotropic kernels",
            "loss.head_kwargs.var_mode",
            "use var_mode=per_class or shared_scalar with loss.loss_case=isotropic",
        )
    if name == "mulcon" and head["embed_dim"] % head["num_heads"]:
        raise UserError(
            f"loss.head_kwargs.embed_dim={head['embed_dim']} is not divisible by "
            f"num_heads={head['num_heads']}",
            "loss.head_kwargs.num_heads",
            "pick num_heads that divides embed_dim (e.g. 4 with embed_dim 64)",
        )
    if name == "clml":
        _check_clml_base(loss)
    if name == "large_loss":
        epochs = int(_get(cfg, "trainer.max_epochs", 1) or 1)
        rate = (epochs - 1) * float(loss.get("delta_rel", 0.2)) / 100
        if rate >= 1:
            raise UserError(
                f"loss.delta_rel={loss.get('delta_rel')} makes the rejection rate reach {rate:.2f} "
                f"(>= 1) by the last of trainer.max_epochs={epochs} epochs",
                "loss.delta_rel",
                f"use loss.delta_rel < {100 / max(epochs - 1, 1):.3g} or fewer epochs",
            )
    return cls


def _check_clml_base(loss: dict[str, Any]) -> None:
    from mlcl.losses.base import LOSSES, list_losses

    base = loss.get("base_loss", "bce")
    valid = [
        n for n in list_losses() if LOSSES[n].head == "linear" and n != "clml" and LOSSES[n].num_views == 1
    ]
    if base not in valid:
        raise UserError(
            f"loss.base_loss={base!r} is not a single-view linear-head loss",
            "loss.base_loss",
            f"use one of {', '.join(valid)}",
        )
    cls = LOSSES[base]
    if cls.hyperparams:
        check_all(
            cls.hyperparams,
            {k: v for k, v in (loss.get("base_kwargs") or {}).items() if k != "gather"},
            "loss.base_kwargs",
        )


def check_combinations(checker: Any, plugin: Any) -> None:
    """Loss x data x backbone x trainer, and keys without effect."""
    cfg = checker.cfg
    views = _get(cfg, "data.num_views")
    effective = plugin.num_views if views is None else int(views)
    if plugin.num_views > 1 and effective < plugin.num_views:
        raise UserError(
            f"loss={plugin.name} needs {plugin.num_views} views per sample but data.num_views={views}",
            "data.num_views",
            f"set data.num_views={plugin.num_views} (or null, which picks what the loss needs)",
        )
    if plugin.name == "supcon" and _get(cfg, "loss.positive_rule") == "simclr" and effective < 2:
        raise UserError(
            "loss.positive_rule=simclr needs two views per sample",
            "loss.positive_rule",
            "set data.num_views=2",
        )
    backbone = str(_get(cfg, "backbone.name", ""))
    if plugin.spatial and backbone == "mlp":
        raise UserError(
            f"loss={plugin.name} puts a spatial head ({plugin.head}) on the feature map, "
            "and backbone=mlp has none",
            "backbone.name",
            "use an image backbone (small_cnn, a timm CNN) with image data, or a loss with a linear head",
        )
    if backbone not in CUSTOM_BACKBONES and backbone and not _timm_has(backbone):
        import difflib

        import timm

        close = difflib.get_close_matches(
            backbone, list(CUSTOM_BACKBONES) + timm.list_models(), n=5, cutoff=0.6
        )
        raise UserError(
            f"unknown backbone name {backbone!r}: not small_cnn, mlp or a timm model",
            "backbone.name",
            (f"did you mean {', '.join(close)}? " if close else "")
            + "list timm models with python -c \"import timm; print(timm.list_models('*resnet*'))\"",
        )
    accelerator = str(_get(cfg, "trainer.accelerator", "cpu"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"trainer.accelerator={accelerator} but no CUDA GPU is visible",
                "trainer.accelerator",
                "use trainer=cpu (or trainer.accelerator=cpu)",
            )
    for split in ("train", "val", "test"):
        limit = _get(cfg, f"trainer.limit_{split}_batches")
        if isinstance(limit, float) and limit > 1 and not limit.is_integer():
            raise UserError(
                f"trainer.limit_{split}_batches={limit}: a fraction must be <= 1, a batch count an integer",
                f"trainer.limit_{split}_batches",
                "use e.g. 0.1 (10% of the batches) or 5 (five batches)",
            )
    _check_schedule(cfg)
    _check_no_effect(checker)


def _check_schedule(cfg: DictConfig) -> None:
    name = _get(cfg, "scheduler.name")
    epochs = int(_get(cfg, "trainer.max_epochs", 1) or 1)
    planned = _get(cfg, "scheduler.planned_epochs")
    if name == "onecycle" and planned is not None and int(planned) < epochs:
        raise UserError(
            f"scheduler.planned_epochs={planned} is shorter than trainer.max_epochs={epochs} "
            "(OneCycle would end early)",
            "scheduler.planned_epochs",
            f"set scheduler.planned_epochs >= {epochs} or null",
        )


def _check_no_effect(checker: Any) -> None:
    cfg = checker.cfg
    mode = _get(cfg, "missing.mode", "none")
    rate = _get(cfg, "missing.rate", 0.0)
    if mode == "none" and rate:
        raise UserError(
            f"missing.rate={rate} has no effect with missing=none (no label is hidden)",
            "missing.rate",
            "choose a missing-label mode, e.g. missing=uniform missing.rate=0.5, or drop missing.rate",
        )
    if mode in ("single_positive", "file") and rate:
        checker.warn("missing.rate", f"missing.rate={rate} is ignored with missing.mode={mode}")
    if mode == "file" and not _get(cfg, "missing.path"):
        raise UserError(
            "missing=file needs the observed-label file", "missing.path", "set missing.path=/path/file.txt"
        )
    if mode != "file" and _get(cfg, "missing.path"):
        checker.warn("missing.path", f"missing.path is ignored with missing.mode={mode} (use missing=file)")
    if "ema" in cfg and _get(cfg, "ema.decay") is None and _get(cfg, "ema.evaluate", "ema") != "ema":
        checker.warn("ema.evaluate", "ema.evaluate has no effect while EMA is off (ema.decay=null)")
    if not _get(cfg, "init_ckpt") and _get(cfg, "init_modules"):
        checker.warn("init_modules", "init_modules has no effect without init_ckpt")


@functools.lru_cache(maxsize=256)
def _timm_has(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


@functools.lru_cache(maxsize=8)
def metric_names(top_k: int | None) -> tuple[str, ...]:
    """Metric names logged under ``val/`` and ``test/`` (``mAP``, ``bce``, ``CP`` ... ``OF1_top3``)."""
    import torch

    from mlcl.metrics import mean_average_precision, multilabel_f1_scores

    scores, targets = torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[1, 0], [0, 1]])
    names = ["bce", *mean_average_precision(scores, targets), *multilabel_f1_scores(scores, targets)]
    if top_k:
        names += [f"{k}_top{top_k}" for k in multilabel_f1_scores(scores, targets, top_k=1)]
    return tuple(names)


def check_metrics(checker: Any) -> None:
    """``monitor``, ``optimized_metric`` and every callback's ``monitor`` name a logged metric."""
    cfg = checker.cfg
    names = metric_names(_get(cfg, "model.top_k", 3))
    keys = [("monitor", ("val",)), ("optimized_metric", ("val", "test"))]
    callbacks = _get(cfg, "callbacks") or {}
    if isinstance(callbacks, dict):
        keys += [
            (f"callbacks.{n}.monitor", ("val",))
            for n, c in callbacks.items()
            if isinstance(c, dict) and "monitor" in c
        ]
    for key, stages in keys:
        value = _get(cfg, key)
        if value is None:
            continue
        stage, _, metric = str(value).partition("/")
        if stage == "train" and metric:
            continue  # loss terms differ per plugin; every one is logged as train/<term>
        if stage not in stages or metric not in names:
            valid = ", ".join(f"{stages[0]}/{n}" for n in names)
            raise UserError(
                f"{key}={value} is not a logged metric", key, f"use one of {valid} (or train/loss)"
            )
