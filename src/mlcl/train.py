"""Entry point: ``python -m mlcl.train [overrides]`` / ``mlcl-train``.

Composes the Hydra config, builds datamodule, module, callbacks, loggers and trainer, fits, tests
the best checkpoint and writes ``metrics.json`` into the run directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from mlcl import cli, config, runlog, runs, threads, wandb_run
from mlcl.callbacks import SkipBudget, build_callbacks
from mlcl.data.datamodule import MultiLabelDataModule
from mlcl.metrics import per_class_results
from mlcl.models.module import MLCLModule
from mlcl.rng import RNGState

log = logging.getLogger(__name__)


def input_shape(dm: MultiLabelDataModule) -> dict[str, int]:
    """``in_chans`` (images) or ``in_features`` (vectors) read off the first training sample."""
    x = dm.splits["val"][0]["input"]
    if x.dim() == 1:
        return {"in_features": int(x.shape[0]), "in_chans": 1}
    return {"in_chans": int(x.shape[0])}


def num_views(cfg: DictConfig) -> int:
    """``data.num_views``, or when it is null the number of views the loss needs (2 for SupCon-style)."""
    if cfg.data.get("num_views") is not None:
        return int(cfg.data.num_views)
    return int(getattr(get_class(cfg.loss._target_), "num_views", 1))


def chance_map(dm: MultiLabelDataModule) -> float:
    """mAP of a random ranking in expectation: the mean per-class positive rate of the test split (%)."""
    t = dm.splits["test"].targets
    known = (t != -1).sum(0).clamp_min(1)
    return float(100 * ((t == 1).sum(0) / known).mean())


def build_module(cfg: DictConfig, dm: MultiLabelDataModule) -> MLCLModule:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("max_skipped_fraction", None)  # read by the SkipBudget callback
    return MLCLModule(
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        num_classes=dm.num_classes,
        num_samples=dm.num_train,
        num_views=dm.num_views,
        class_names=dm.class_names,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        **input_shape(dm),
        **model_cfg,
    )


def _is_debug(cfg: DictConfig) -> bool:
    """Debug runs (``debug=...`` or any ``trainer.fast_dev_run``) write no results mlcl-compare reads."""
    return bool(cfg.get("debug_run")) or bool(cfg.trainer.get("fast_dev_run"))


def _trainer_plugins(cfg: DictConfig) -> list[Any]:
    """Atomic checkpoint files; under a submitit SLURM job, submitit (not Lightning) requeues."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from mlcl.ckpt_io import AtomicCheckpointIO

    plugins: list[Any] = [instantiate(p) for p in cfg.trainer.get("plugins") or []]
    plugins.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect():
        # submitit requeues on timeout/pre-emption itself (launcher max_num_timeout); a plain sbatch job
        # with --signal=SIGUSR1@90 is requeued by Lightning; both resume from last.ckpt (runs.plan_run)
        plugins.append(SLURMEnvironment(auto_requeue="SUBMITIT_EXECUTOR" not in os.environ))
    return plugins


def _recorded_overrides() -> list[str]:
    """This command's overrides, without ``ckpt_path`` (a resumed run is the same run)."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("ckpt_path=")]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train + test one configuration; returns the results written to ``metrics.json``.

    The run directory is checked before anything is written to it (:func:`mlcl.runs.plan_run`): a
    finished run returns its stored results, an interrupted one resumes, a taken one is refused.
    """
    config.validate(cfg)  # types, ranges, paths, combinations: before anything is built or written
    start = time.time()
    hydra_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.paths.output_dir
    plan = runs.plan_run(Path(hydra_dir), cfg.get("ckpt_path"))
    run_dir = plan.run_dir
    if run_dir != Path(hydra_dir).resolve():  # resuming into the checkpoint's own run
        with contextlib.suppress(OSError):
            Path(hydra_dir).rmdir()  # the empty directory Hydra made for this command
    if plan.finished:
        log.info("%s; nothing to do (results: %s)", plan.reason, run_dir / runs.RESULT_FILE)
        return runs.read_results(run_dir)
    if run_dir != Path(hydra_dir).resolve():
        runs.redirect_hydra_output(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    leader = runs.is_rank_zero()  # other DDP ranks neither log to the file nor write the record
    handler = runlog.attach_file_log(run_dir) if leader else None
    try:
        return _run_accepted(cfg, plan, start, leader)
    except BaseException:
        runlog.log_failure(handler, "run failed")  # the traceback goes to train.log only
        raise
    finally:
        if handler is not None:
            runlog.detach_file_log(handler)


def _run_accepted(cfg: DictConfig, plan: runs.RunPlan, start: float, leader: bool = True) -> dict[str, Any]:
    run_dir = plan.run_dir
    if leader:
        runs.remove_stale_tmp(run_dir)
        runs.write_run_record(run_dir, cfg)
        runlog.record_config(cfg, resumed_from=str(plan.ckpt_path) if plan.resume else None)
    log.info("run directory %s: %s", run_dir, plan.reason)
    if cfg.get("print_config", True) and leader:
        runlog.print_config(cfg)
    threads.apply_thread_policy(cfg)  # pops trainer.threads (unknown to lightning.Trainer), logs the count
    L.seed_everything(cfg.seed, workers=True)

    dm: MultiLabelDataModule = instantiate(
        cfg.data, missing=OmegaConf.to_container(cfg.missing, resolve=True), num_views=num_views(cfg)
    )
    dm.setup("fit")
    module = build_module(cfg, dm)
    module.loss_fn.on_train_targets(dm.train_targets)
    if cfg.get("init_ckpt") and not plan.resume:
        from mlcl.checkpoints import load_init_weights

        load_init_weights(module, cfg.init_ckpt, cfg.get("init_weights", "ema"), cfg.get("init_modules"))
    tags = _tags(cfg)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    for lg in loggers:
        lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "tags": tags})
    budget = SkipBudget(float(cfg.model.get("max_skipped_fraction", 0.1)))
    callbacks = [
        *build_callbacks(cfg, run_dir, bool(loggers), debug=_is_debug(cfg)),
        RNGState(cfg.seed),
        budget,
        runlog.EpochSummary(),
    ]
    # without a checkpoint callback Lightning would add its own (epoch=..-step=...ckpt): none is wanted
    has_ckpt = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        **({} if has_ckpt else {"enable_checkpointing": False}),
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=run_dir,
        plugins=_trainer_plugins(cfg),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=plan.ckpt_path, weights_only=False)
    if trainer.interrupted:
        raise SystemExit(
            f"training was interrupted; checkpoints so far are in {run_dir / 'checkpoints'} "
            "(resume with the same command plus ckpt_path=last)"
        )
    fit_metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    test_metrics = {}
    if cfg.get("test", True):
        test_metrics = trainer.test(module, datamodule=dm, ckpt_path=best or None, weights_only=False)[0]
    results = {
        "val": {k.removeprefix("val/"): v for k, v in fit_metrics.items()},
        "best_val": float(ckpt_cb.best_model_score)
        if ckpt_cb is not None and ckpt_cb.best_model_score is not None
        else None,
        "test": {k.removeprefix("test/"): v for k, v in test_metrics.items()},
        # relative to the run directory: a copied run stays self-contained
        "best_ckpt": os.path.relpath(best, run_dir) if best else None,
        "label_stats": dm.label_stats,
        "chance_mAP": chance_map(dm),
        "run": {
            "loss": cfg.loss_name,
            "backbone": cfg.backbone.name,
            "data": cfg.data_name,
            "seed": cfg.seed,
            "missing_mode": cfg.missing.get("mode", "none"),
            "missing_rate": cfg.missing.get("rate", 0.0),
            "experiment": cfg.get("experiment_name"),
            "method": cfg.get("method_name"),
            "tag": cfg.get("tag"),
            "init_ckpt": cfg.get("init_ckpt"),
            "epochs": trainer.current_epoch,
            "skipped_steps": budget.skipped,
            "steps": budget.seen,
            "resumed": plan.resume,
            "duration_s": time.time() - start,
            "run_dir": str(run_dir),
        },
        "tags": tags,
        "overrides": _recorded_overrides(),
    }
    if module.test_per_class is not None:
        results["per_class"] = per_class_results(module.test_per_class, dm.class_names)
    if (cfg.get("diagnostics") or {}).get("enabled") and trainer.is_global_zero:
        from mlcl.diagnostics import run_diagnostics

        results["representation"] = run_diagnostics(cfg, module, dm, run_dir, loggers)
    if trainer.is_global_zero:
        name = runs.DEBUG_RESULT_FILE if _is_debug(cfg) else runs.RESULT_FILE
        path = runs.write_json_new(run_dir / name, results)
        _print_summary(results, path)
        wandb_run.log_results(cfg, results, run_dir, module, files=[path, run_dir / "config.yaml"])
    # callers in this process (pipelines) get an absolute path
    return {**results, "best_ckpt": best}


def _tags(cfg: DictConfig) -> list[str]:
    """``tags`` (a list) plus the single ``tag`` when set."""
    tags = [str(t) for t in (cfg.get("tags") or [])]
    if cfg.get("tag") is not None and str(cfg.tag) not in tags:
        tags.append(str(cfg.tag))
    return tags


def _print_summary(results: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    run = results["run"]
    table = Table(title=f"loss={run['loss']} data={run['data']} seed={run['seed']}", title_justify="left")
    table.add_column("metric")
    table.add_column("test", justify="right")
    for k, v in results["test"].items():
        if k in ("mAP", "CF1", "OF1", "CP", "CR", "OP", "OR", "bce"):
            table.add_row(k, f"{float(v):.2f}" if k != "bce" else f"{float(v):.4f}")
    Console().print(table)
    runlog.record_log.info("test results:\n%s", runlog.render_text(table))
    log.info("chance level (mean per-class label prior on test) = %.2f mAP", results["chance_mAP"])
    if run.get("skipped_steps"):
        log.warning(
            "%d of %d training steps were skipped (non-finite loss)", run["skipped_steps"], run["steps"]
        )
    log.info("results: %s", path)


@cli.hydra_main("train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("stages"):  # stages of other methods of the sweep, named on the command line, go first
        from mlcl.stages import drop_undeclared_stages

        drop_undeclared_stages(
            cfg, list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        )
    with wandb_run.job(cfg, "train"):  # one W&B run per job, finished (or marked failed) here
        if cfg.get("stages"):  # a multi-stage method (conf/method/): mlcl.stages runs its stages in this job
            from mlcl.stages import run_method

            results = run_method(cfg)
        else:
            results = run(cfg)
    metric = cfg.get("optimized_metric")
    if metric:
        if metric == cfg.monitor and results.get("best_val") is not None:
            return float(results["best_val"])  # the checkpointed (best-epoch) value
        split, _, key = metric.partition("/")
        value = results.get(split, {}).get(key)
        return float(value) if value is not None else None
    return None


if __name__ == "__main__":
    main()
