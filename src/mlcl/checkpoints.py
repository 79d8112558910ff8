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


def load_init_weights(
    module: nn.Module, path: str | Path, weights: str = "ema", prefixes: Sequence[str] | None = None
) -> list[str]:
    """Copy matching tensors of a checkpoint into ``module`` (strict within ``prefixes``).

    Every tensor of ``module`` under ``prefixes`` (default: all but the loss plugin's) must exist in
    the checkpoint with the same shape; otherwise a ValueError lists what differs. Returns loaded keys.
    """
    ckpt = read_checkpoint(path)
    state = checkpoint_weights(ckpt, weights)
    own = module.state_dict()
    prefixes = tuple(prefixes) if prefixes else ("backbone.", "head.")
    prefixes = tuple(p if p.endswith(".") else p + "." for p in prefixes)
    wanted = [k for k in own if k.startswith(prefixes)]
    missing = [k for k in wanted if k not in state]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in wanted
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or mismatched:
        src_cfg = (ckpt.get("hyper_parameters") or {}).get("run_config") or {}
        hint = ""
        if src_cfg:
            hint = (
                f" The checkpoint was trained with backbone={src_cfg.get('backbone', {}).get('name')} "
                f"loss={src_cfg.get('loss_name')} data={src_cfg.get('data_name')}."
            )
        raise ValueError(
            f"init_ckpt={str(path)!r} does not fit this model: {len(missing)} missing tensors "
            f"{missing[:4]}, {len(mismatched)} with other shapes {mismatched[:4]}.{hint} "
            "Use the same backbone, "
            "head settings (e.g. loss.head_kwargs) and number of classes as the run that wrote it."
        )
    module.load_state_dict({k: state[k] for k in wanted}, strict=False)
    log.info(
        "initialised %d tensors (%s) from %s [%s weights]", len(wanted), ", ".join(prefixes), path, weights
    )
    return wanted
