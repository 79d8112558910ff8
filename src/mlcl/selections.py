"""Test a run's extra checkpoints (another selection rule than the run's ``monitor``).

A method stage lists them as ``_select_: {name: file in checkpoints/}``, e.g. the checkpoint of the last
dev-loss improvement (``best_dev_loss.ckpt``, written by an extra ``ModelCheckpoint`` on ``val/bce``,
mode min) as MulSupCon's yeast protocol reports (baselines spec §5.2). Metrics are on the 0-100 scale:
``mAP`` (:func:`mlcl.metrics.mean_average_precision`) and ``yeast.<name>``
(:func:`mlcl.metrics.yeast_metrics` x 100).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mlcl.checkpoints import checkpoint_weights, read_checkpoint
from mlcl.errors import UserError
from mlcl.metrics import mean_average_precision, yeast_metrics


def checkpoint_scores(cfg: DictConfig, ckpt_path: Path) -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` of the test split under the checkpoint's weights, and its targets ``[N, C]``.

    The model is rebuilt from the checkpoint's hyper-parameters; the weights evaluated are the EMA ones
    when the run kept them and ``ema.evaluate`` is ``ema``, else the raw ones (as the run's own test).
    """
    from mlcl.models.module import MLCLModule

    ckpt = read_checkpoint(ckpt_path, key="_select_")
    hp = dict(ckpt.get("hyper_parameters") or {})
    hp["backbone"] = {**hp["backbone"], "pretrained": None}  # the weights come from the checkpoint
    module = MLCLModule(**hp)
    use_ema = "ema" in ckpt and (cfg.get("ema") or {}).get("evaluate", "ema") == "ema"
    module.load_state_dict(checkpoint_weights(ckpt, "ema" if use_ema else "raw"), strict=False)
    module.eval()
    dm = instantiate(cfg.data, missing=OmegaConf.to_container(cfg.missing, resolve=True), num_views=1)
    dm.setup("test")
    logits, targets = [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            logits.append(module(batch["input"])["logits"].float())
            targets.append(batch["target"])
    return torch.cat(logits), torch.cat(targets)


def test_checkpoints(cfg: DictConfig, run_dir: Path, select: dict[str, str]) -> dict[str, dict[str, float]]:
    """``{name: {"mAP", "yeast.<metric>", "checkpoint"}}`` for each ``name: file`` of ``select``."""
    out: dict[str, dict[str, Any]] = {}
    for name, file in select.items():
        path = Path(run_dir) / "checkpoints" / file
        if not path.is_file():
            raise UserError(
                f"the checkpoint {file!r} that _select_.{name} names was not written",
                str(path.parent),
                "add a ModelCheckpoint callback that writes it (callbacks.<name>) or fix the file name",
            )
        logits, targets = checkpoint_scores(cfg, path)
        known = (targets >= 0).all(1)  # test labels are complete; guard anyway
        logits, targets = logits[known], targets[known]
        metrics = {"mAP": float(mean_average_precision(logits, targets)["mAP"])}
        for k, v in yeast_metrics(torch.sigmoid(logits.double()), targets).items():
            metrics[f"yeast.{k}"] = 100.0 * float(v)
        out[name] = {**metrics, "checkpoint": str(path)}
    return out
