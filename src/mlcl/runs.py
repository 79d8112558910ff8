"""Run-directory helpers shared by the entry points: guards against overwriting, result files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

RESULT_FILE = "metrics.json"


def ensure_fresh_run_dir(run_dir: Path, resume: bool = False) -> None:
    """Refuse to start a run in a directory that already holds results (never overwrite them)."""
    if resume:
        return
    taken = [p.name for p in (run_dir / RESULT_FILE, run_dir / "checkpoints") if p.exists()]
    if taken:
        raise FileExistsError(
            f"{run_dir} already holds results ({', '.join(taken)}); nothing was changed. Use a new "
            "hydra.run.dir, or resume that run with ckpt_path=<run_dir>/checkpoints/last.ckpt."
        )


def to_float(value: Any) -> Any:
    """Tensors and numbers -> float (NaN/inf kept as strings for JSON); recurse into dicts."""
    if isinstance(value, dict):
        return {k: to_float(v) for k, v in value.items()}
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json_new(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON to ``path``; if it exists, write ``stem-1.json``, ``stem-2.json``... instead."""
    path = Path(path)
    candidate, i = path, 0
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
    tmp = candidate.with_suffix(candidate.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(to_float(payload), indent=2, sort_keys=True, default=str))
    tmp.replace(candidate)
    return candidate
