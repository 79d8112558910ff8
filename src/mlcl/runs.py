"""Run directories: which directory a run writes to, whether it may, resume, and result files.

The resume contract (``ckpt_path``):

- ``last``: this run directory's ``checkpoints/last.ckpt``. If the directory already holds
  ``metrics.json`` the run is finished (nothing is touched, its results are returned); elif it
  holds ``checkpoints/last.ckpt`` the run resumes from it; else it starts (again) from scratch.
- ``<file>``: resume from that file INTO the run directory that contains it (``<run>/checkpoints/
  x.ckpt`` -> ``<run>``); a checkpoint outside a run's ``checkpoints/`` starts a new run from it.
- unset: a fresh run; refused when the directory already holds another run's files. Under SLURM a
  requeued job (``SLURM_RESTART_COUNT`` > 0) behaves as ``ckpt_path=last``.

Nothing in the run directory is written before :func:`plan_run` has accepted the directory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mlcl.errors import UserError

RESULT_FILE = "metrics.json"
DEBUG_RESULT_FILE = "debug_metrics.json"  # debug runs: never read by mlcl-compare
LAST = "last.ckpt"
# files another run leaves behind: their presence means the directory is taken
# (.hydra alone is not: pipelines write it before calling mlcl.train.run in-process)
RUN_FILES = (RESULT_FILE, "checkpoints", "metrics.csv", "config.yaml", "train.log")
TMP_MARK = ".tmp-"


@dataclass
class RunPlan:
    """What a run will do: its directory, the checkpoint it resumes from, or that it is finished."""

    run_dir: Path
    ckpt_path: Path | None = None
    finished: bool = False
    reason: str = "fresh run"

    @property
    def resume(self) -> bool:
        return self.ckpt_path is not None


def slurm_requeued(env: Mapping[str, str] | None = None) -> bool:
    """True in a SLURM job that was requeued (pre-empted or timed out and restarted)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    except ValueError:
        return False


def is_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    """False in the extra processes of a DDP run (Lightning's LOCAL_RANK/NODE_RANK, torchrun's RANK,
    srun's SLURM_PROCID): they follow rank 0's decision about the run directory and write no record."""
    env = os.environ if env is None else env
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = env.get(key, "0") or "0"
        if value.isdigit() and int(value) > 0:
            return False
    return True


def taken(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that another run wrote (empty when the directory is free)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def plan_run(run_dir: Path, ckpt_path: str | None, env: Mapping[str, str] | None = None) -> RunPlan:
    """Decide where and how a run proceeds (see the module docstring); raises UserError when refused.

    ``run_dir`` is the directory Hydra chose for this command (already created, possibly empty).
    Reads only; the caller writes nothing into the directory before this returns. Non-zero DDP
    ranks start after rank 0 accepted (and began writing) the directory: they are never refused.
    """
    run_dir = Path(run_dir).resolve()
    check = is_rank_zero(env)
    if ckpt_path is None and slurm_requeued(env):
        ckpt_path = "last"
    if ckpt_path is not None and str(ckpt_path).strip().lower() == "last":
        if (run_dir / RESULT_FILE).is_file():
            return RunPlan(run_dir, finished=True, reason=f"{run_dir / RESULT_FILE} exists: already finished")
        last = run_dir / "checkpoints" / LAST
        if last.is_file():
            return RunPlan(run_dir, ckpt_path=last, reason=f"resuming from {last}")
        return RunPlan(run_dir, reason="ckpt_path=last but no checkpoint yet: starting from scratch")
    if ckpt_path is not None:
        ckpt = Path(str(ckpt_path)).expanduser().resolve()
        if not ckpt.is_file():
            raise UserError(
                f"checkpoint {ckpt} does not exist",
                f"ckpt_path={ckpt_path}",
                "give an existing .ckpt file, or ckpt_path=last to resume this run directory",
            )
        owner = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
        if owner is None:  # a loose checkpoint: continue training from it in a new run
            _refuse_if_taken(run_dir, f"ckpt_path={ckpt_path}", check)
            return RunPlan(run_dir, ckpt_path=ckpt, reason=f"starting from {ckpt} (not inside a run)")
        if check and owner != run_dir and taken(run_dir):
            raise UserError(
                f"ckpt_path belongs to run {owner} but the output directory {run_dir} holds another run "
                f"({', '.join(taken(run_dir))}); nothing was changed",
                f"ckpt_path={ckpt_path}, hydra.run.dir",
                f"resume into its own directory (drop hydra.run.dir or set hydra.run.dir={owner})",
            )
        if (owner / RESULT_FILE).is_file():
            return RunPlan(owner, finished=True, reason=f"{owner / RESULT_FILE} exists: already finished")
        return RunPlan(owner, ckpt_path=ckpt, reason=f"resuming from {ckpt}")
    _refuse_if_taken(run_dir, "hydra.run.dir", check)
    return RunPlan(run_dir)


def _refuse_if_taken(run_dir: Path, where: str, check: bool = True) -> None:
    names = taken(run_dir) if check else []
    if names:
        raise UserError(
            f"{run_dir} already holds results ({', '.join(names)}); nothing was changed",
            where,
            f"use a new hydra.run.dir, or resume that run with ckpt_path=last (same command) or "
            f"ckpt_path={run_dir / 'checkpoints' / LAST}",
        )


def redirect_hydra_output(run_dir: Path) -> None:
    """Point Hydra's ``runtime.output_dir`` (and so ``${paths.output_dir}``) at ``run_dir``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    if not HydraConfig.initialized():
        return
    runtime = HydraConfig.instance().cfg.hydra.runtime
    with read_write(runtime), open_dict(runtime):
        runtime.output_dir = str(run_dir)


def write_run_record(run_dir: Path, cfg: DictConfig) -> None:
    """``config.yaml`` (resolved) and ``.hydra/{config,hydra,overrides}.yaml`` as Hydra would write them.

    Hydra's own copy is switched off (``hydra.output_subdir: null``) so that a refused run cannot
    overwrite another run's record; this runs after the directory was accepted.
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    write_text_atomic(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        hcfg = HydraConfig.instance().cfg
        write_text_atomic(hydra_dir / "hydra.yaml", OmegaConf.to_yaml(hcfg))
        write_text_atomic(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(hcfg.hydra.overrides.task))


def remove_stale_tmp(run_dir: Path) -> list[Path]:
    """Delete temporary files (``.<name>.tmp-<pid>``) that killed writers left in the run directory."""
    from mlcl.ckpt_io import remove_stale_tmp as remove_in

    return [*remove_in(run_dir), *remove_in(run_dir / "checkpoints")]


def read_results(run_dir: Path) -> dict[str, Any]:
    """The stored ``metrics.json`` of a finished run."""
    return json.loads((Path(run_dir) / RESULT_FILE).read_text())


def to_float(value: Any) -> Any:
    """Tensors and numbers -> float (NaN/inf kept as strings for JSON); recurse into dicts."""
    if isinstance(value, dict):
        return {k: to_float(v) for k, v in value.items()}
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Write through ``.<name>.tmp-<pid>`` in the same directory and rename (never a half file)."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_json_new(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON to ``path``; if it exists, write ``stem-1.json``, ``stem-2.json``... instead."""
    path = Path(path)
    candidate, i = path, 0
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
    write_text_atomic(candidate, json.dumps(to_float(payload), indent=2, sort_keys=True, default=str))
    return candidate
