"""Training logs of MLCLModule: per-epoch means summed by the module equal the batch-size-weighted mean
of the step losses, step values reach the logger on its steps only, the progress bar shows the loss."""

from __future__ import annotations

import csv

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mlcl.models.module import MLCLModule


class _Items(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (torch.rand(n, 3, generator=g) < 0.4).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input": self.x[i], "target": self.y[i], "index": torch.tensor(i)}


class _Record(L.Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []
        self.bar: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((float(outputs["loss"]), int(batch["target"].shape[0])))
        self.bar.append(dict(trainer.progress_bar_metrics))


def test_epoch_means_step_rows_and_progress_bar(tmp_path):
    torch.manual_seed(0)
    module = MLCLModule(
        backbone={"name": "mlp", "widths": [8]},
        loss={"_target_": "mlcl.losses.classification.BCE"},
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.1},
        num_classes=3,
        in_features=6,
    )
    # 13 samples in batches of 4: the last batch has 1 row, so a plain mean of steps would differ
    loader = DataLoader(_Items(13), batch_size=4)
    rec = _Record()
    trainer = L.Trainer(
        max_epochs=2,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[rec],
    )
    trainer.fit(module, train_dataloaders=loader)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    epoch_rows = [r for r in rows if r.get("train/loss_epoch")]
    assert len(epoch_rows) == 2
    for e, row in enumerate(epoch_rows):
        steps = rec.steps[4 * e : 4 * e + 4]
        expected = sum(v * b for v, b in steps) / sum(b for _, b in steps)
        assert abs(float(row["train/loss_epoch"]) - expected) < 1e-5
    # step rows on the logger's steps only (every 3rd of the 8 steps: 2, 5), with that step's loss
    step_rows = [r for r in rows if r.get("train/loss_step")]
    assert [int(r["step"]) for r in step_rows] == [2, 5]
    for r in step_rows:
        assert abs(float(r["train/loss_step"]) - rec.steps[int(r["step"])][0]) < 1e-5
    # the un-suffixed epoch mean stays readable by callbacks, as with log_dict(on_epoch=True)
    last = sum(v * b for v, b in rec.steps[4:]) / 13
    assert abs(float(trainer.callback_metrics["train/loss"]) - last) < 1e-5
    # the bar shows a loss from the first step of each epoch on and is refreshed on the logger's steps
    assert all("loss" in m for m in rec.bar)
    assert abs(float(rec.bar[0]["loss"]) - rec.steps[0][0]) < 1e-5
    assert abs(float(rec.bar[1]["loss"]) - rec.steps[0][0]) < 1e-5
    assert abs(float(rec.bar[2]["loss"]) - rec.steps[2][0]) < 1e-5
