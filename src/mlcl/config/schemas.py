"""Declared schemas of the config groups: ``conf/<group>/*.yaml`` keys with their types and ranges.

A schema is a function ``node -> {key: Param}`` registered for a dotted config path
(``register_schema("model", ...)``); :func:`mlcl.config.validate` checks every key that the schema
declares and leaves keys it does not know alone (other modules add keys and groups: they register
their own schema, e.g. ``register_schema("diagnostics", lambda node: {"every_n_epochs": Int(1, ge=1)})``).
Loss plugins declare theirs on the class (``LossPlugin.hyperparams``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mlcl.config.params import Any_, Bool, Choice, Dict, Float, Int, List, Param, Path_, Str

Schema = Callable[[Mapping[str, Any]], Mapping[str, Param]]
SCHEMAS: dict[str, list[Schema]] = {}


def register_schema(path: str, schema: Schema | Mapping[str, Param]) -> None:
    """Declare the keys of the config node at ``path`` ("" = top level, "data.source", "diagnostics")."""
    fn = schema if callable(schema) else (lambda node, _s=dict(schema): _s)
    SCHEMAS.setdefault(path, []).append(fn)


def _short(target: Any) -> str:
    return str(target or "").rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------------- top level
register_schema(
    "",
    {
        "seed": Int(0, ge=0),
        "tag": Any_(None),  # free-form label (a number is fine)
        "tags": List([], nullable=True),
        "monitor": Str("val/mAP"),
        "optimized_metric": Str("val/mAP", nullable=True),
        "init_weights": Choice("ema", "ema", "raw"),
        "init_modules": List(None, item="str", nullable=True),
        "test": Bool(True),
        "progress_bar": Bool(True),
    },
)
register_schema(
    "ema", {"decay": Float(None, gt=0, lt=1, nullable=True), "evaluate": Choice("ema", "ema", "raw")}
)
# eval.yaml
register_schema(
    "",
    {"split": Choice("test", "test", "val"), "weights": Choice("auto", "auto", "ema", "raw")},
)

# ----------------------------------------------------------------------------------------- model
register_schema(
    "model",
    {
        "lr_mults": Dict({}, item="float", ge=0, nullable=True),
        "no_decay_1d": Bool(False),
        "on_nonfinite": Choice("raise", "raise", "skip"),
        "threshold": Float(0.5, ge=0, le=1),
        "top_k": Int(3, ge=1, nullable=True),
        "freeze_backbone": Bool(False),
    },
)

# ------------------------------------------------------------------------------------- optimizer
register_schema(
    "optimizer",
    {
        "_target_": Str(),
        "lr": Float(gt=0),
        "weight_decay": Float(0.0, ge=0),
        "momentum": Float(0.0, ge=0, lt=1),
        "dampening": Float(0.0, ge=0, le=1),
        "nesterov": Bool(False),
        "betas": List((0.9, 0.999), item="float", ge=0, lt=1),
        "eps": Float(1e-8, gt=0),
        "amsgrad": Bool(False),
    },
)

# ------------------------------------------------------------------------------------- scheduler
SCHEDULERS = ("none", "cosine", "cosine_restarts", "onecycle", "step", "plateau")
_SCHEDULER_KEYS: dict[str, dict[str, Param]] = {
    "cosine": {"warmup_epochs": Int(0, ge=0), "min_lr_ratio": Float(0.0, ge=0, le=1)},
    "cosine_restarts": {"T_0": Int(50, ge=1), "T_mult": Int(2, ge=1), "eta_min": Float(0.0, ge=0)},
    "onecycle": {"pct_start": Float(0.2, gt=0, lt=1), "planned_epochs": Int(None, ge=1, nullable=True)},
    "step": {"step_size": Int(20, ge=1), "gamma": Float(0.1, gt=0, le=1)},
    "plateau": {
        "factor": Float(0.1, gt=0, lt=1),
        "patience": Int(2, ge=0),
        "cooldown": Int(1, ge=0),
        "threshold": Float(1e-3, ge=0),
    },
}
register_schema(
    "scheduler",
    lambda node: {"name": Choice("cosine", *SCHEDULERS), **_SCHEDULER_KEYS.get(str(node.get("name")), {})},
)

# --------------------------------------------------------------------------------------- trainer
PRECISIONS = ("32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16", "16-true", "bf16-true")
PRECISIONS += ("64-true", "64", 64, "transformer-engine")
register_schema(
    "trainer",
    {
        "max_epochs": Int(8, ge=1),
        "min_epochs": Int(None, ge=0, nullable=True),
        "max_steps": Int(-1, ge=-1),
        "accelerator": Choice("cpu", "cpu", "gpu", "cuda", "mps", "tpu", "auto"),
        "precision": Choice("32-true", *PRECISIONS),
        "log_every_n_steps": Int(10, ge=1),
        "num_sanity_val_steps": Int(0, ge=-1),
        "deterministic": Choice(False, True, False, "warn", nullable=True),
        "gradient_clip_val": Float(None, ge=0, nullable=True),
        "gradient_clip_algorithm": Choice("norm", "norm", "value", nullable=True),
        "limit_train_batches": Float(None, ge=0, nullable=True),
        "limit_val_batches": Float(None, ge=0, nullable=True),
        "limit_test_batches": Float(None, ge=0, nullable=True),
        "enable_model_summary": Bool(False, nullable=True),
        "enable_checkpointing": Bool(True, nullable=True),
        "num_nodes": Int(1, ge=1),
        "sync_batchnorm": Bool(False),
        "strategy": Str("auto"),
        "accumulate_grad_batches": Int(1, ge=1),
        "check_val_every_n_epoch": Int(1, ge=1, nullable=True),
        "benchmark": Bool(None, nullable=True),
    },
)

# ------------------------------------------------------------------------------------------ data
register_schema(
    "data",
    {
        "batch_size": Int(64, ge=1),
        "eval_batch_size": Int(None, ge=1, nullable=True),
        "num_workers": Int(0, ge=0),
        "pin_memory": Bool(False),
        "persistent_workers": Bool(False),
        "num_views": Int(None, ge=1, nullable=True),
        "drop_last": Bool(False),
        "iterations_per_epoch": Int(None, ge=1, nullable=True),
        "augment": Dict(None, nullable=True),
        "root": Path_(None, exists="dir", nullable=True),
        "path": Path_(None, exists="file", nullable=True),
    },
)
_FRACTIONS = List((0.7, 0.15, 0.15), item="float", ge=0, le=1)
_SEED = Int(0, ge=0)
_IMAGE_FILES = {
    "on_bad_image": Choice("raise", "raise", "skip_black"),
    "check_files": Choice("none", "none", "raise", "drop"),
}
_SOURCES: dict[str, dict[str, Param]] = {
    "ArraySource": {
        "train_path": Path_(None, exists="file", nullable=True),
        "val_path": Path_(None, exists="file", nullable=True),
        "test_path": Path_(None, exists="file", nullable=True),
        "feature_key": Str("feature"),
        "target_key": Str("target"),
        "class_names_key": Str(None, nullable=True),
        "split_key": Str(None, nullable=True),
        "fractions": _FRACTIONS,
        "seed": _SEED,
        "standardize": Bool(True),
        "allow_unknown": Bool(False),
    },
    "COCOSource": {
        "year": Choice(2014, 2014, 2017),
        "val_from_train": Float(0.0, ge=0),
        "split_seed": _SEED,
        "include_unannotated": Bool(False),
        "annotations_dir": Path_(None, exists="dir", nullable=True),
        "image_dirs": Dict(None, nullable=True),
        **_IMAGE_FILES,
    },
    "VOCSource": {
        "year": Choice(2007, 2007, 2012),
        "difficult": Choice("positive", "positive", "negative", "unknown"),
        "eval_difficult": Choice("unknown", "positive", "negative", "unknown"),
        "split_map": Dict(None, nullable=True),
        "val_from_train": Float(0.0, ge=0),
        "split_seed": _SEED,
        **_IMAGE_FILES,
    },
    "FolderCSVSource": {
        "images_dir": Path_(exists="dir"),
        "csv": Any_(),
        "file_column": Str("file_name"),
        "label_format": Choice("auto", "auto", "names", "columns"),
        "label_column": Str("labels"),
        "label_sep": Str("|"),
        "split_column": Str("split"),
        "ignore_columns": List([], item="str"),
        "class_names": List(None, nullable=True),
        "allow_unknown": Bool(False),
        "fractions": _FRACTIONS,
        "seed": _SEED,
        **_IMAGE_FILES,
    },
    "NUSWideSource": {
        "train_list": Path_(exists="file"),
        "test_list": Path_(exists="file"),
        "val_list": Path_(None, exists="file", nullable=True),
        "val_from_train": Float(0.0, ge=0),
        "split_seed": _SEED,
        "num_classes": Int(81, ge=1),
        "class_names_file": Path_(None, exists="file", nullable=True),
        **_IMAGE_FILES,
    },
    "DigitsMosaic": {
        "sizes": Dict(None, item="int", ge=1, nullable=True),
        "grid": Int(3, ge=1),
        "label_probs": List((0.35, 0.3, 0.2, 0.15), item="float", ge=0, le=1),
        "data_seed": _SEED,
        "pool_fractions": List((0.6, 0.2, 0.2), item="float", gt=0, le=1),
    },
}
register_schema("data.source", lambda node: _SOURCES.get(_short(node.get("_target_")), {}))

_IMAGE_AUGMENT = {
    "image_size": Int(224, ge=1),
    "normalize": Any_("imagenet"),
    "hflip": Bool(False),
    "random_resized_crop": List(None, item="float", gt=0, le=1, nullable=True),
    "randaugment": Any_(False),
    "cutout": Any_(False),
}
_AUGMENT = {
    "ArraySource": {"feature_dropout": Float(0.0, ge=0, lt=1), "noise_std": Float(0.0, ge=0)},
    "DigitsMosaic": {"max_shift": Int(0, ge=0), "noise_std": Float(0.0, ge=0)},
}


#: data.augment keys by source class (the augment node sits beside data.source, see validation)
AUGMENT_BY_SOURCE: dict[str, dict[str, Param]] = {
    **_AUGMENT,
    **{name: _IMAGE_AUGMENT for name in ("COCOSource", "VOCSource", "FolderCSVSource", "NUSWideSource")},
}

# -------------------------------------------------------------------------------------- backbone
_BACKBONES: dict[str, dict[str, Param]] = {
    "small_cnn": {"width": Int(32, ge=1)},
    "mlp": {
        "widths": List((256, 512, 256), item="int", ge=1),
        "dropout": Float(0.2, ge=0, lt=1),
        "norm": Choice("none", "none", "batch", "layer"),
    },
}
register_schema(
    "backbone",
    lambda node: {
        "name": Str(),
        "pretrained": Path_(None, exists="file", nullable=True),
        **_BACKBONES.get(str(node.get("name")), {}),
    },
)

# --------------------------------------------------------------------------------------- missing
MISSING_MODES = ("none", "uniform", "single_positive", "fixed_count", "file")
register_schema(
    "missing",
    {
        "mode": Choice("none", *MISSING_MODES),
        "rate": Float(0.0, ge=0, le=1),
        "seed": _SEED,
        "path": Path_(None, exists="file", nullable=True),
    },
)

# ------------------------------------------------------------------------------ run-level paths
register_schema(
    "",
    {
        "init_ckpt": Path_(None, exists="file", nullable=True),
        "ckpt_path": Path_(None, exists="file", nullable=True),
    },
)
