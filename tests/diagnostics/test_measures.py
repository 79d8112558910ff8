"""Known answers for the representation diagnostics: closed forms, plain loops, sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlcl.diagnostics import (
    alignment,
    jaccard,
    label_alignment_uniformity,
    label_retrieval_ap,
    linear_probe_map,
    retrieval_scores,
    uniformity,
)
from mlcl.diagnostics.probe import ridge_fit


def random_data(n: int = 37, d: int = 5, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled (not unit-norm) embeddings and labels in {1, 0, -1}, some rows without any positive."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) * (0.5 + 3 * torch.rand(n, 1, generator=g))
    y = (torch.rand(n, c, generator=g) < 0.35).long()
    y[torch.rand(n, c, generator=g) < 0.1] = -1  # unknown entries are not positives
    y[:3] = 0
    return z, y


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def pos_set(row: torch.Tensor) -> set[int]:
    return {j for j, v in enumerate(row.tolist()) if v == 1}


# ---------------------------------------------------------------------------- alignment / uniformity
def test_alignment_zero_for_collapsed_clusters_and_distance_between_them():
    # three clusters, every member of a cluster at the same direction but with a different norm
    dirs = torch.eye(3)
    members = torch.arange(30) % 3
    z = dirs[members] * torch.linspace(0.5, 5, 30)[:, None]
    y = torch.nn.functional.one_hot(members, 3)
    assert alignment(z, y) == pytest.approx(0.0, abs=1e-6)
    # a sample holding labels 0 and 1 sits at e0: its pairs with the label-1 cluster are at
    # squared distance 2 (orthogonal unit vectors); all other positive pairs are at distance 0
    y2 = y.clone()
    y2[0, 1] = 1  # sample 0 (cluster 0) is also positive for label 1 (10 members)
    n_pairs = 3 * 10 * 9 + 2 * 10  # within-cluster ordered pairs + (0, label-1 members) both ways
    assert alignment(z, y2) == pytest.approx(2 * 10 * 2.0 / n_pairs, rel=1e-5)


@pytest.mark.parametrize("alpha", [2.0, 1.0])
def test_alignment_matches_double_loop(alpha):
    z, y = random_data()
    zn = [unit(r) for r in z.numpy().astype(np.float64)]
    dists = [
        np.linalg.norm(zn[i] - zn[j]) ** alpha
        for i in range(len(zn))
        for j in range(len(zn))
        if i != j and pos_set(y[i]) & pos_set(y[j])
    ]
    # a budget of 3 rows per block exercises the chunk offsets of the self-exclusion
    assert alignment(z, y, alpha, budget=3 * z.shape[0]) == pytest.approx(np.mean(dists), rel=1e-5)


def test_uniformity_equally_spaced_circle_matches_bessel_limit():
    # n equally spaced points on a circle of radius 3 (normalisation must remove the radius);
    # E over the circle of exp(-t ||x - y||^2) is exp(-2t) I0(2t); for equally spaced points the
    # sum over all n offsets equals n times that (the trapezoid rule is exact to machine precision
    # for this periodic analytic integrand), and dropping the n self-pairs (each exp(0) = 1) gives
    # mean_{i != j} = (n exp(-2t) I0(2t) - 1) / (n - 1).
    from scipy.special import i0

    n, t = 360, 2.0
    ang = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    z = 3 * torch.stack([ang.cos(), ang.sin()], 1)
    want = math.log((n * math.exp(-2 * t) * i0(2 * t) - 1) / (n - 1))
    assert uniformity(z, t, budget=50 * n) == pytest.approx(want, abs=1e-5)


def test_uniformity_antipodal_pair_and_sphere():
    assert uniformity(torch.tensor([[2.0, 0.0], [-0.5, 0.0]]), t=2.0) == pytest.approx(-8.0, abs=1e-5)
    # uniform on S^2: ||x - y||^2 = 2 - 2u, u ~ U[-1, 1]  =>  E exp(-t d^2) = (1 - e^{-4t}) / (4t)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3000, 3, generator=g, dtype=torch.float64)
    t = 2.0
    assert uniformity(z, t) == pytest.approx(math.log((1 - math.exp(-4 * t)) / (4 * t)), abs=0.03)


def test_uniformity_matches_double_loop():
    z, _ = random_data(n=23)
    zn = [unit(r) for r in z.numpy().astype(np.float64)]
    vals = [np.exp(-2 * np.sum((zn[i] - zn[j]) ** 2)) for i in range(23) for j in range(23) if i != j]
    assert uniformity(z, 2.0, budget=4 * 23) == pytest.approx(math.log(np.mean(vals)), rel=1e-5)


# ---------------------------------------------------------------------------- retrieval
def loop_retrieval(z: torch.Tensor, y: torch.Tensor, k: int) -> dict[str, float]:
    """wAP, wAP@k and nDCG@k by plain loops, straight from the definitions in the module docstring."""
    zn = [unit(r) for r in z.numpy().astype(np.float64)]
    n = len(zn)
    out = {"wAP": [], f"wAP@{k}": [], f"nDCG@{k}": []}
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-float(zn[i] @ zn[j]), j))
        rel = []
        for j in others:
            a, b = pos_set(y[i]), pos_set(y[j])
            rel.append(len(a & b) / len(a | b) if a | b else 0.0)
        total = sum(r > 0 for r in rel)
        if total == 0:
            continue
        gains = [(r > 0) * sum(rel[: p + 1]) / (p + 1) for p, r in enumerate(rel)]
        out["wAP"].append(sum(gains) / total)
        out[f"wAP@{k}"].append(sum(gains[:k]) / min(k, total))
        ideal = sorted(rel, reverse=True)
        dcg = sum(r / math.log2(p + 2) for p, r in enumerate(rel[:k]))
        out[f"nDCG@{k}"].append(dcg / sum(r / math.log2(p + 2) for p, r in enumerate(ideal[:k])))
    return {key: 100 * float(np.mean(v)) for key, v in out.items()}


@pytest.mark.parametrize("k", [5, 100])
def test_retrieval_matches_double_loop(k):
    z, y = random_data(n=41, c=5, seed=3)
    got = retrieval_scores(z, y, (k,), budget=6 * 41)
    want = loop_retrieval(z, y, k)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_retrieval_known_ranking():
    # collapsed one-hot clusters: every relevant neighbour is nearer than any other -> 100 everywhere
    members = torch.arange(20) % 4
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.one_hot(members, 4).float() + 0.01 * torch.randn(20, 4, generator=g)
    y = torch.nn.functional.one_hot(members, 4)
    assert retrieval_scores(z, y, (4,)) == pytest.approx({"wAP": 100.0, "wAP@4": 100.0, "nDCG@4": 100.0})
    # 12 points on a circle, each class an antipodal pair: the only relevant neighbour is the farthest
    # one (cosine -1), at rank 11 of 11 -> AP = 1/11 over all, 0 within the first 5
    n = 12
    ang = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    z = torch.stack([ang.cos(), ang.sin()], 1)
    y = torch.nn.functional.one_hot(torch.arange(n) % (n // 2), n // 2)
    got = retrieval_scores(z, y, (5,))
    assert got == pytest.approx({"wAP": 100 / 11, "wAP@5": 0.0, "nDCG@5": 0.0}, abs=1e-4)


def test_jaccard_against_sets():
    _, y = random_data(n=12, c=6, seed=5)
    yp = (y == 1).float()
    got = jaccard(yp, yp)
    for i in range(12):
        for j in range(12):
            a, b = pos_set(y[i]), pos_set(y[j])
            assert got[i, j].item() == pytest.approx(len(a & b) / len(a | b) if a | b else 0.0)


# ---------------------------------------------------------------------------- label level
def test_label_level_matches_per_label_loops():
    g = torch.Generator().manual_seed(7)
    n, c = 19, 4
    e = torch.randn(n, c, 3, generator=g) * (1 + torch.rand(n, c, 1, generator=g))
    y = (torch.rand(n, c, generator=g) < 0.4).long()
    y[:, 3] = 0
    y[0, 3] = 1  # a label with a single positive: no pair, NaN alignment and AP
    align, unif = label_alignment_uniformity(e, y, budget=5 * n * c)
    ap = label_retrieval_ap(e, y, budget=7 * n * 3)
    for k in range(c):
        v = [unit(r) for r in e[:, k].numpy().astype(np.float64)]
        pos = [i for i in range(n) if y[i, k] == 1]
        d = [np.sum((v[i] - v[j]) ** 2) for i in pos for j in pos if i != j]
        u = [np.exp(-2 * np.sum((v[i] - v[j]) ** 2)) for i in range(n) for j in range(n) if i != j]
        aps = []
        for i in pos:
            others = sorted((j for j in range(n) if j != i), key=lambda j: (-float(v[i] @ v[j]), j))
            hits = [int(y[j, k] == 1) for j in others]
            if sum(hits):
                aps.append(sum(h * sum(hits[: p + 1]) / (p + 1) for p, h in enumerate(hits)) / sum(hits))
        assert unif[k].item() == pytest.approx(math.log(np.mean(u)), rel=1e-5)
        if d:
            assert align[k].item() == pytest.approx(np.mean(d), rel=1e-5)
            assert ap[k].item() == pytest.approx(100 * np.mean(aps), rel=1e-5)
        else:
            assert math.isnan(align[k].item()) and math.isnan(ap[k].item())


# ---------------------------------------------------------------------------- linear probe
def test_ridge_matches_sklearn():
    from sklearn.linear_model import Ridge

    z, y = random_data(n=60, d=6, c=3, seed=2)
    t = (y == 1).double().numpy()
    x = z.double().numpy()
    xs = (x - x.mean(0)) / x.std(0)
    ref = Ridge(alpha=0.1 * 60).fit(xs, t)
    _, _, w, b = ridge_fit(z, (y == 1).float(), reg=0.1)
    np.testing.assert_allclose(w.numpy(), ref.coef_.T, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(b.numpy(), ref.intercept_, rtol=1e-6, atol=1e-9)


def test_probe_separable_vs_random_labels():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    c = 5
    y_tr = (torch.rand(600, c, generator=g) < 0.3).long()
    y_te = (torch.rand(2000, c, generator=g) < 0.3).long()
    # label c lives on its own axis: linearly separable, mixed into 16 dims by a random rotation
    rot = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    embed = lambda t: torch.cat([t.float(), 0.1 * torch.randn(t.shape[0], 11, generator=g)], 1) @ rot  # noqa: E731
    assert linear_probe_map(embed(y_tr), y_tr, embed(y_te), y_te) == pytest.approx(100.0)
    # labels independent of the embeddings: expected mAP is the positive rate, as sklearn says
    z_tr, z_te = torch.randn(600, 16, generator=g), torch.randn(2000, 16, generator=g)
    got = linear_probe_map(z_tr, y_tr, z_te, y_te)
    prior = 100 * (y_te == 1).float().mean().item()
    assert abs(got - prior) < 4.0
    # and the value is the sklearn mAP of the ridge scores
    from mlcl.diagnostics.probe import ridge_fit as fit

    mean, std, w, b = fit(z_tr, y_tr)
    scores = (((z_te.double() - mean) / std) @ w + b).numpy()
    ref = np.mean([average_precision_score(y_te[:, k].numpy(), scores[:, k]) for k in range(c)])
    assert got == pytest.approx(100 * ref, rel=1e-6)


def test_bench_rows_cover_every_diagnostic():
    from mlcl.diagnostics.bench import bench_rows

    rows = bench_rows(rows=200, dim=8, classes=5, label_rows=50, label_dim=4)
    assert [r["name"].split(" ")[0] for r in rows] == [
        "alignment",
        "retrieval",
        "linear",
        "label",
        "label",
    ]
    assert all(r["rows"] == 200 and math.isfinite(r["seconds"]) for r in rows)
    assert rows[3]["shape"] == "[50, 5, 4]"


def test_fused_pass_equals_separate_values():
    from mlcl.diagnostics import alignment_uniformity

    z, y = random_data(n=29)
    a, u = alignment_uniformity(z, y, 1.5, 3.0, budget=2 * 29)
    zn = [unit(r) for r in z.numpy().astype(np.float64)]
    pairs = [(i, j) for i in range(29) for j in range(29) if i != j]
    want_a = np.mean(
        [np.linalg.norm(zn[i] - zn[j]) ** 1.5 for i, j in pairs if pos_set(y[i]) & pos_set(y[j])]
    )
    want_u = math.log(np.mean([np.exp(-3.0 * np.sum((zn[i] - zn[j]) ** 2)) for i, j in pairs]))
    assert (a, u) == pytest.approx((want_a, want_u), rel=1e-5)
    assert math.isnan(alignment_uniformity(z, None)[0])
