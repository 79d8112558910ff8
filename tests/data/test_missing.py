"""Tests of mlcl.data.missing: drop_labels (clml.md §14.3/§14.4), observed-label files, apply_missing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mlcl.data.missing import (
    apply_missing,
    apply_observed_file,
    drop_labels,
    label_stats,
    read_observed_file,
)

ROOT = Path(__file__).resolve().parents[2]
MODES = ("uniform", "single_positive", "fixed_count")


def random_targets(n=300, c=12, seed=0, p=0.25, unknown=0.05):
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(n, c, generator=g) < p).long()
    t[torch.rand(n, c, generator=g) < unknown] = -1
    t[:5] = 0  # rows without positives
    return t


def reference_drop(targets, rate, mode, seed):
    """Row-by-row plain-Python version of spec §14.3."""
    n_rows, n_cls = targets.shape
    u = torch.rand((n_rows, n_cls), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = [[int(v) for v in row] for row in targets.tolist()]
    for i in range(n_rows):
        positives = [c for c in range(n_cls) if out[i][c] == 1]
        ranked = sorted(positives, key=lambda c: (float(u[i, c]), c))
        n = len(ranked)
        for r, c in enumerate(ranked):
            if mode == "uniform":
                keep = float(u[i, c]) < 1.0 - rate or r == 0
            elif mode == "single_positive":
                keep = r == 0
            else:
                keep = r < min(n, math.floor(n * (1.0 - rate) + 1e-9) + 1)
            if not keep:
                out[i][c] = -1
    return torch.tensor(out, dtype=torch.long)


# ---------------------------------------------------------------------------- drop_labels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_matches_reference_and_properties(mode, rate):
    t = random_targets(seed=int(rate * 10))
    t0 = t.clone()
    out = drop_labels(t, rate, mode, seed=3)
    assert out.dtype == torch.int64 and out.shape == t.shape
    assert torch.equal(t, t0)  # input untouched
    assert torch.equal(out, reference_drop(t, rate, mode, 3))
    pos = t == 1
    kept = out == 1
    assert torch.equal(out[~pos], t[~pos])  # negatives and pre-existing -1 unchanged
    assert not bool((kept & ~pos).any())  # kept ⊆ original positives
    assert bool((out[pos] != 0).all())  # hidden positives become -1, never 0
    has_pos = pos.any(1)
    assert bool(kept[has_pos].any(1).all())  # >= 1 kept per row with a positive
    n = pos.sum(1)
    if mode == "single_positive":
        assert torch.equal(kept.sum(1), has_pos.long())
    if mode == "fixed_count":
        k = torch.tensor([min(v, math.floor(v * (1 - rate) + 1e-9) + 1) for v in n.tolist()])
        assert torch.equal(kept.sum(1), k)
    if mode == "uniform" and rate == 0.0:
        assert torch.equal(out, t)
    if mode == "uniform" and rate == 1.0:
        assert torch.equal(kept.sum(1), has_pos.long())


def test_fixed_count_reproduces_reference_file_counts():
    # coco_train_0.75left keeps floor(n/2) + 1, coco_train_0.4left keeps floor(n/5) + 1 (spec §9.1)
    n_max = 18
    t = torch.zeros(n_max, n_max, dtype=torch.long)
    for i in range(n_max):
        t[i, : i + 1] = 1
    for rate, div in ((0.5, 2), (0.8, 5)):
        kept = (drop_labels(t, rate, "fixed_count", seed=0) == 1).sum(1)
        assert kept.tolist() == [min(n, n // div + 1) for n in range(1, n_max + 1)]


def test_uniform_kept_fraction_statistics():
    # expected kept positives of a row with n positives: n (1 - r) + r^n (the rank-0 positive is kept even
    # when its u >= 1 - r, which happens when all n draws are >= 1 - r)
    g = torch.Generator().manual_seed(1)
    t = (torch.rand(20000, 20, generator=g) < 0.15).long()
    n = (t == 1).sum(1).double()
    for rate in (0.25, 0.6):
        out = drop_labels(t, rate, "uniform", seed=7)
        kept = (out == 1).sum().item()
        expected = float((n * (1 - rate) + torch.where(n > 0, rate**n, torch.zeros_like(n))).sum())
        var = float((n * rate * (1 - rate)).sum())
        assert abs(kept - expected) < 5 * math.sqrt(var)
    # with 40 positives per row the keep-one rule is negligible (r^40): the kept fraction is 1 - rate
    dense = torch.ones(2000, 40, dtype=torch.long)
    for rate in (0.25, 0.6):
        frac = (drop_labels(dense, rate, "uniform", seed=3) == 1).double().mean().item()
        assert frac == pytest.approx(1 - rate, rel=0.01)


def test_single_positive_uniform_choice():
    t = torch.zeros(20000, 4, dtype=torch.long)
    t[:, :4] = 1
    out = drop_labels(t, 0.0, "single_positive", seed=2)
    share = (out == 1).double().mean(0)
    assert torch.allclose(share, torch.full((4,), 0.25, dtype=torch.float64), atol=0.02)


def test_determinism_and_seed():
    t = random_targets(seed=5)
    for mode in MODES:
        a = drop_labels(t, 0.5, mode, seed=11)
        assert torch.equal(a, drop_labels(t, 0.5, mode, seed=11))
        assert not torch.equal(a, drop_labels(t, 0.5, mode, seed=12))


def test_pre_existing_unknown_is_independent():
    t = random_targets(seed=6, unknown=0.0)
    t_unk = t.clone()
    mask = (torch.rand(t.shape, generator=torch.Generator().manual_seed(0)) < 0.2) & (t == 0)
    t_unk[mask] = -1
    for mode in MODES:
        a = drop_labels(t, 0.5, mode, seed=4)
        b = drop_labels(t_unk, 0.5, mode, seed=4)
        assert torch.equal(b[mask], torch.full_like(b[mask], -1))
        assert torch.equal(a[~mask], b[~mask])


def test_input_dtypes_and_errors():
    t = random_targets(seed=7, unknown=0.0)
    expected = drop_labels(t, 0.3, "uniform", seed=0)
    assert torch.equal(drop_labels(t.bool(), 0.3, "uniform", seed=0), expected)
    assert torch.equal(drop_labels(t.float(), 0.3, "uniform", seed=0), expected)
    with pytest.raises(ValueError, match="mode"):
        drop_labels(t, 0.3, "bernoulli", seed=0)
    with pytest.raises(ValueError, match="rate"):
        drop_labels(t, 1.5, "uniform", seed=0)
    with pytest.raises(ValueError, match=r"\{1, 0, -1\}"):
        drop_labels(t * 2, 0.3, "uniform", seed=0)


# ---------------------------------------------------------------------------- observed-label files
def _write(tmp_path, lines, name="observed.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_observed_file_variants(tmp_path):
    path = _write(tmp_path, ["a.jpg,0 3 5", "b.jpg, 2", "c.jpg,", "d.jpg, 1 4", ""])
    labels = read_observed_file(path)
    assert labels == {"a.jpg": [0, 3, 5], "b.jpg": [2], "c.jpg": [], "d.jpg": [1, 4]}
    assert list(labels) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


def test_read_observed_file_errors(tmp_path):
    bad = _write(tmp_path, ["a.jpg,0 1", "b.jpg,2. 4"], name="nus_train.txt")
    with pytest.raises(ValueError, match=r"nus_train\.txt:2: malformed class index '2\.'"):
        read_observed_file(bad)
    no_comma = _write(tmp_path, ["a.jpg 0 1"], name="nocomma.txt")
    with pytest.raises(ValueError, match=r"nocomma\.txt:1"):
        read_observed_file(no_comma)
    big = _write(tmp_path, ["a.jpg,0", "b.jpg,9"], name="big.txt")
    with pytest.raises(ValueError, match=r"big\.txt:2: class index 9"):
        read_observed_file(big, num_classes=5)
    dup = _write(tmp_path, ["a.jpg,0", "a.jpg,1"], name="dup.txt")
    with pytest.raises(ValueError, match=r"dup\.txt:2"):
        read_observed_file(dup)


def test_apply_observed_file(tmp_path):
    targets = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [1, 0, -1, 0]])
    names = ["x/1.jpg", "x/2.jpg", "x/3.jpg"]
    path = _write(tmp_path, ["x/3.jpg,0", "x/1.jpg, 1 3", "x/2.jpg,1 2", "x/9.jpg,0"])
    out = apply_observed_file(targets, names, path)
    assert torch.equal(out, torch.tensor([[-1, 1, 0, 1], [0, 1, 1, 0], [1, 0, -1, 0]]))
    assert torch.equal(targets, torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [1, 0, -1, 0]]))
    with pytest.raises(ValueError, match="not listed"):
        apply_observed_file(targets, ["x/1.jpg", "x/2.jpg", "y/4.jpg"], path)
    with pytest.raises(ValueError, match="file names"):
        apply_observed_file(targets, names[:2], path)
    wrong = _write(tmp_path, ["x/1.jpg,2", "x/2.jpg,1", "x/3.jpg,0"], name="wrong.txt")
    with pytest.raises(ValueError, match="not positives"):
        apply_observed_file(targets, names, wrong)
    trusted = apply_observed_file(targets, names, wrong, strict=False)
    assert trusted[0].tolist() == [-1, -1, 1, -1]


def test_drop_then_file_roundtrip(tmp_path):
    # writing the kept positives of drop_labels in the reference format and reading them back
    t = random_targets(n=50, seed=8, unknown=0.0)
    dropped = drop_labels(t, 0.5, "fixed_count", seed=1)
    names = [f"img_{i:03d}.jpg" for i in range(50)]
    lines = []
    for i, name in enumerate(names):
        idx = " ".join(str(c) for c in range(t.shape[1]) if dropped[i, c] == 1)
        lines.append(f"{name}, {idx}" if i % 2 else f"{name},{idx}")
    path = _write(tmp_path, lines)
    assert torch.equal(apply_observed_file(t, names, path), dropped)
    assert torch.equal(apply_missing(t, "file", 0.0, 0, path=str(path), file_names=names), dropped)


# ---------------------------------------------------------------------------- apply_missing, stats, presets
def test_apply_missing_modes():
    t = random_targets(seed=9)
    none = apply_missing(t, "none", 0.5, 0)
    assert torch.equal(none, t) and none.data_ptr() != t.data_ptr()
    for mode in MODES:
        assert torch.equal(apply_missing(t, mode, 0.4, 3), drop_labels(t, 0.4, mode, 3))
    with pytest.raises(ValueError, match="path"):
        apply_missing(t, "file", 0.0, 0)
    with pytest.raises(ValueError, match="unknown"):
        apply_missing(t, "oracle", 0.0, 0)


def test_label_stats():
    original = torch.tensor([[1, 1, 0], [1, 0, -1], [0, 0, 0], [1, 1, 1]])
    observed = torch.tensor([[1, -1, 0], [-1, 0, -1], [0, 0, 0], [1, 1, -1]])
    stats = label_stats(original, observed)
    assert stats["positives"] == 6
    assert stats["kept"] == 3
    assert stats["hidden"] == 3
    assert stats["kept_fraction"] == pytest.approx(0.5)
    assert stats["positives_per_row"] == pytest.approx(1.5)
    assert stats["kept_per_row"] == pytest.approx(0.75)
    assert stats["rows_without_kept"] == 1


@pytest.mark.parametrize(
    ("preset", "mode", "rate"),
    [
        ("none", "none", None),
        ("uniform", "uniform", 0.25),
        ("single_positive", "single_positive", None),
        ("fixed_count", "fixed_count", 0.5),
        ("coco75", "fixed_count", 0.5),
        ("coco40", "fixed_count", 0.8),
        ("file", "file", None),
    ],
)
def test_presets(preset, mode, rate):
    cfg = OmegaConf.load(ROOT / "src" / "mlcl" / "conf" / "missing" / f"{preset}.yaml")
    assert set(cfg) == {"mode", "rate", "seed", "path"}
    assert cfg.mode == mode
    if rate is not None:
        assert cfg.rate == rate
    if preset == "file":
        assert OmegaConf.is_missing(cfg, "path")
        return
    t = random_targets(seed=10)
    out = apply_missing(t, cfg.mode, cfg.rate, cfg.seed, path=cfg.path)
    assert out.shape == t.shape
