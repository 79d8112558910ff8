"""Loading weights from earlier runs (stage-two initialisation, evaluation with EMA weights)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path, key: str = "init_ckpt") -> dict[str, Any]:
    """Load a Lightning checkpoint file; a missing or unreadable file names the config ``key``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"{key}={str(path)!r} does not exist; point {key} at a .ckpt file of an earlier run "
            "(e.g. <run_dir>/checkpoints/best.ckpt)"
        )
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:  # corrupt or not a torch file
        raise ValueError(f"{key}={str(path)!r} is not a readable checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{key}={str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def checkpoint_weights(
    ckpt: dict[str, Any], weights: str, key: str = "init_weights"
) -> dict[str, torch.Tensor]:
    """The raw or EMA state dict of a checkpoint (``weights``: "raw", "ema" or "auto")."""
    if weights not in ("raw", "ema", "auto"):
        raise ValueError(f"{key} must be 'raw', 'ema' or 'auto', got {weights!r}")
    if weights == "ema" and "ema" not in ckpt:
        raise ValueError(
            f"{key}=ema but the checkpoint has no EMA weights (train it with ema.decay=0.9997) "
            f"or set {key}=raw"
        )
    if weights in ("ema", "auto") and "ema" in ckpt:
        return ckpt["ema"]
    return ckpt["state_dict"]


# Hyper-parameters of a run that fix the shapes of the backbone / head tensors (compared on a mismatch).
_ARCH_CONFIG_KEYS = {"backbone.": ("backbone",), "head.": ("loss._target_", "loss.head_kwargs", "data_name")}


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _pick(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_differences(
    ckpt: dict[str, Any], module: nn.Module, prefixes: Sequence[str] = ("backbone.", "head.")
) -> list[str]:
    """Config keys that fix tensor shapes and differ between the run that wrote ``ckpt`` and ``module``.

    When ``prefixes`` load from ``backbone.``: the run configs' ``backbone.*`` (except ``pretrained``);
    from ``head.``: ``num_classes``, ``loss._target_``, ``loss.head_kwargs.*`` and ``data_name``. Entries
    read ``"key (checkpoint A, this run B)"``; only ``num_classes`` when a side has no saved run config.
    """
    theirs = ckpt.get("hyper_parameters") or {}
    ours = dict(getattr(module, "hparams", {}) or {})
    diffs = []
    prefixes = [p if p.endswith(".") else p + "." for p in prefixes]
    with_head = any(p.startswith("head.") for p in prefixes)
    if (
        with_head
        and "num_classes" in theirs
        and "num_classes" in ours
        and theirs["num_classes"] != ours["num_classes"]
    ):
        diffs.append(
            f"num_classes, i.e. the data (checkpoint {theirs['num_classes']}, this run {ours['num_classes']})"
        )
    src, dst = theirs.get("run_config") or {}, ours.get("run_config") or {}
    if not (src and dst):
        return diffs
    keys = [
        k for top, ks in _ARCH_CONFIG_KEYS.items() if any(p.startswith(top) for p in prefixes) for k in ks
    ]
    for key in keys:
        a, b = _flat(_pick(src, key), key), _flat(_pick(dst, key), key)
        for k in sorted(set(a) | set(b)):
            if k != "backbone.pretrained" and a.get(k) != b.get(k):
                diffs.append(f"{k} (checkpoint {a.get(k)!r}, this run {b.get(k)!r})")
    return diffs


def _config_key(module: nn.Module, path: str | Path) -> str:
    """The config key the user set to ``path``: e.g. ``stage1_ckpt`` when ``init_ckpt: ${stage1_ckpt}``."""
    run_config = (getattr(module, "hparams", {}) or {}).get("run_config") or {}
    for k, v in run_config.items():
        if (
            k.endswith("_ckpt")
            and k not in ("init_ckpt", "ckpt_path")
            and v is not None
            and str(v) == str(path)
        ):
            return k
    return "init_ckpt"


def _listing(items: list[str], limit: int = 8) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_init_weights(
    module: nn.Module,
    path: str | Path,
    weights: str = "ema",
    prefixes: Sequence[str] | None = None,
    key: str | None = None,
) -> list[str]:
    """Copy the tensors under ``prefixes`` of a checkpoint into ``module``, strictly.

    Every tensor of ``module`` under ``prefixes`` (default ``backbone`` and ``head``; the loss plugin's,
    e.g. MulCon's projector, stay fresh) must exist in the checkpoint with the same shape, and the
    checkpoint must have no other tensors under them; otherwise a ValueError lists the differing tensors
    and config keys. ``weights``: "ema" (the EMA copy, an error if there is none), "raw" or "auto".
    ``key``: the config key named in errors (default: the ``*_ckpt`` key of the module's run config that
    holds ``path``, e.g. ``stage1_ckpt``, else ``init_ckpt``). Returns the loaded keys.
    """
    key = key or _config_key(module, path)
    ckpt = read_checkpoint(path, key=key)
    try:
        state = checkpoint_weights(ckpt, weights)
    except ValueError as err:
        raise ValueError(f"{key}={str(path)!r}: {err}") from None
    own = module.state_dict()
    prefixes = tuple(prefixes) if prefixes else ("backbone.", "head.")
    prefixes = tuple(p if p.endswith(".") else p + "." for p in prefixes)
    wanted = [k for k in own if k.startswith(prefixes)]
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k.startswith(prefixes) and k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in wanted
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} tensors with other shapes: {_listing(mismatched)}")
        if missing:
            parts.append(f"{len(missing)} tensors missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors the model does not have: {_listing(unexpected)}")
        diffs = config_differences(ckpt, module, prefixes)
        if diffs:
            cause = f"config keys that differ from the run that wrote it: {_listing(diffs)}. "
        else:
            cause = "use the same backbone.*, loss.head_kwargs.* and data (number of classes) as that run. "
        raise ValueError(
            f"{key}={str(path)!r} does not fit this model (loading {', '.join(p[:-1] for p in prefixes)} "
            f"strictly from its {weights} weights): {cause}{'. '.join(parts)}."
        )
    module.load_state_dict({k: state[k] for k in wanted}, strict=False)
    log.info(
        "initialised %d tensors (%s) from %s=%s [%s weights]",
        len(wanted),
        ", ".join(prefixes),
        key,
        path,
        weights,
    )
    return wanted


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor], key: str = "ckpt_path") -> None:
    """Load a whole state dict into ``module``, strictly in both directions (metric states aside).

    A checkpoint that lacks tensors of the model, or holds tensors the model does not have, would
    otherwise evaluate partly random weights without a word: both raise a UserError naming ``key``.
    """
    from mlcl.errors import UserError

    skip = ("val_metrics.", "test_metrics.")
    own = {k for k in module.state_dict() if not k.startswith(skip)}
    theirs = {k for k in state if not k.startswith(skip)}
    missing, unexpected = sorted(own - theirs), sorted(theirs - own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model tensors missing from it: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors the model does not have: {_listing(unexpected)}")
        raise UserError(
            f"the checkpoint does not fit the model rebuilt from its own config ({'; '.join(parts)})",
            key,
            "point it at a checkpoint written by mlcl-train with this version of mlcl",
        )
    module.load_state_dict({k: state[k] for k in theirs}, strict=False)
