"""What the datamodule's loaders really serve: masked training targets, seeds, views, epoch length.

Expected values come from the missing-label simulator and the dataset source called directly, and
from a plain re-implementation of the augmentations, never from the datamodule itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl.data import missing as missing_lib
from mlcl.data.datamodule import MultiLabelDataModule
from mlcl.data.datasets.digits import DigitsMosaic
from tests import looptools


def served_train_targets(dm: MultiLabelDataModule) -> Tensor:
    """Targets ``[N, C]`` as the training DataLoader serves them (one pass, placed by sample index)."""
    out = torch.full((dm.num_train, dm.num_classes), 9, dtype=torch.long)
    seen = torch.zeros(dm.num_train, dtype=torch.bool)
    for batch in dm.train_dataloader():
        out[batch["index"]] = batch["target"]
        seen[batch["index"]] = True
    assert bool(seen.all()), "one pass of the training loader must visit every sample"
    return out


def fresh_source(split: str) -> DigitsMosaic:
    return DigitsMosaic(split, sizes=looptools.SIZES)


@pytest.mark.parametrize(("mode", "rate", "seed"), [("uniform", 0.6, 3), ("single_positive", 0.0, 11)])
def test_training_loader_serves_the_simulators_mask(mode: str, rate: float, seed: int):
    dm = looptools.datamodule(missing={"mode": mode, "rate": rate, "seed": seed})
    full = fresh_source("train").targets
    expected = missing_lib.drop_labels(full, rate=rate, mode=mode, seed=seed)
    assert int((expected == -1).sum()) > 0 and not torch.equal(expected, full)
    assert torch.equal(served_train_targets(dm), expected)


def test_validation_and_test_loaders_stay_fully_labelled():
    dm = looptools.datamodule(missing={"mode": "uniform", "rate": 0.9, "seed": 0})
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        got = torch.cat([b["target"] for b in loader])  # not shuffled: index order
        assert torch.equal(got, fresh_source(split).targets), split


def test_missing_seed_changes_the_served_targets():
    served = {
        seed: served_train_targets(
            looptools.datamodule(missing={"mode": "uniform", "rate": 0.5, "seed": seed})
        )
        for seed in (1, 2)
    }
    full = fresh_source("train").targets
    for seed, got in served.items():
        assert torch.equal(got, missing_lib.drop_labels(full, rate=0.5, mode="uniform", seed=seed))
    assert not torch.equal(served[1], served[2])


# ---------------------------------------------------------------- views
def shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """``x`` [..., H, W] translated by (dy, dx) pixels with zero fill (out[r, c] = x[r - dy, c - dx])."""
    h, w = x.shape[-2:]
    m = max(abs(dy), abs(dx))
    padded = F.pad(x, (m, m, m, m))
    return padded[..., m - dy : m - dy + h, m - dx : m - dx + w]


def matching_shifts(view: Tensor, source: Tensor, max_shift: int) -> list[tuple[int, int]]:
    r = range(-max_shift, max_shift + 1)
    return [(dy, dx) for dy in r for dx in r if torch.equal(view, shifted(source, dy, dx))]


def test_image_views_are_distinct_shifts_of_the_source():
    dm = looptools.datamodule(num_views=2, augment={"max_shift": 2})
    src = dm.splits["train"].source
    differ = 0
    for batch in dm.train_dataloader():
        assert batch["input"].shape[1:] == (2, 1, 24, 24)
        for views, i in zip(batch["input"], batch["index"].tolist(), strict=True):
            for v in views:
                assert matching_shifts(v, src[i], 2), f"a view of sample {i} is no shift of it"
            differ += int(not torch.equal(views[0], views[1]))
    # two independent draws from 25 shifts coincide with probability 1/25
    assert differ >= 0.75 * dm.num_train


def test_vector_views_are_distinct_dropout_patterns(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "table.npz"
    np.savez(path, feature=rng.normal(size=(40, 6)), target=(rng.random((40, 3)) < 0.4).astype(np.int64))
    from mlcl.data.datasets.arrays import ArraySource

    dm = MultiLabelDataModule(
        lambda split: ArraySource(split, path=str(path), fractions=(0.6, 0.2, 0.2)),
        batch_size=8,
        num_views=3,
        augment={"feature_dropout": 0.5},
    )
    dm.setup("fit")
    src = dm.splits["train"].source
    differ, zeros, total = 0, 0, 0
    for batch in dm.train_dataloader():
        for views, i in zip(batch["input"], batch["index"].tolist(), strict=True):
            x = src[i]
            assert bool((x != 0).all())
            # every entry is either kept unchanged or zeroed (no rescaling)
            assert bool(((views == x) | (views == 0)).all()), f"sample {i}"
            differ += int(not (torch.equal(views[0], views[1]) and torch.equal(views[1], views[2])))
            zeros, total = zeros + int((views == 0).sum()), total + views.numel()
    assert differ >= 0.9 * dm.num_train
    assert 0.35 < zeros / total < 0.65  # p = 0.5 over 24 x 3 x 6 entries


# ---------------------------------------------------------------- epoch length
def test_iterations_per_epoch_counts_batches():
    dm = looptools.datamodule(iterations_per_epoch=5)  # 24 samples, batch 8: 3 batches per pass
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    assert [b["index"].shape[0] for b in batches] == [8] * 5
    # an endless reshuffled stream: the first 24 draws are one full pass over the samples
    first = torch.cat([b["index"] for b in batches])[:24]
    assert sorted(first.tolist()) == list(range(24))


def test_trainer_runs_iterations_per_epoch_steps():
    dm = looptools.datamodule(iterations_per_epoch=4)

    class Count(looptools.L.Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps.append(trainer.current_epoch)

    counter = Count()
    looptools.trainer(2, [counter], limit_val_batches=0).fit(looptools.module(dm), datamodule=dm)
    assert counter.steps == [0] * 4 + [1] * 4
