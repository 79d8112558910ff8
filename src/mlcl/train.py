"""Entry point: ``python -m mlcl.train [overrides]`` / ``mlcl-train``.

Composes the Hydra config, builds datamodule, module, callbacks, loggers and trainer, fits, tests
the best checkpoint and writes ``metrics.json`` into the run directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from mlcl import cli, config, runs
from mlcl.data.datamodule import MultiLabelDataModule
from mlcl.models.module import MLCLModule

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


def build_callbacks(cfg: DictConfig, run_dir: Path, with_logger: bool = True) -> list[L.Callback]:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    from mlcl.callbacks import EMA

    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=cfg.monitor,
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
    )
    cbs: list[L.Callback] = [ckpt]
    if with_logger:
        cbs.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.get("progress_bar", True):
        cbs.append(RichProgressBar(leave=True))
    if cfg.get("ema") and cfg.ema.get("decay"):
        cbs.append(EMA(decay=cfg.ema.decay, evaluate=cfg.ema.get("evaluate", "ema")))
    for extra in (cfg.get("callbacks") or {}).values():
        cbs.append(instantiate(extra))
    return cbs


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train + test one configuration; returns the results written to ``metrics.json``."""
    config.validate(cfg)  # types, ranges, paths, combinations: before anything is built or written
    start = time.time()
    run_dir = Path(
        HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.paths.output_dir
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.ensure_fresh_run_dir(run_dir, resume=cfg.get("ckpt_path") is not None)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    dm: MultiLabelDataModule = instantiate(
        cfg.data, missing=OmegaConf.to_container(cfg.missing, resolve=True), num_views=num_views(cfg)
    )
    dm.setup("fit")
    module = build_module(cfg, dm)
    module.loss_fn.on_train_targets(dm.train_targets)
    if cfg.get("init_ckpt"):
        from mlcl.checkpoints import load_init_weights

        load_init_weights(module, cfg.init_ckpt, cfg.get("init_weights", "ema"), cfg.get("init_modules"))
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=build_callbacks(cfg, run_dir, bool(loggers)),
        logger=loggers or False,
        default_root_dir=run_dir,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    if trainer.interrupted:
        raise SystemExit(
            f"training was interrupted; checkpoints so far are in {run_dir / 'checkpoints'} "
            "(resume with ckpt_path=.../last.ckpt)"
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
        "best_ckpt": best,
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
            "tag": cfg.get("tag"),
            "init_ckpt": cfg.get("init_ckpt"),
            "epochs": trainer.current_epoch,
            "skipped_steps": module.skipped_steps,
            "duration_s": time.time() - start,
            "run_dir": str(run_dir),
        },
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
    }
    if trainer.is_global_zero:
        path = runs.write_json_new(run_dir / runs.RESULT_FILE, results)
        _print_summary(results, path)
    return results


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
    console = Console()
    console.print(table)
    console.print(f"chance level (mean per-class label prior on test) = {results['chance_mAP']:.2f} mAP")
    console.print(f"results: {path}")


@cli.hydra_main("train")
def main(cfg: DictConfig) -> float | None:
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
