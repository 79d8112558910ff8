"""The embedded digit-mosaic dataset: determinism, disjoint sources, label spread, image content."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcl.data.datasets.digits import DigitsMosaic, _source_pools


def test_deterministic_given_seed():
    a, b = DigitsMosaic("train", num_samples=300), DigitsMosaic("train", num_samples=300)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    c = DigitsMosaic("train", num_samples=300, data_seed=1)
    assert not torch.equal(a.targets, c.targets)


def test_splits_use_disjoint_source_digits():
    splits = {s: DigitsMosaic(s, num_samples=500) for s in ("train", "val", "test")}
    used = {s: set(d.used_sources.tolist()) for s, d in splits.items()}
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]
    # and each split only draws from its own pool
    for s, d in splits.items():
        assert used[s] <= set(d.source_ids.tolist())


def test_label_count_spread_matches_probs():
    probs = np.array([0.35, 0.3, 0.2, 0.15])
    d = DigitsMosaic("train", num_samples=4000)
    counts = d.targets.sum(1).numpy()
    assert counts.min() >= 1 and counts.max() <= 4
    freq = np.bincount(counts, minlength=5)[1:] / len(counts)
    # binomial standard error at n=4000 is < 0.008; allow 4 sigma
    assert np.abs(freq - probs).max() < 0.035
    # every class appears with roughly equal frequency (symmetric construction)
    prior = d.targets.float().mean(0)
    expected = float((probs * np.arange(1, 5)).sum() / 10)
    assert torch.allclose(prior, torch.full_like(prior, expected), atol=0.03)


def test_images_contain_exactly_the_labelled_digits():
    """Each labelled digit occupies one 8x8 cell copied verbatim from sklearn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ref = torch.from_numpy((digits.images / 16.0).astype(np.float32))
    d = DigitsMosaic("test", num_samples=50)
    for i in range(50):
        img = d.images[i, 0]
        cells = img.reshape(3, 8, 3, 8).permute(0, 2, 1, 3).reshape(9, 8, 8)
        nonempty = [c for c in cells if c.abs().sum() > 0]
        found = set()
        for c in nonempty:
            match = (ref - c).abs().flatten(1).sum(1) < 1e-6
            assert match.any(), "cell is not a verbatim sklearn digit"
            found.add(int(digits.target[match.nonzero()[0, 0]]))
        assert found == set(d.targets[i].nonzero().flatten().tolist())


def test_bad_config_messages():
    with pytest.raises(ValueError, match="label_probs"):
        DigitsMosaic("train", num_samples=10, grid=1, label_probs=[0.5, 0.5])
    with pytest.raises(ValueError, match="split"):
        DigitsMosaic("dev")
    with pytest.raises(ValueError, match="pool_fractions"):
        _source_pools((0.5, 0.5), 0)
