"""MulCon's two stages in one command: ``python -m mlcl.mulcon_pipeline [options] [overrides]``.

Stage one is ``python -m mlcl.train experiment=mulcon_stage1`` (BCE only); stage two is
``python -m mlcl.train experiment=mulcon_stage2 stage1_ckpt=<stage-one checkpoint>`` (strict init of
backbone + head from the stage-one EMA weights, fresh projector, two views, BCE + 0.5 x contrast). This
module only chains the real entry point: it composes and checks both configurations before anything
trains, runs stage one, picks its checkpoint (best validation score, else the last one), runs stage two
with it and prints both test mAPs. Each stage gets its own run directory under one parent::

    <out>/stage1/   run directory of stage one (checkpoints/, metrics.json, ...)
    <out>/stage2/   run directory of stage two
    <out>/pipeline.json   which checkpoint was passed on, both stages' test metrics

Overrides: ``key=value`` goes to both stages, ``stage1.key=value`` / ``stage2.key=value`` to one
(``+``/``~``/``++`` prefixes may come first: ``+stage2.trainer.limit_val_batches=2``). Example on the
embedded digits (CPU)::

    python -m mlcl.mulcon_pipeline data=digits backbone=small_cnn trainer=cpu \\
        loss.head_kwargs.embed_dim=64 loss.head_kwargs.num_pixel_blocks=1 loss.proj_hidden=64 \\
        ema.decay=0.99 stage1.trainer.max_epochs=10 stage2.trainer.max_epochs=5 \\
        stage2.data.augment.max_shift=1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from mlcl import cli

log = logging.getLogger("mlcl.mulcon_pipeline")

STAGES = ("stage1", "stage2")
EXPERIMENTS = {"stage1": "mulcon_stage1", "stage2": "mulcon_stage2"}
PIPELINE_FILE = "pipeline.json"
# Keys the pipeline sets itself; an override of them would break the hand-over between the stages.
RESERVED = (
    "experiment",
    "stage1_ckpt",
    "init_ckpt",
    "hydra.run.dir",
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
)
# Config keys that fix the shapes stage two loads strictly (backbone.pretrained only matters in stage one).
ARCH_KEYS = ("backbone", "loss._target_", "loss.head_kwargs", "data_name", "data.source._target_")
_PLAIN_VALUE = re.compile(r"[\w./\-+@:]+")  # a comma would make a sweep
_STAGE_OVERRIDE = re.compile(r"^([+~]{0,2})(stage[12])\.(.+)$")


class PipelineError(RuntimeError):
    """A problem the pipeline reports in one sentence (bad overrides, a failed stage, taken run dirs)."""


def conf_dir() -> Path:
    """The Hydra config folder ``mlcl.train`` uses (``mlcl/conf``, shipped inside the package)."""
    cand = Path(__file__).resolve().parent / "conf"
    if (cand / "train.yaml").is_file():
        return cand
    raise PipelineError(f"cannot find the Hydra configs (train.yaml) in {cand}")


def split_overrides(args: Sequence[str]) -> dict[str, list[str]]:
    """Sort CLI overrides into ``{"shared": [...], "stage1": [...], "stage2": [...]}``.

    ``stage1.key=value`` goes to stage one only, with the ``stage1.`` removed (``+``/``~`` kept in front).
    Keys the pipeline sets itself (``experiment``, ``stage1_ckpt``, ``init_ckpt``, ``hydra.run.dir``)
    and multirun flags are refused.
    """
    out: dict[str, list[str]] = {"shared": [], "stage1": [], "stage2": []}
    for arg in args:
        if arg in ("-m", "--multirun"):
            raise PipelineError("the pipeline runs one configuration; multirun (-m) is not supported")
        m = _STAGE_OVERRIDE.match(arg)
        where, ov = (m.group(2), m.group(1) + m.group(3)) if m else ("shared", arg)
        key = ov.lstrip("+~").split("=", 1)[0]
        if key in RESERVED:
            hint = " (use --out DIR for the run directories)" if key.startswith("hydra.") else ""
            raise PipelineError(f"{arg!r}: the pipeline sets {key} itself{hint}")
        out[where].append(ov)
    return out


def hydra_value(value: str) -> str:
    """``value`` written so that a Hydra override carries it verbatim (quoted when needed)."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    if any(c in value for c in "'\\") or "${" in value:
        raise PipelineError(f"{value!r} contains a quote, a backslash or '${{', which Hydra overrides mangle")
    return f"'{value}'"


def stage_overrides(stage: str, groups: dict[str, list[str]], run_dir: Path, ckpt: str | None) -> list[str]:
    """Complete override list of one stage (the experiment first, then shared, then stage-only)."""
    ovs = [f"experiment={EXPERIMENTS[stage]}", *groups["shared"], *groups[stage]]
    if stage == "stage2":
        ovs.append(f"stage1_ckpt={hydra_value(ckpt or '<stage-one checkpoint>')}")
    return [*ovs, f"hydra.run.dir={hydra_value(str(run_dir))}"]


def compose(overrides: Sequence[str]) -> Any:
    """The ``train`` config for ``overrides`` with its ``hydra`` node, as ``python -m mlcl.train`` sees it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def _compose_stage(stage: str, overrides: list[str]) -> Any:
    from hydra.errors import HydraException

    try:
        return compose(overrides)
    except HydraException as err:  # unknown key or group, parse error: say which stage
        raise PipelineError(f"{stage}: {err}".strip()) from err


@contextlib.contextmanager
def hydra_runtime(cfg: Any, run_dir: Path) -> Iterator[Any]:
    """Make ``cfg`` the current Hydra job (run dir ``run_dir``) and yield the task config (no ``hydra``).

    This is what ``hydra.main`` does before calling the task, so ``${hydra:...}`` values resolve and
    ``mlcl.train.run`` writes into ``run_dir``. The previous Hydra state is restored afterwards.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    cfg = copy.deepcopy(cfg)
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(Path(run_dir).resolve())
    hc = HydraConfig.instance()
    previous = hc.cfg
    hc.set_config(cfg)
    try:
        task = copy.deepcopy(cfg)
        with read_write(task), open_dict(task):
            del task["hydra"]
        yield task
    finally:
        hc.cfg = previous


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}.{k}"))
        return flat
    return {prefix: value}


def _unset_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is ``???`` (unresolved, so interpolations to them do not raise)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        out.extend([key] if v == "???" else _unset_keys(v, key))
    return out


def describe_stage(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """What :func:`check_stage_configs` compares, read off one composed stage config.

    ``{"missing": keys still ???, "arch": {flat key: value} of :data:`ARCH_KEYS`, "init_weights",
    "ema_decay"}``, resolved with ``cfg``'s own Hydra runtime (``data_name`` comes from it).
    """
    from omegaconf import DictConfig, OmegaConf

    with hydra_runtime(cfg, run_dir) as task:
        arch: dict[str, Any] = {}
        for key in ARCH_KEYS:
            try:
                value = OmegaConf.select(task, key, throw_on_missing=False)
                if isinstance(value, DictConfig):
                    value = OmegaConf.to_container(value, resolve=True)
            except Exception as err:  # an interpolation to an unset value: reported as missing below
                value = f"<unresolved: {type(err).__name__}>"
            arch.update(_flatten(value, key))
        unset = _unset_keys(OmegaConf.to_container(task, resolve=False))
        return {
            "missing": [k for k in unset if k != "stage1_ckpt"],
            "arch": arch,
            "init_weights": OmegaConf.select(task, "init_weights", default="ema"),
            "ema_decay": OmegaConf.select(task, "ema.decay", default=None),
        }


def check_stage_configs(stage1: dict[str, Any], stage2: dict[str, Any]) -> None:
    """Fail before training when stage two could not load stage one, or a required value is unset.

    Takes two :func:`describe_stage` results. Compares the keys that fix tensor shapes (backbone,
    ``loss.head_kwargs``, loss, data) and checks that stage one keeps EMA weights when stage two loads
    them (``init_weights=ema``).
    """
    problems: list[str] = []
    for stage, desc in (("stage1", stage1), ("stage2", stage2)):
        if desc["missing"]:
            unset = desc["missing"]
            problems.append(f"{stage} needs a value for {', '.join(unset)} (e.g. {unset[0]}=...)")
    a, b = stage1["arch"], stage2["arch"]
    diffs = [
        f"{k} (stage1 {a.get(k)!r}, stage2 {b.get(k)!r})"
        for k in sorted(set(a) | set(b))
        if k != "backbone.pretrained" and a.get(k) != b.get(k)
    ]
    if diffs:
        problems.append(
            "stage two loads stage one's backbone and head strictly, but these differ: "
            + "; ".join(diffs)
            + ". Pass them without the stage1./stage2. prefix so both stages share them"
        )
    if stage2["init_weights"] == "ema" and not stage1["ema_decay"]:
        problems.append(
            "stage two loads EMA weights (init_weights=ema) but stage one keeps none (ema.decay is null): "
            "set ema.decay (e.g. 0.9997) for stage one, or stage2.init_weights=raw"
        )
    if problems:
        raise PipelineError("; ".join(problems))


def select_stage1_checkpoint(
    run_dir: Path, results: dict[str, Any] | None, monitor: str = "val/mAP"
) -> tuple[Path, str]:
    """The checkpoint stage two starts from: stage one's best by ``monitor``, else its last one.

    ``results``: stage one's ``metrics.json`` (``best_ckpt``, ``best_val``). Returns the path and a
    short reason for the log.
    """
    results = results or {}
    best = results.get("best_ckpt")
    if best and Path(best).is_file():
        score = results.get("best_val")
        at = f" = {float(score):.2f}" if isinstance(score, (int, float)) else ""
        return Path(best), f"best {monitor}{at}"
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last, "last epoch (no best-by-validation checkpoint was written)"
    raise PipelineError(
        f"stage one finished without a checkpoint in {run_dir / 'checkpoints'}; nothing to pass to stage two"
    )


def _fresh_dir(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"{path} already exists and is not empty; nothing was changed. Choose another --out."
        )


def _run_subprocess(stage: str, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mlcl.train", *overrides]
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode != 0:
        raise PipelineError(
            f"{stage} failed (exit status {proc.returncode}; its error is printed above, its run directory "
            f"is {run_dir})"
        )
    path = run_dir / "metrics.json"
    if not path.is_file():  # Lightning ends a run stopped by SIGTERM with exit status 0
        raise PipelineError(f"{stage} ended without writing {path} (interrupted?)")
    return json.loads(path.read_text())


def _run_in_process(cfg: Any, run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from mlcl import train

    with hydra_runtime(cfg, run_dir) as task:
        hydra_dir = run_dir / ".hydra"
        hydra_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(task, hydra_dir / "config.yaml")
        OmegaConf.save(cfg.hydra.overrides.task, hydra_dir / "overrides.yaml")
        return train.run(task)


@dataclass
class StageResult:
    """What the pipeline keeps of one stage."""

    run_dir: str
    overrides: list[str]
    test: dict[str, Any] = field(default_factory=dict)
    best_val: float | None = None
    best_ckpt: str | None = None
    chance_mAP: float | None = None

    @classmethod
    def from_results(cls, run_dir: Path, overrides: list[str], res: dict[str, Any]) -> StageResult:
        def num(v: Any) -> Any:
            return float(v) if hasattr(v, "__float__") and not isinstance(v, str) else v

        return cls(
            run_dir=str(run_dir),
            overrides=overrides,
            test={k: num(v) for k, v in (res.get("test") or {}).items()},
            best_val=num(res.get("best_val")),
            best_ckpt=res.get("best_ckpt"),
            chance_mAP=num(res.get("chance_mAP")),
        )


def run_pipeline(
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    *,
    in_process: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Run MulCon stage one, then stage two from stage one's checkpoint; return both stages' results.

    Args:
        overrides: Hydra overrides; ``stage1.``/``stage2.`` prefixed ones go to one stage only.
        out_dir: parent of the two run directories (default ``$MLCL_ROOT/outputs/mulcon/<time>``); its
            ``stage1``/``stage2`` sub-folders must not exist yet or be empty.
        in_process: call ``mlcl.train.run`` in this process instead of ``python -m mlcl.train`` (quicker
            on small runs; the subprocess keeps each stage's Hydra logging and suits multi-GPU runs).
        dry_run: compose and check both configurations, print the commands, run nothing.

    Returns ``{"out_dir", "stage1_ckpt", "stage1_ckpt_reason", "stage1": StageResult dict, "stage2": ...}``.
    """
    groups = split_overrides(overrides)
    if out_dir is None:
        root = Path(os.environ.get("MLCL_ROOT", "."))
        out_dir = root / "outputs" / "mulcon" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    out = Path(out_dir).expanduser().resolve()
    dirs = {s: out / s for s in STAGES}

    # Compose and check both stages first: a typo in a stage-two override should not cost a stage-one run.
    ovs1 = stage_overrides("stage1", groups, dirs["stage1"], None)
    cfg1 = _compose_stage("stage1", ovs1)
    cfg2 = _compose_stage("stage2", stage_overrides("stage2", groups, dirs["stage2"], None))
    check_stage_configs(describe_stage(cfg1, dirs["stage1"]), describe_stage(cfg2, dirs["stage2"]))
    cmd = "python -m mlcl.train"
    if dry_run:
        print(f"stage 1: {cmd} {' '.join(ovs1)}")
        print(f"stage 2: {cmd} {' '.join(stage_overrides('stage2', groups, dirs['stage2'], None))}")
        return {"out_dir": str(out), "dry_run": True}
    for d in dirs.values():
        _fresh_dir(d)

    log.info("MulCon stage one -> %s", dirs["stage1"])
    res1 = (
        _run_in_process(cfg1, dirs["stage1"])
        if in_process
        else _run_subprocess("stage1", ovs1, dirs["stage1"])
    )
    ckpt, reason = select_stage1_checkpoint(dirs["stage1"], res1, str(cfg1.get("monitor", "val/mAP")))
    log.info("MulCon stage two starts from %s (%s)", ckpt, reason)
    ovs2 = stage_overrides("stage2", groups, dirs["stage2"], str(ckpt))
    if in_process:
        res2 = _run_in_process(compose(ovs2), dirs["stage2"])
    else:
        try:
            res2 = _run_subprocess("stage2", ovs2, dirs["stage2"])
        except PipelineError as err:
            again = [*ovs2[:-1], "hydra.run.dir=<new dir>"]
            rerun = f"{cmd} {' '.join(again)}"
            raise PipelineError(f"{err}. Stage one is done; rerun stage two alone: {rerun}") from err

    from mlcl import runs

    summary = {
        "out_dir": str(out),
        "stage1_ckpt": str(ckpt),
        "stage1_ckpt_reason": reason,
        "stage1": asdict(StageResult.from_results(dirs["stage1"], ovs1, res1)),
        "stage2": asdict(StageResult.from_results(dirs["stage2"], ovs2, res2)),
    }
    path = runs.write_json_new(out / PIPELINE_FILE, summary)
    print_summary(summary, path)
    return summary


def print_summary(summary: dict[str, Any], path: Path | None = None) -> None:
    """Both stages' test mAP (and the checkpoint handed over) on stdout."""
    print(f"MulCon stage two initialised from {summary['stage1_ckpt']} ({summary['stage1_ckpt_reason']})")
    for stage in STAGES:
        s = summary[stage]
        m = s["test"].get("mAP")
        shown = f"{float(m):.2f}" if m is not None else "n/a (test=false)"
        print(f"MulCon {stage} test mAP = {shown}   [{s['run_dir']}]")
    chance = summary["stage2"].get("chance_mAP")
    if chance is not None:
        print(f"chance level = {float(chance):.2f} mAP")
    if path is not None:
        print(f"summary: {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlcl-mulcon",
        description="MulCon stage one (experiment=mulcon_stage1), then stage two (experiment=mulcon_stage2) "
        "from stage one's best-by-validation checkpoint (else its last one).",
        epilog="Overrides: key=value for both stages, stage1.key=value / stage2.key=value for one stage, "
        "e.g. data=digits backbone=small_cnn stage1.trainer.max_epochs=10 stage2.trainer.max_epochs=5",
    )
    parser.add_argument("--out", default=None, help="parent directory of the stage1/ and stage2/ run dirs")
    parser.add_argument(
        "--in-process", action="store_true", help="run the stages in this process, not as subprocesses"
    )
    parser.add_argument("--dry-run", action="store_true", help="check both configs, print the commands")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (see below)")
    return parser


@cli.guard
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m mlcl.mulcon_pipeline`` / ``mlcl-mulcon``. Returns the exit status."""
    args = build_parser().parse_intermixed_args(argv)
    pkg_log = logging.getLogger("mlcl")  # lightning logs through its own handler already
    if not pkg_log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        pkg_log.addHandler(handler)
        pkg_log.setLevel(logging.INFO)
    try:
        run_pipeline(args.overrides, args.out, in_process=args.in_process, dry_run=args.dry_run)
    except (PipelineError, FileExistsError, FileNotFoundError, ValueError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"mlcl-mulcon: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
