"""The default benchmark (data=digits): label structure against closed forms, rendering, clutter, leakage.

Expected frequencies are computed here with plain loops from the configured knobs (the generative
model's closed form), never read off the generator.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mlcl.data.datasets.digit_scenes import DigitScenes, _half, sample_labels
from mlcl.errors import UserError
from tests.conftest import CONF

SCENES = [[0, 3, 5, 8], [1, 2, 6, 9], [0, 4, 7, 9], [1, 5, 7, 8], [2, 3, 4, 6]]
# every appearance knob off: labelled digits are copied verbatim into their slots
PLAIN = dict(scale_range=[1.0, 1.0], jitter=0.0, occlusion_prob=0.0, clutter_max=0, noise_std=0.0)


def closed_form(p_in=0.9, p_out=0.05, imbalance=10.0, scenes=SCENES, scene_probs=None):
    """P(scene), P(c | scene) and P(c, d | scene) of 'Bernoulli given the scene, redrawn if empty'."""
    k = len(scenes)
    pi = [1.0 / k] * k if scene_probs is None else [p / sum(scene_probs) for p in scene_probs]
    q = [[imbalance ** (-c / 9) * (p_in if c in scenes[s] else p_out) for c in range(10)] for s in range(k)]
    cond, pair = [], []
    for s in range(k):
        z = 1.0 - math.prod(1.0 - q[s][d] for d in range(10))  # P(at least one label | s)
        cond.append([q[s][c] / z for c in range(10)])
        pair.append(
            [[q[s][c] * q[s][d] / z if c != d else q[s][c] / z for d in range(10)] for c in range(10)]
        )
    return pi, np.array(cond), np.array(pair)


def test_label_process_matches_closed_form():
    """Scene-conditional, marginal and pairwise label frequencies of 60,000 draws, within 4.5 sigma."""
    pi, cond, pair = closed_form()
    ds = DigitScenes("train", num_samples=8, **PLAIN)  # only for its q and scene_probs
    scene, y = sample_labels(np.random.default_rng(3), ds.q, ds.scene_probs, 60_000)
    y = y.astype(np.float64)
    assert y.sum(1).min() >= 1
    for s in range(len(pi)):
        rows = y[scene == s]
        assert abs(len(rows) / len(y) - pi[s]) < 4.5 * math.sqrt(pi[s] * (1 - pi[s]) / len(y))
        se = np.sqrt(cond[s] * (1 - cond[s]) / len(rows))
        assert (np.abs(rows.mean(0) - cond[s]) < 4.5 * se + 1e-9).all(), s
    marginal = sum(pi[s] * cond[s] for s in range(len(pi)))
    assert (np.abs(y.mean(0) - marginal) < 4.5 * np.sqrt(marginal * (1 - marginal) / len(y))).all()
    joint = sum(pi[s] * pair[s] for s in range(len(pi)))
    measured = y.T @ y / len(y)
    assert (np.abs(measured - joint) < 4.5 * np.sqrt(joint * (1 - joint) / len(y)) + 1e-9).all()


def test_long_tail_and_co_occurrence_on_generated_data():
    """The generated split has the configured long tail and scene-driven co-occurrence."""
    d = DigitScenes("train", num_samples=6000)
    y = d.targets.double().numpy()
    pi, cond, pair = closed_form()
    marginal = sum(pi[s] * cond[s] for s in range(5))
    assert np.allclose(y.mean(0), marginal, atol=4.5 * math.sqrt(0.25 / len(y)))
    # every digit is core in two scenes, so the frequency falls geometrically with the rank
    assert marginal[0] / marginal[9] == pytest.approx(10.0, rel=0.25)
    freq = y.mean(0)
    assert (np.diff(freq[[0, 2, 4, 6, 8]]) < 0).all() and freq[0] / freq[9] > 6
    # lift P(c, d) / (P(c) P(d)): pairs sharing a scene co-occur more than independent digits would
    # (closed form ~1.2: each digit lives in 2 of 5 scenes), pairs that share none rarely (~0.25)
    lift = (y.T @ y / len(y)) / np.outer(freq, freq)
    share = np.array([[any(c in s and d in s for s in SCENES) for d in range(10)] for c in range(10)])
    off = ~np.eye(10, dtype=bool)
    assert lift[share & off].mean() > 1.05 and lift[~share & off].mean() < 0.4
    # the recorded scene of each image explains its labels: P(c | s) as configured
    for s in range(5):
        assert np.allclose(y[d.scene == s].mean(0), cond[s], atol=0.06)


def test_deterministic_given_data_seed():
    a, b = DigitScenes("val", num_samples=200), DigitScenes("val", num_samples=200)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    c = DigitScenes("val", num_samples=200, data_seed=1)
    assert not torch.equal(a.targets, c.targets) and not torch.equal(a.images, c.images)
    t = DigitScenes("test", num_samples=200)
    assert not torch.equal(a.targets, t.targets)


def test_splits_use_disjoint_source_digits():
    """Labelled digits and half-digit clutter come only from the split's own pool."""
    splits = {
        s: DigitScenes(s, num_samples=600, clutter_max=4, partial_prob=1.0) for s in ("train", "val", "test")
    }
    used = {s: set(d.used_sources.tolist()) for s, d in splits.items()}
    assert (
        not used["train"] & used["val"]
        and not used["train"] & used["test"]
        and not used["val"] & used["test"]
    )
    for s, d in splits.items():
        assert used[s] <= set(d.source_ids.tolist())
    pools = [set(d.source_ids.tolist()) for d in splits.values()]
    assert sum(len(p) for p in pools) == 1797 and len(set.union(*pools)) == 1797


def test_shapes_and_dtypes():
    d = DigitScenes("test", num_samples=64, grid=5, cell=10)
    assert d.images.shape == (64, 1, 50, 50) and d.images.dtype == torch.float32
    assert d.targets.shape == (64, 10) and d.targets.dtype == torch.int64
    assert set(d.targets.unique().tolist()) <= {0, 1} and (d.targets.sum(1) >= 1).all()
    assert 0.0 <= float(d.images.min()) and float(d.images.max()) <= 1.0
    assert len(d) == 64 and torch.equal(d[5], d.images[5])


def _cells(img: torch.Tensor, grid: int = 4) -> torch.Tensor:
    return img.reshape(grid, 8, grid, 8).permute(0, 2, 1, 3).reshape(grid * grid, 8, 8)


def test_plain_rendering_copies_exactly_the_labelled_digits():
    """With jitter, scaling, occlusion, clutter and noise off, each labelled digit is a verbatim cell."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ref = torch.from_numpy((digits.images / 16.0).astype(np.float32)).flatten(1)
    d = DigitScenes("test", num_samples=40, **PLAIN)
    for i in range(40):
        found = []
        for cell in _cells(d.images[i, 0]):
            if cell.abs().sum() == 0:
                continue
            match = (ref - cell.flatten()).abs().sum(1) < 1e-4
            assert match.any(), "a non-empty cell is not a verbatim sklearn digit"
            found.append(int(digits.target[match.nonzero()[0, 0]]))
        assert sorted(found) == d.targets[i].nonzero().flatten().tolist()  # one object per label


def test_occlusion_erases_one_box():
    """With occlusion on every digit, a cell is its source digit with one 3x3 box set to zero."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ref = torch.from_numpy((digits.images / 16.0).astype(np.float32))
    d = DigitScenes("train", num_samples=30, **{**PLAIN, "occlusion_prob": 1.0, "occlusion_size": [3, 3]})
    changed = total = 0
    for i in range(30):
        for cell in _cells(d.images[i, 0]):
            if cell.abs().sum() == 0:
                continue
            total += 1
            # a source where the cell agrees everywhere except where the cell is zero
            ok = ((cell[None] == ref) | (cell[None] == 0)).flatten(1).all(1)
            diff = [(cell != ref[j]).nonzero() for j in ok.nonzero().flatten().tolist()]
            boxes = [x for x in diff if len(x) == 0 or (x.max(0).values - x.min(0).values <= 2).all()]
            assert boxes, "cell is not a digit minus one 3x3 box"
            changed += min(len(x) for x in boxes) > 0
    assert changed > 0.7 * total


def test_clutter_carries_no_label():
    """Clutter changes pixels (only adds ink) in free slots but never the labels."""
    base = DigitScenes("train", num_samples=300, noise_std=0.0, clutter_max=0)
    clut = DigitScenes("train", num_samples=300, noise_std=0.0, clutter_max=3, partial_prob=0.5)
    assert torch.equal(base.targets, clut.targets)
    has = clut.num_clutter > 0
    assert 0.6 < has.float().mean() < 0.9  # 0..3 uniform: three in four images hold clutter
    diff = (clut.images - base.images).flatten(1)
    assert (diff >= -1e-6).all()  # pixel-wise maximum: clutter adds, never removes ...
    assert float(clut.images.max()) <= 1.0  # ... and overlapping ink is not summed past 1
    assert (diff[has].abs().sum(1) > 0).all() and (diff[~has].abs().sum(1) == 0).all()
    # clutter sits in free slots: never more objects than slots
    assert (clut.targets.sum(1) + clut.num_clutter <= 16).all()


def test_half_digits_keep_one_half():
    patches = np.ones((400, 8, 8), dtype=np.float32)
    out = _half(np.random.default_rng(0), patches)
    halves = [np.zeros((8, 8)) for _ in range(4)]
    halves[0][:4], halves[1][4:], halves[2][:, :4], halves[3][:, 4:] = 1, 1, 1, 1
    kinds = [next(k for k in range(4) if np.array_equal(o, halves[k])) for o in out]  # StopIteration = bug
    assert set(kinds) == {0, 1, 2, 3}


def test_configs_match_the_generator_and_instantiate():
    """data=digits spells out the class defaults; digits_easy and digits_quick compose and build."""
    import inspect

    from hydra.utils import instantiate

    from tests.conftest import compose

    yaml_src = OmegaConf.to_container(OmegaConf.load(CONF / "data" / "digits.yaml").source)
    defaults = inspect.signature(DigitScenes).parameters
    for key, value in yaml_src.items():
        if key in ("_target_", "_partial_", "sizes"):
            continue
        default = defaults[key].default
        as_list = [list(x) for x in default] if key == "scenes" else default
        as_list = list(as_list) if isinstance(as_list, tuple) else as_list
        assert value == as_list, key
    for name, cls, side in (("digits_easy", "DigitsMosaic", 24), ("digits_quick", "DigitScenes", 32)):
        cfg = compose([f"data={name}"])
        src = instantiate(cfg.data.source)(split="test", num_samples=16)
        assert type(src).__name__ == cls and src.images.shape[-1] == side
    quick = compose(["data=digits_quick"]).data.source
    assert quick.sizes.train == 2000 and quick.sizes.test == 1000 and quick.grid == 4


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"scenes": [[0, 11]]}, "scenes"),
        ({"scene_probs": [1.0, 2.0]}, "scene_probs"),
        ({"p_in": 1.5}, "p_in"),
        ({"class_order": [0, 1, 2]}, "class_order"),
        ({"grid": 3}, "grid"),
    ],
)
def test_bad_knobs_name_the_key(kwargs, key):
    with pytest.raises(UserError, match=f"data.source.{key}"):
        DigitScenes("train", num_samples=4, **kwargs)
