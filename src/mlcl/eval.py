"""Entry point: ``mlcl-eval ckpt_path=<run_dir>/checkpoints/best.ckpt`` re-evaluates a checkpoint.

The model and data are rebuilt from the config stored in the checkpoint (``data.*`` in the eval
config overrides data settings, e.g. a new root); metrics are printed and written to the eval run
directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mlcl import cli, config, runlog, runs, threads, wandb_run
from mlcl.checkpoints import checkpoint_weights, load_full_state, read_checkpoint
from mlcl.metrics import per_class_results
from mlcl.models.module import MLCLModule

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    config.validate(cfg, task="eval")
    threads.apply_thread_policy(cfg)  # pops trainer.threads (unknown to lightning.Trainer), logs the count
    ckpt = read_checkpoint(cfg.ckpt_path, key="ckpt_path")
    hp = ckpt.get("hyper_parameters") or {}
    run_cfg = hp.get("run_config")
    if not run_cfg:
        raise ValueError(f"ckpt_path={cfg.ckpt_path!r} holds no run config; was it written by mlcl-train?")
    # weights come from the checkpoint: never re-read the original pretrained file
    hp = {**hp, "backbone": {**hp["backbone"], "pretrained": None}}
    module = MLCLModule(**hp)
    state = checkpoint_weights(ckpt, cfg.weights, key="weights")
    load_full_state(module, state, key=f"ckpt_path={cfg.ckpt_path}")
    data_cfg = OmegaConf.merge(OmegaConf.create(run_cfg["data"]), cfg.get("data") or {})
    dm = instantiate(data_cfg, missing={"mode": "none"})
    dm.setup("test")
    callbacks = []
    if cfg.get("progress_bar", True):
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=True))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks)
    loader = dm.test_dataloader() if cfg.split == "test" else dm.val_dataloader()
    if cfg.split == "val":  # report val numbers under the test keys' layout
        module.test_metrics = module.val_metrics
    metrics = trainer.test(module, dataloaders=loader, verbose=False)[0]
    results = {
        "ckpt_path": str(cfg.ckpt_path),
        "split": cfg.split,
        "weights": "ema" if ("ema" in ckpt and cfg.weights != "raw") else "raw",
        cfg.split: {k.removeprefix("test/"): v for k, v in metrics.items()},
        "run": {
            "loss": run_cfg.get("loss_name"),
            "data": run_cfg.get("data_name"),
            "seed": run_cfg.get("seed"),
        },
    }
    if module.test_per_class is not None:
        results["per_class"] = per_class_results(module.test_per_class, dm.class_names)
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(".")
    if (cfg.get("diagnostics") or {}).get("enabled"):
        from mlcl.diagnostics import run_diagnostics

        results["representation"] = run_diagnostics(cfg, module, dm, out_dir)
    path = runs.write_json_new(out_dir / "eval_metrics.json", results)
    _print(results, path)
    wandb_run.log_results(cfg, results, out_dir, module, files=[path])
    return results


def _print(results: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    split = results["split"]
    table = Table(title=f"{results['ckpt_path']} [{results['weights']} weights, {split} split]")
    table.add_column("metric")
    table.add_column(split, justify="right")
    for k, v in results[split].items():
        table.add_row(k, f"{float(v):.4f}")
    Console().print(table)
    Console().print(f"results: {path}")


@cli.hydra_main("eval")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    handler = runlog.attach_file_log(out_dir, "eval.log")  # Hydra itself writes no log file
    try:
        with wandb_run.job(cfg, "eval"):  # only with a W&B logger: mlcl-eval ... +logger=wandb
            evaluate(cfg)
    except BaseException:
        runlog.log_failure(handler, "evaluation failed")  # the traceback goes to eval.log only
        raise
    finally:
        runlog.detach_file_log(handler)


if __name__ == "__main__":
    main()
