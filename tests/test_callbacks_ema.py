"""The EMA callback inside a real Trainer: the shadow recursion, evaluation on the shadow, resume.

Expected values are computed in float64 from the recorded raw-weight trajectory, and evaluation
metrics from a separate copy of the model loaded with the shadow (numpy BCE, sklearn AP).
"""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torch import Tensor
from torch.utils.data import DataLoader

from mlcl.callbacks import EMA
from tests import looptools

DECAY = 0.7


class Trajectory(L.Callback):
    """Raw float64 weights at fit start and at the start and end of every training batch."""

    def __init__(self) -> None:
        self.start: dict[str, Tensor] = {}
        self.before: list[dict[str, Tensor]] = []
        self.after: list[dict[str, Tensor]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = looptools.model_state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(looptools.model_state(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(looptools.model_state(pl_module))


def ema_recursion(
    start: dict[str, Tensor], steps: list[dict[str, Tensor]], decay: float
) -> dict[str, Tensor]:
    """``s_0 = start``, ``s_k = decay * s_{k-1} + (1 - decay) * w_k`` in float64, one loop per step."""
    s = {k: v.clone() for k, v in start.items()}
    for w in steps:
        s = {k: decay * s[k] + (1.0 - decay) * w[k] for k in s}
    return s


def assert_close_states(got: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 2e-6) -> None:
    assert set(expected) <= set(got)
    for k, v in expected.items():
        diff = (got[k].to(torch.float64) - v).abs().max().item() if v.numel() else 0.0
        assert diff <= atol, f"{k}: max |diff| {diff:.3g}"


@pytest.fixture(scope="module")
def fitted():
    """Two epochs x three steps with EMA(decay=0.7) evaluated on the shadow."""
    torch.manual_seed(0)
    dm = looptools.datamodule(missing={"mode": "uniform", "rate": 0.3, "seed": 0})
    model = looptools.module(dm)
    ema, traj = EMA(decay=DECAY), Trajectory()
    trainer = looptools.trainer(2, [ema, traj])
    trainer.fit(model, datamodule=dm)
    return dm, model, ema, traj, trainer


def test_shadow_follows_the_closed_form_recursion(fitted):
    _, model, ema, traj, _ = fitted
    assert len(traj.after) == 6
    moved = max((traj.after[-1][k] - traj.start[k]).abs().max().item() for k in traj.start)
    assert moved > 1e-2  # the raw weights did move, so a wrong recursion shows
    assert_close_states(ema.shadow, ema_recursion(traj.start, traj.after, DECAY))
    # integer buffers (BatchNorm's num_batches_tracked) are copied, not averaged
    for k, v in model.state_dict().items():
        if not v.dtype.is_floating_point and k in ema.shadow:
            assert torch.equal(ema.shadow[k], v), k


def test_training_always_continues_from_the_raw_weights(fitted):
    _, model, _, traj, _ = fitted
    assert_close_states(traj.before[0], traj.start, atol=0.0)
    # validation ran between steps 3 and 4: it must hand the raw weights back unchanged
    for before, after in zip(traj.before[1:], traj.after[:-1], strict=True):
        assert_close_states(before, after, atol=0.0)
    assert_close_states(looptools.model_state(model), traj.after[-1], atol=0.0)


def logits_of(model: torch.nn.Module, x: Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x)["logits"].double().numpy()


def bce_mean(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean binary cross-entropy with logits over every entry (all labels observed)."""
    return float(np.mean(np.logaddexp(0.0, logits) - targets * logits))


def map_percent(logits: np.ndarray, targets: np.ndarray) -> float:
    return 100.0 * float(np.mean([average_precision_score(targets[:, c], logits[:, c]) for c in range(10)]))


def with_weights(model: torch.nn.Module, state: dict[str, Tensor]) -> torch.nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict({**m.state_dict(), **{k: v.clone() for k, v in state.items()}})
    return m


def test_validation_and_test_use_the_shadow(fitted):
    dm, model, ema, _, trainer = fitted
    raw = looptools.model_state(model)
    shadow_model, raw_model = with_weights(model, ema.shadow), with_weights(model, {})
    for split in ("val", "test"):
        x, y = looptools.split_tensors(dm, split)
        y = y.numpy()
        assert y.min() == 0 and (y.sum(0) > 0).all()
        z_ema, z_raw = logits_of(shadow_model, x), logits_of(raw_model, x)
        assert abs(bce_mean(z_ema, y) - bce_mean(z_raw, y)) > 1e-3  # the two models are told apart
        if split == "val":
            logged = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()}
        else:
            logged = {k.removeprefix("test/"): v for k, v in trainer.test(model, datamodule=dm)[0].items()}
        assert logged["bce"] == pytest.approx(bce_mean(z_ema, y), rel=1e-5), split
        assert logged["mAP"] == pytest.approx(map_percent(z_ema, y), abs=1e-3), split
    # after testing, the raw weights are back in place
    assert_close_states(looptools.model_state(model), raw, atol=0.0)


def test_evaluate_raw_keeps_the_raw_weights():
    torch.manual_seed(1)
    dm = looptools.datamodule()
    model = looptools.module(dm)
    ema = EMA(decay=DECAY, evaluate="raw")
    looptools.trainer(1, [ema]).fit(model, datamodule=dm)
    x, y = looptools.split_tensors(dm, "test")
    result = looptools.trainer(1, [ema]).test(model, datamodule=dm)[0]
    z_raw = logits_of(with_weights(model, {}), x)
    z_ema = logits_of(with_weights(model, ema.shadow), x)
    assert abs(bce_mean(z_ema, y.numpy()) - bce_mean(z_raw, y.numpy())) > 1e-3
    assert result["test/bce"] == pytest.approx(bce_mean(z_raw, y.numpy()), rel=1e-5)


# ---------------------------------------------------------------- resume
class ShadowAtStart(L.Callback):
    """The EMA shadow as the callback holds it when training (re)starts."""

    def __init__(self, ema: EMA) -> None:
        self.ema, self.shadow = ema, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.shadow = {k: v.detach().clone() for k, v in self.ema.shadow.items()}


@pytest.mark.slow
def test_resume_continues_the_same_shadow(tmp_path):
    dm = looptools.datamodule()
    # unshuffled loaders: the data order of an uninterrupted and a resumed run is the same
    loaders = {
        "train_dataloaders": DataLoader(dm.splits["train"], batch_size=8),
        "val_dataloaders": DataLoader(dm.splits["val"], batch_size=16),
    }

    def fresh(seed: int):
        torch.manual_seed(seed)
        return looptools.module(dm), EMA(decay=DECAY)

    whole, ema_whole = fresh(0)
    looptools.trainer(3, [ema_whole]).fit(whole, **loaders)

    first, ema_first = fresh(0)
    t1 = looptools.trainer(1, [ema_first])
    t1.fit(first, **loaders)
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert_close_states(saved["ema"], {k: v.double() for k, v in ema_first.shadow.items()}, atol=0.0)

    resumed, ema_resumed = fresh(123)  # other initial weights: everything must come from the file
    probe = ShadowAtStart(ema_resumed)
    looptools.trainer(3, [ema_resumed, probe]).fit(resumed, **loaders, ckpt_path=str(ckpt))
    raw_at_resume = {k: v.double() for k, v in saved["state_dict"].items() if v.dtype.is_floating_point}
    differs = max((saved["ema"][k].double() - raw_at_resume[k]).abs().max().item() for k in raw_at_resume)
    assert differs > 1e-3  # restarting the shadow from the raw weights would be visible
    assert_close_states(probe.shadow, {k: v.double() for k, v in saved["ema"].items()}, atol=0.0)
    assert_close_states(looptools.model_state(resumed), looptools.model_state(whole), atol=1e-6)
    assert_close_states(ema_resumed.shadow, {k: v.double() for k, v in ema_whole.shadow.items()}, atol=1e-6)


def test_shadow_updates_once_per_optimiser_step_with_gradient_accumulation():
    torch.manual_seed(0)
    dm = looptools.datamodule()  # 3 batches per epoch
    model = looptools.module(dm)
    ema, traj = EMA(decay=DECAY), Trajectory()
    looptools.trainer(2, [ema, traj], accumulate_grad_batches=3, limit_val_batches=0).fit(
        model, datamodule=dm
    )
    steps = traj.after[2::3]  # the optimiser steps after batches 3 and 6
    assert_close_states(ema.shadow, ema_recursion(traj.start, steps, DECAY))
