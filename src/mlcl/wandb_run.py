"""Weights & Biases: one W&B run per job, named by what varies in the sweep, finished when the job ends.

Entry points wrap a job in :func:`job` and report with :func:`log_results`::

    with wandb_run.job(cfg, "train"):        # no-op unless cfg.logger holds a W&B logger
        ...                                  # the W&B logger attaches to the run started here
        wandb_run.log_results(cfg, results, run_dir, module)

* one run per job with every launcher: the basic launcher runs all jobs in one process, so the run is
  finished at job end (``exit_code=1`` when the job raised, which marks it failed);
* name = the overrides that vary within the sweep (from ``<sweep dir>/multirun.yaml``, or the
  sweeper's ``params`` for optuna), e.g. ``loss=asl,missing.rate=0.5,seed=1``; single runs: their
  task overrides, else the loss name;
* group = ``experiment_name`` or the sweep directory; tags = ``tags`` + loss, data, backbone;
* config = the resolved config, once (the logger's ``log_hyperparams`` is a no-op on such a run);
* summary = the checkpointed best of the monitored metric (``best_val``), the test metrics,
  ``chance_mAP`` and the label statistics; a per-class AP table, PR curves and an artifact with
  ``metrics.json`` and ``config.yaml``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# overrides that say where things go, not what was run: left out of run names
_NOISE = re.compile(r"^[+~]*(hydra|paths|logger|ckpt_path|init_ckpt|progress_bar)(\.|$)|(_dir|_path)$")
MAX_PR_POINTS = 101  # per class: enough for a smooth curve, small enough for a W&B table


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger that joins the run :func:`job` started (config already set once).

    Without such a run it behaves exactly like :class:`lightning.pytorch.loggers.WandbLogger`.
    """

    def __init__(self, **kwargs: Any) -> None:
        import wandb

        self._joined = wandb.run is not None
        if self._joined:
            kwargs["experiment"] = wandb.run
        super().__init__(**kwargs)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if not self._joined:  # the joined run got the resolved config at init; no second copy
            super().log_hyperparams(params, *args, **kwargs)


def wandb_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The configured W&B logger's settings (``cfg.logger.<name>`` whose target is a W&B logger)."""
    for lg in (cfg.get("logger") or {}).values():
        if isinstance(lg, DictConfig) and "wandb" in str(lg.get("_target_", "")).lower():
            return OmegaConf.to_container(lg, resolve=True)  # type: ignore[return-value]
    return None


def _hydra() -> Any:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _parse(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _short(text: str) -> str:
    """A float override value with at most 4 significant digits (optuna samples 0.0012345678...)."""
    key, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        return text
    return f"{key}{sep}{number:.4g}" if "." in value or "e" in value.lower() else text


def sweep_keys(hc: Any) -> list[str]:
    """Config keys that vary within the sweep this job belongs to."""
    keys: list[str] = []
    multirun = Path(str(hc.sweep.dir)) / "multirun.yaml"
    if multirun.is_file():  # written by Hydra's basic sweeper (basic and submitit launchers)
        task = OmegaConf.load(multirun).hydra.overrides.task
        keys += [o.key_or_group for o in _parse(list(task)) if o.is_sweep_override()]
    params = OmegaConf.select(hc, "sweeper.params") or {}
    keys += [str(k) for k in params]  # optuna: every searched parameter varies
    return list(dict.fromkeys(keys))


def run_name(cfg: DictConfig) -> str:
    """The overrides that vary within the sweep (``loss=asl,seed=1``), or a single run's overrides."""
    from hydra.types import RunMode

    hc = _hydra()
    task = list(hc.overrides.task) if hc is not None else []
    parsed = list(zip(task, _parse(task))) if task else []
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        varying = set(sweep_keys(hc))
        parts = [_short(t) for t, o in parsed if o.key_or_group in varying]
        if parts:
            return ",".join(parts)
    parts = [_short(t) for t, o in parsed if not _NOISE.search(o.key_or_group)]
    if parts:
        return ",".join(parts)
    return str(cfg.get("loss_name") or cfg.get("task_name") or "run")


def run_group(cfg: DictConfig) -> str | None:
    """``experiment_name`` when set, else the sweep directory of a multirun (None for a single run)."""
    from hydra.types import RunMode

    if cfg.get("experiment_name"):
        return str(cfg.experiment_name)
    hc = _hydra()
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        sweep = Path(str(hc.sweep.dir))
        log_dir = OmegaConf.select(cfg, "paths.log_dir")
        try:
            return str(sweep.resolve().relative_to(Path(str(log_dir)).resolve()))
        except (TypeError, ValueError):
            return str(sweep)
    return None


def run_tags(cfg: DictConfig) -> list[str]:
    """The run's ``tags`` plus loss, data, backbone (and method, tag when set); W&B caps tags at 64 chars."""
    tags = [str(t) for t in (cfg.get("tags") or [])]
    for key in ("loss_name", "data_name", "backbone.name", "method_name", "tag"):
        value = OmegaConf.select(cfg, key, default=None)
        if value not in (None, ""):
            tags.append(str(value))
    return list(dict.fromkeys(t[:64] for t in tags))


@contextmanager
def job(cfg: DictConfig, job_type: str) -> Iterator[Any]:
    """Run one job inside its own W&B run (yields the run, or None when no W&B logger is configured).

    The run is finished when the block exits: ``exit_code=0`` normally, ``1`` when it raised (W&B
    marks it failed), so the next job of a basic-launcher sweep starts a fresh run.
    """
    from lightning.pytorch.utilities import rank_zero_only

    settings = wandb_settings(cfg)
    # DDP / SLURM ranks > 0 re-run the entry point: only global rank 0 owns the job's W&B run
    if settings is None or getattr(rank_zero_only, "rank", 0) != 0:
        yield None
        return
    import wandb

    if wandb.run is not None:  # left open by an earlier job in this process: close it first
        wandb.finish()
    save_dir = settings.get("save_dir") or settings.get("dir") or "."
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=settings.get("project"),
        entity=settings.get("entity"),
        dir=str(save_dir),
        mode="offline" if settings.get("offline") else None,
        name=run_name(cfg),
        group=run_group(cfg),
        job_type=job_type,
        tags=run_tags(cfg),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    # Lightning's logger defines these itself only for runs it starts
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    try:
        yield run
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish(exit_code=0)


def _flat(prefix: str, tree: Any) -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(f"{prefix}/{k}", v))
        return out
    return {prefix: tree} if isinstance(tree, int | float | str | bool) else {}


def summary_values(cfg: DictConfig, results: dict[str, Any]) -> dict[str, Any]:
    """What goes into the run summary: best monitored value, test metrics, chance level, label stats."""
    out: dict[str, Any] = {}
    best = results.get("best_val")
    if best is not None:
        out["best_val"] = float(best)
        out[str(cfg.get("monitor") or "val/mAP")] = float(best)  # not the last epoch's value
    for split in ("test", "val"):
        if split == "val" and "test" in results:
            continue  # train: val/* already logged per epoch; eval on the val split reports here
        for k, v in (results.get(split) or {}).items():
            out[f"{split}/{k}"] = float(v)
    if results.get("chance_mAP") is not None:
        out["chance_mAP"] = float(results["chance_mAP"])
    out.update(_flat("label_stats", results.get("label_stats") or {}))
    return out


def pr_curve_rows(scores: Any, targets: Any, class_names: list[str]) -> list[list[Any]]:
    """``[class, recall, precision]`` rows of every class's PR curve (``-1`` targets dropped), each
    thinned to at most :data:`MAX_PR_POINTS` points."""
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    s = scores.detach().float().cpu().numpy()
    t = targets.detach().cpu().numpy()
    rows: list[list[Any]] = []
    for c, name in enumerate(class_names):  # one curve per class; a report, not a hot path
        known = t[:, c] != -1
        if not (t[known, c] == 1).any():
            continue
        precision, recall, _ = precision_recall_curve(t[known, c] == 1, s[known, c])
        keep = np.unique(np.linspace(0, len(recall) - 1, min(MAX_PR_POINTS, len(recall))).round().astype(int))
        rows += [[str(name), float(recall[i]), float(precision[i])] for i in keep]
    return rows


def log_results(
    cfg: DictConfig,
    results: dict[str, Any],
    run_dir: Path,
    module: Any = None,
    files: list[Path] | None = None,
) -> None:
    """Summary, per-class AP table, PR curves and the result files of a finished job (no-op without W&B)."""
    try:
        import wandb
    except ImportError:
        return
    run = wandb.run
    if run is None or wandb_settings(cfg) is None:
        return
    run.summary.update(summary_values(cfg, results))
    info = results.get("run") or {}
    if run.job_type == "eval" and info.get("loss"):  # an eval's overrides are paths: name it by its run
        run.name = f"eval:loss={info['loss']},data={info.get('data')},seed={info.get('seed')}"
    per_class = results.get("per_class")
    if per_class and per_class.get("AP"):
        pos = per_class.get("positives") or {}
        rows = [[name, float(ap), int(pos.get(name, 0))] for name, ap in per_class["AP"].items()]
        run.log({"test/per_class_AP": wandb.Table(columns=["class", "AP", "positives"], data=rows)})
        outputs = getattr(module, "test_outputs", None)
        if outputs is not None:
            table = wandb.Table(
                columns=["class", "recall", "precision"], data=pr_curve_rows(*outputs, list(per_class["AP"]))
            )
            chart = wandb.plot.line(table, "recall", "precision", stroke="class", title="PR curves (test)")
            run.log({"test/pr_curves": chart})
    artifact = wandb.Artifact(f"results-{run.id}", type="results")
    for path in files or [Path(run_dir) / "metrics.json", Path(run_dir) / "config.yaml"]:
        if Path(path).is_file():
            artifact.add_file(str(path))
    run.log_artifact(artifact)
