"""Learning rate at every training step of a real Trainer fit against each scheduler's closed form.

3 steps per epoch (24 samples, batch 8) and two parameter groups (``lr_mults: {backbone: 0.5}``),
so a scheduler stepped per batch instead of per epoch, a missed group or a wrong horizon shows.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from tests import looptools

BASE_LR = 1e-3
MULTS = (0.5, 1.0)  # backbone, head
STEPS = 3


class LrRecorder(L.Callback):
    """lr of every group when each training batch starts (= the lr of that step), and val/bce per epoch."""

    def __init__(self) -> None:
        self.lrs: list[tuple[int, list[float]]] = []
        self.val_bce: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        self.lrs.append((trainer.current_epoch, [float(g["lr"]) for g in groups]))

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_bce.append(float(trainer.callback_metrics["val/bce"]))


def fit(scheduler: dict, epochs: int, lr: float = BASE_LR) -> LrRecorder:
    torch.manual_seed(0)
    dm = looptools.datamodule()
    model = looptools.module(
        dm,
        scheduler=scheduler,
        lr_mults={"backbone": MULTS[0]},
        optimizer={"_target_": "torch.optim.AdamW", "lr": lr, "weight_decay": 0.0},
    )
    rec = LrRecorder()
    looptools.trainer(epochs, [rec]).fit(model, datamodule=dm)
    groups = model.trainer.optimizers[0].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    first = [names[id(g["params"][0])].split(".")[0] for g in groups]
    assert first == ["backbone", "head"]  # the order MULTS refers to
    assert len(rec.lrs) == epochs * STEPS
    return rec


def assert_lrs(rec: LrRecorder, expected_factor, base_lr: float = BASE_LR) -> None:
    """``expected_factor(step, epoch, group)`` -> lr multiplier of the base lr of that group."""
    for step, (epoch, lrs) in enumerate(rec.lrs):
        assert epoch == step // STEPS
        for g, (lr, mult) in enumerate(zip(lrs, MULTS, strict=True)):
            want = expected_factor(step, epoch, g) * base_lr * mult
            assert lr == pytest.approx(want, rel=1e-9, abs=1e-15), (step, epoch, g)


def test_cosine_with_warmup_steps_per_epoch():
    epochs, warm, floor = 5, 1, 0.1
    rec = fit({"name": "cosine", "warmup_epochs": warm, "min_lr_ratio": floor}, epochs)

    def factor(step: int, epoch: int, group: int) -> float:
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        progress = (epoch - warm) / (epochs - warm)
        return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2

    assert_lrs(rec, factor)


def test_cosine_restarts_per_epoch():
    eta_min = 1e-5
    rec = fit({"name": "cosine_restarts", "T_0": 2, "T_mult": 2, "eta_min": eta_min}, 6)
    cycles = [(0, 2), (2, 4)]  # (first epoch, length): epochs 0-1, then 2-5

    def factor(step: int, epoch: int, group: int) -> float:
        start, length = next((s, n) for s, n in cycles if s <= epoch < s + n)
        base = BASE_LR * MULTS[group]
        lr = eta_min + (base - eta_min) * (1 + math.cos(math.pi * (epoch - start) / length)) / 2
        return lr / base

    assert_lrs(rec, factor)


@pytest.mark.parametrize("planned_epochs", [None, 8])
def test_onecycle_per_step(planned_epochs):
    epochs, pct = 4, 0.25
    rec = fit({"name": "onecycle", "pct_start": pct, "planned_epochs": planned_epochs}, epochs)
    total = STEPS * (planned_epochs or epochs)
    peak_step = pct * total - 1  # torch's end of the warm-up phase
    start, end = 1 / 25, 1 / 25 / 1e4  # initial = max / div_factor, final = initial / final_div_factor

    def cos_between(a: float, b: float, t: float) -> float:
        return b + (a - b) * (1 + math.cos(math.pi * t)) / 2

    def factor(step: int, epoch: int, group: int) -> float:
        if step <= peak_step:
            return cos_between(start, 1.0, step / peak_step)
        return cos_between(1.0, end, (step - peak_step) / (total - 1 - peak_step))

    assert_lrs(rec, factor)


def test_step_decay_per_epoch():
    rec = fit({"name": "step", "step_size": 2, "gamma": 0.5}, 5)
    assert_lrs(rec, lambda step, epoch, group: 0.5 ** (epoch // 2))


def plateau_factors(
    values: list[float], factor: float, patience: int, cooldown: int, thr: float
) -> list[float]:
    """lr multiplier at the start of every epoch of ReduceLROnPlateau(mode=min, rel threshold)."""
    out, mult, best, bad, cool = [1.0], 1.0, math.inf, 0, 0
    for v in values:
        if v < best * (1 - thr):
            best, bad = v, 0
        else:
            bad += 1
        if cool > 0:
            cool, bad = cool - 1, 0
        if bad > patience:
            mult, cool, bad = mult * factor, cooldown, 0
        out.append(mult)
    return out


def test_plateau_on_val_bce_per_epoch():
    sched = {"name": "plateau", "factor": 0.5, "patience": 1, "cooldown": 1, "threshold": 0.05}
    # a tiny lr and a 5 % threshold: val/bce stalls, so the plateau logic reduces within a few epochs
    rec = fit(sched, 7, lr=1e-5)
    expected = plateau_factors(rec.val_bce, 0.5, 1, 1, 0.05)
    assert len(set(expected[:7])) > 1, rec.val_bce  # at least one reduction happened
    assert_lrs(rec, lambda step, epoch, group: expected[epoch], base_lr=1e-5)
