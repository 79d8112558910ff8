"""Methods as sweep units: ``python -m mlcl.train method=<name>`` runs every stage of a method as ONE job.

A method (``conf/method/<name>.yaml``, ``@package _global_``) either just picks a loss (one stage, run
by ``mlcl.train.run`` as usual) or lists ``stages``; then this module runs them in order, each in its
own run directory inside the job's::

    <job>/stages/<stage>/      a full run directory (config.yaml, checkpoints/, metrics.json, ...)
    <job>/metrics.json         the final stage's results, every stage's under "stages"
    <job>/config.yaml          the final stage's resolved config (method_name set)

A stage node (``stages.<name>``) holds config values for that stage plus three reserved keys::

    _groups_: {loss: mulcon, optimizer: sgd}      # config-group choices of the stage
    _init_: {stage: stage1, ckpt: best, key: stage1_ckpt}   # initialise from an earlier stage's checkpoint
    _select_: {dev_loss: best_dev_loss.ckpt}      # extra checkpoints of this stage to test afterwards
    _fixed_: {seed: 0}                            # values no command-line override changes
    _shared_: true                                # run once per sweep, not per job (mlcl.stage_share)

Precedence, lowest first: train.yaml defaults < the stage's ``_groups_`` < the stage's values < the
job's command-line overrides (every stage) < command-line overrides naming the stage
(``stages.<name>.trainer.max_epochs=2``; a key the stage does not set needs Hydra's ``+``).
Resume: with ``ckpt_path=last`` a finished job returns its stored results, a finished stage is
skipped and an unfinished one resumes from its ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mlcl import runs, stage_share
from mlcl.errors import UserError

log = logging.getLogger(__name__)

RESERVED = ("_groups_", "_init_", "_select_", "_fixed_", "_shared_")
_SCOPED = re.compile(r"^([+~]{0,2})stages\.([^.=~+]+)\.(.+)$")
# job-level keys a stage must not inherit: the stage mechanism sets them per stage
_JOB_ONLY = ("method", "ckpt_path", "hydra.")


@dataclass
class Stage:
    """One stage of a method: group choices, config values, init source and extra checkpoint tests."""

    name: str
    groups: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] | None = None
    select: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    shared: bool = False


def method_stages(cfg: DictConfig) -> list[Stage]:
    """The stages of the selected method, in order, checked (``_init_`` names an earlier stage)."""
    node = OmegaConf.to_container(cfg.stages, resolve=False)
    stages: list[Stage] = []
    for name, body in node.items():
        body = dict(body or {})
        init = body.get("_init_")
        if init is not None:
            init = {"ckpt": "best", "key": "init_ckpt", **init}
            if init.get("stage") not in [s.name for s in stages]:
                raise UserError(
                    f"stage {name!r} initialises from {init.get('stage')!r}, which is not an earlier stage",
                    f"method={cfg.get('method_name')}, stages.{name}._init_.stage",
                    f"use one of {[s.name for s in stages]}",
                )
        stages.append(
            Stage(
                name=str(name),
                groups={str(k): str(v) for k, v in (body.get("_groups_") or {}).items()},
                values={k: v for k, v in body.items() if k not in RESERVED},
                init=init,
                select=dict(body.get("_select_") or {}),
                fixed=dict(body.get("_fixed_") or {}),
                shared=bool(body.get("_shared_", False)),
            )
        )
    if not stages:
        raise UserError("the method lists no stages", f"method={cfg.get('method_name')}", "add stages.<name>")
    return stages


def _drop_key(node: dict[str, Any], path: list[str]) -> None:
    """Remove ``path`` from a nested dict, and the dicts it leaves empty."""
    head, *rest = path
    if head not in node:
        return
    if rest and isinstance(node[head], dict):
        _drop_key(node[head], rest)
        if node[head]:
            return
    del node[head]


def drop_undeclared_stages(cfg: DictConfig, task: Sequence[str]) -> list[str]:
    """Remove from ``cfg.stages`` the stages that only command-line overrides created; their names.

    ``-m method=bce,mulsupcon ++stages.pretrain.x=1`` is meant for MulSupCon's pre-training: for
    ``method=bce`` Hydra still creates ``stages.pretrain``, which would turn BCE into a two-stage method
    (and a misspelt stage name into an extra training stage). Such overrides are dropped with a warning.
    """
    if not cfg.get("stages"):
        return []
    named: dict[str, list[list[str]]] = {}
    for ov in task:
        m = _SCOPED.match(ov)
        if m and not m.group(1).startswith("~"):  # a deletion never creates a stage
            named.setdefault(m.group(2), []).append(m.group(3).split("=", 1)[0].split("."))
    body = OmegaConf.to_container(cfg.stages, resolve=False)
    dropped = []
    for name, keys in named.items():
        rest = copy.deepcopy(body.get(name)) if isinstance(body.get(name), dict) else {}
        for key in keys:
            _drop_key(rest, key)
        if not rest:
            dropped.append(name)
    if dropped:
        with read_write(cfg), open_dict(cfg):
            for name in dropped:
                del cfg.stages[name]
            if not cfg.stages:
                del cfg["stages"]
        log.warning(
            "mlcl: warning: method %s has no stage %s; the command-line overrides naming it are ignored "
            "in this job (stages.%s)",
            cfg.get("method_name"),
            ", ".join(repr(n) for n in dropped),
            dropped[0],
        )
    return dropped


def split_overrides(
    task: Sequence[str], names: Sequence[str], dropped: Sequence[str] = ()
) -> tuple[list[str], dict[str, list[str]]]:
    """Command-line overrides of the job -> (every stage's, ``{stage: its own}``).

    ``stages.<s>.key=v`` becomes ``++key=v`` for stage ``s`` (``~stages.<s>.key`` -> ``~key``); ``method=``,
    ``ckpt_path=`` and ``hydra.*`` stay with the job, and so do the reserved keys
    (``+stages.<s>._shared_=true``): Hydra already put them into the job's ``stages`` node. Overrides
    naming a stage in ``dropped`` (see :func:`drop_undeclared_stages`) are left out.
    """
    shared: list[str] = []
    scoped: dict[str, list[str]] = {n: [] for n in names}
    for ov in task:
        m = _SCOPED.match(ov)
        if m:
            prefix, stage, rest = m.groups()
            if stage not in scoped and stage in dropped:
                continue  # a stage of other methods in the sweep (drop_undeclared_stages warned)
            if stage not in scoped:
                raise UserError(
                    f"{ov!r} names stage {stage!r}, which this method does not have",
                    "command line",
                    f"use one of {list(names)}",
                )
            if rest.split(".", 1)[0].split("=", 1)[0] not in RESERVED:  # _init_ etc. describe the stage
                scoped[stage].append(f"~{rest}" if prefix.startswith("~") else f"++{rest}")
            continue
        key = ov.lstrip("+~").split("=", 1)[0]
        if key in ("method", "ckpt_path") or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        shared.append(ov)
    return shared, scoped


def _hydra_compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra job: its config search path
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)
    conf = Path(__file__).resolve().parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def _apply(cfg: DictConfig, overrides: list[str]) -> None:
    """Apply value overrides (Hydra syntax, ``+``/``++``/``~`` included) to a composed config in place."""
    if not overrides:
        return
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    with read_write(cfg):
        ConfigLoaderImpl._apply_overrides_to_config(parsed, cfg)


def compose_stage(
    stage: Stage,
    shared: list[str],
    scoped: list[str],
    run_dir: Path,
    settings: dict[str, Any] | None = None,
) -> DictConfig:
    """The full config (with its ``hydra`` node) of one stage, run directory ``run_dir``.

    ``shared``: the job's overrides for every stage; ``scoped``: this stage's (already ``++key=v``);
    ``settings``: values the mechanism sets last (``ckpt_path``, the init checkpoint, ``method_name``),
    after ``_init_``'s ``weights``/``modules`` (as ``init_weights``/``init_modules``).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parsed = OverridesParser.create().parse_overrides(shared)
    probe = _compose_or_raise(stage, [f"{g}={v}" for g, v in stage.groups.items()])
    known_groups = set(probe.hydra.runtime.choices)
    cli_groups = {p.key_or_group for p in parsed if p.key_or_group in known_groups}
    groups = [f"{g}={v}" for g, v in stage.groups.items() if g not in cli_groups]
    values = [ov for ov, p in zip(shared, parsed) if p.key_or_group not in known_groups]
    cfg = _compose_or_raise(stage, [*groups, *shared])
    try:
        with read_write(cfg), open_dict(cfg):
            merged = OmegaConf.merge(cfg, OmegaConf.create(stage.values))
            cfg = merged
        OmegaConf.set_struct(cfg, True)
        _apply(cfg, values)
        _apply(cfg, scoped)
    except HydraException as err:
        raise UserError(str(err).strip(), f"stage {stage.name}", "fix or remove that override") from err
    init = {f"init_{k}": stage.init[k] for k in ("weights", "modules") if stage.init and k in stage.init}
    with read_write(cfg), open_dict(cfg):
        for key, value in {**init, **(settings or {})}.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        cfg.hydra.runtime.output_dir = str(Path(run_dir).resolve())
        cfg.hydra.overrides.task = [*groups, *shared, *scoped]
    return cfg


def _compose_or_raise(stage: Stage, overrides: list[str]) -> DictConfig:
    from hydra.errors import HydraException

    try:
        return _hydra_compose(overrides)
    except HydraException as err:
        raise UserError(str(err).strip(), f"stage {stage.name}", "fix or remove that override") from err


@contextlib.contextmanager
def hydra_runtime(cfg: DictConfig) -> Iterator[DictConfig]:
    """Make ``cfg`` the current Hydra job config and yield the task config (no ``hydra`` node).

    ``hydra.main`` does the same before calling the task, so ``${hydra:...}`` resolves and
    ``mlcl.train.run`` writes into ``cfg.hydra.runtime.output_dir``; the previous state is restored.
    """
    from hydra.core.hydra_config import HydraConfig

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


def select_checkpoint(run_dir: Path, results: dict[str, Any], which: str) -> Path:
    """The checkpoint of a finished stage that a later stage starts from.

    ``which``: ``best`` (best by the stage's ``monitor``; its last one when none was written), ``last``,
    or a file name in ``checkpoints/`` (e.g. ``lowest_train_loss.ckpt`` written by an extra callback).
    """
    ckpts = Path(run_dir) / "checkpoints"
    if which == "best":
        best = results.get("best_ckpt")  # absolute, or relative to the run directory (metrics.json)
        best_path = Path(run_dir) / best if best else None
        path = best_path if best_path is not None and best_path.is_file() else ckpts / "last.ckpt"
    elif which == "last":
        path = ckpts / "last.ckpt"
    else:
        path = ckpts / (which if which.endswith(".ckpt") else f"{which}.ckpt")
    if not path.is_file():
        raise UserError(
            f"stage checkpoint {path.name!r} does not exist",
            str(ckpts),
            "choose _init_.ckpt among best, last or a file the stage writes",
        )
    return path


def _run_stage(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from mlcl import train

    with hydra_runtime(cfg) as task:  # train.run checks run_dir, then writes .hydra/ and train.log itself
        return train.run(task)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _selections(cfg: DictConfig, run_dir: Path, select: dict[str, str]) -> dict[str, Any]:
    """Test metrics of the stage's extra checkpoints, computed once and kept in ``selections.json``."""
    path = run_dir / "selections.json"
    if path.is_file():
        return _read(path)
    from mlcl.selections import test_checkpoints

    with hydra_runtime(cfg) as task:
        out = test_checkpoints(task, run_dir, select)
    path.write_text(json.dumps(out, indent=2, sort_keys=True))
    return out


def run_method(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage of the selected method in the current Hydra job; return the job's results.

    Writes ``<job>/stages/<stage>/`` run directories and ``<job>/metrics.json`` (final stage's results,
    ``run.method``, every stage's results under ``stages``, tested extra checkpoints under
    ``selections``).
    """
    from hydra.core.hydra_config import HydraConfig

    start = time.time()
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    job_dir = Path(hydra_cfg.runtime.output_dir if hydra_cfg else cfg.paths.output_dir).resolve()
    task = list(hydra_cfg.overrides.task) if hydra_cfg else []
    name = cfg.get("method_name")
    resume = cfg.get("ckpt_path") == "last"
    if cfg.get("ckpt_path") not in (None, "last"):
        raise UserError(
            f"ckpt_path={cfg.ckpt_path!r} cannot resume a multi-stage method",
            f"method={name}",
            "use ckpt_path=last (each stage resumes from its own last.ckpt)",
        )
    result_file = job_dir / runs.RESULT_FILE
    if result_file.is_file():
        if resume:
            print(f"method {name}: already finished, results in {result_file}")
            return _read(result_file)
        raise UserError(
            f"{job_dir} already holds results ({runs.RESULT_FILE}); nothing was changed",
            "hydra.run.dir",
            "use a new hydra.run.dir, or re-run the same command with ckpt_path=last to reuse it",
        )
    from mlcl import runlog

    job_dir.mkdir(parents=True, exist_ok=True)
    handler = runlog.attach_file_log(job_dir)  # the job's train.log; each stage also keeps its own
    try:
        return _run_stages(cfg, job_dir, task, name, resume, start)
    except BaseException:
        runlog.log_failure(handler, f"method {name} failed")  # the traceback goes to train.log only
        raise
    finally:
        runlog.detach_file_log(handler)


def _run_stages(
    cfg: DictConfig, job_dir: Path, task: list[str], name: str | None, resume: bool, start: float
) -> dict[str, Any]:
    """The stages of :func:`run_method`, in order, each initialised from its source stage."""
    result_file = job_dir / runs.RESULT_FILE
    stages = method_stages(cfg)
    names = [s.name for s in stages]
    dropped = sorted({m.group(2) for ov in task if (m := _SCOPED.match(ov))} - set(names))
    shared, scoped = split_overrides(task, names, dropped)
    for stage in stages:  # compose every stage first: a typo in a later stage costs no training
        placeholder = {str(stage.init["key"]): "<earlier stage checkpoint>"} if stage.init else {}
        compose_stage(stage, shared, scoped[stage.name], job_dir / "stages" / stage.name, placeholder)
    done: dict[str, dict[str, Any]] = {}
    dirs: dict[str, Path] = {}
    final_cfg: DictConfig | None = None
    sweep_dir = _sweep_dir()
    for stage in stages:
        settings: dict[str, Any] = {**stage.fixed, "method_name": name, "ckpt_path": None}
        if stage.init is not None:
            src = stage.init["stage"]
            ckpt = select_checkpoint(dirs[src], done[src], str(stage.init["ckpt"]))
            settings[str(stage.init["key"])] = str(ckpt)
        run_dir = job_dir / "stages" / stage.name
        share = stage.shared and sweep_dir is not None
        if share:
            probe = compose_stage(stage, shared, scoped[stage.name], run_dir, settings)
            run_dir = stage_share.shared_stage_dir(sweep_dir, name, stage.name, stage_share.stage_key(probe))
        dirs[stage.name] = run_dir
        with stage_share.locked(run_dir) if share else contextlib.nullcontext():
            done[stage.name], final_cfg = _run_one(
                stage, shared, scoped[stage.name], run_dir, settings, resume or share, name
            )
    final = copy.deepcopy(done[stages[-1].name])
    final["run"] = {
        **final.get("run", {}),
        "method": name,
        "stages": [s.name for s in stages],
        "run_dir": str(job_dir),
        "duration_s": time.time() - start,
    }
    final["stages"] = done
    final["overrides"] = task
    assert final_cfg is not None
    with hydra_runtime(final_cfg) as final_task:
        (job_dir / "config.yaml").write_text(OmegaConf.to_yaml(final_task, resolve=True))
    path = runs.write_json_new(result_file, final)
    _print_summary(final, path)
    return final


def _sweep_dir() -> Path | None:
    """The sweep directory of the current multirun job (None outside a multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    job_dir, subdir = Path(hc.runtime.output_dir), Path(str(hc.sweep.subdir))
    # the job's own directory minus its subdir: ${now:...} in sweep.dir must not be re-evaluated
    if job_dir.parts[-len(subdir.parts) :] == subdir.parts:
        return Path(*job_dir.parts[: -len(subdir.parts)])
    return Path(str(hc.sweep.dir))


def _run_one(
    stage: Stage,
    shared: list[str],
    scoped: list[str],
    run_dir: Path,
    settings: dict[str, Any],
    resume: bool,
    name: str | None,
) -> tuple[dict[str, Any], DictConfig]:
    """Run (or, when resuming, reuse or continue) one stage in ``run_dir``; its results and config."""
    finished = (run_dir / runs.RESULT_FILE).is_file() and resume
    settings = dict(settings)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume and not finished:  # the run record's contract: resume from last.ckpt, or start afresh
        settings["ckpt_path"] = "last"
        if last.is_file():
            log.info("method %s: stage %s resumes from %s", name, stage.name, last)
    stage_cfg = compose_stage(stage, shared, scoped, run_dir, settings)
    if finished:
        log.info("method %s: stage %s finished, skipped (results in %s)", name, stage.name, run_dir)
        res = _read(run_dir / runs.RESULT_FILE)
    else:
        log.info("method %s: stage %s -> %s", name, stage.name, run_dir)
        res = runs.to_float(_run_stage(stage_cfg, run_dir))
    if stage.select:
        res["selections"] = _selections(stage_cfg, run_dir, stage.select)
    return res, stage_cfg


def _print_summary(results: dict[str, Any], path: Path) -> None:
    for stage, res in results["stages"].items():
        m = (res.get("test") or {}).get("mAP")
        shown = f"{float(m):.2f}" if m is not None else "n/a"
        print(f"method {results['run']['method']} stage {stage}: test mAP = {shown}")
        for sel, metrics in (res.get("selections") or {}).items():
            print(f"    checkpoint {sel}: test mAP = {float(metrics.get('mAP', float('nan'))):.2f}")
    print(f"results: {path}")
