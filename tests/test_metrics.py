"""Metrics against hand-computed cases, plain-Python references written from spec 4.2/4.4/4.5,
sklearn and torchmetrics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from mlcl.metrics import MultilabelReport, mean_average_precision, multilabel_f1_scores, yeast_metrics

DT = torch.float64


# ------------------------------------------------------------------------------ plain references
def ref_map(scores, targets):
    """Per-positive precision with tie grouping: precision at a positive with score s counts every
    observed entry with score >= s (its whole tie group)."""
    n, c = scores.shape
    aps = []
    for k in range(c):
        pairs = [(float(scores[i, k]), int(targets[i, k])) for i in range(n) if int(targets[i, k]) != -1]
        pos = [s for s, t in pairs if t == 1]
        if not pos:
            aps.append(0.0)
            continue
        precisions = []
        for s in pos:
            above = [t for s2, t in pairs if s2 >= s]
            precisions.append(sum(above) / len(above))
        aps.append(sum(precisions) / len(pos))
    return 100.0 * sum(aps) / c


def ref_f1(scores, targets, threshold, top_k=None):
    n, c = scores.shape
    nc, np_, ng = [0] * c, [0] * c, [0] * c
    for i in range(n):
        row = [float(x) for x in scores[i]]
        top = set(sorted(range(c), key=lambda k: -row[k])[:top_k]) if top_k else set(range(c))
        for k in range(c):
            t = int(targets[i, k])
            pred = row[k] >= threshold and k in top
            if t == -1:
                continue
            nc[k] += pred and t == 1
            np_[k] += pred
            ng[k] += t == 1

    def div(a, b):
        return a / b if b else 0.0

    cp = sum(div(nc[k], np_[k]) for k in range(c)) / c
    cr = sum(div(nc[k], ng[k]) for k in range(c)) / c
    op, orr = div(sum(nc), sum(np_)), div(sum(nc), sum(ng))
    vals = dict(CP=cp, CR=cr, CF1=div(2 * cp * cr, cp + cr), OP=op, OR=orr, OF1=div(2 * op * orr, op + orr))
    return {k: 100 * v for k, v in vals.items()}


def ref_yeast(scores, targets):
    n, c = scores.shape
    y = [[int(targets[i, k]) == 1 for k in range(c)] for i in range(n)]
    best = dict(HA=0.0, ebF1=0.0, miF1=0.0, maF1=0.0)
    for t in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
        p = [[float(scores[i, k]) >= t for k in range(c)] for i in range(n)]
        ha = 1 - sum(sum(p[i][k] != y[i][k] for k in range(c)) / c for i in range(n)) / n
        eb = [
            2 * sum(p[i][k] and y[i][k] for k in range(c)) / (sum(y[i]) + sum(p[i]))
            for i in range(n)
            if sum(y[i]) + sum(p[i]) > 0
        ]
        tp = [sum(p[i][k] and y[i][k] for i in range(n)) for k in range(c)]
        fp = [sum(p[i][k] and not y[i][k] for i in range(n)) for k in range(c)]
        fn = [sum(not p[i][k] and y[i][k] for i in range(n)) for k in range(c)]
        den = 2 * sum(tp) + sum(fp) + sum(fn)
        vals = dict(
            HA=ha,
            ebF1=sum(eb) / len(eb) if eb else 0.0,
            miF1=2 * sum(tp) / den if den else 0.0,
            maF1=sum(2 * tp[k] / (2 * tp[k] + fp[k] + fn[k] + 1e-6) for k in range(c)) / c,
        )
        best = {k: max(best[k], vals[k]) for k in best}
    best["p_at_1"] = sum(y[i][max(range(c), key=lambda k: float(scores[i, k]))] for i in range(n)) / n
    return best


def random_case(n, c, seed, ties=False, unknown=0.3):
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, c, generator=gen) < 0.3).long()
    s = torch.sigmoid(1.5 * torch.randn(n, c, generator=gen, dtype=DT) + 2.5 * y - 1.5)
    if ties:
        s = torch.round(s, decimals=1)
    t = torch.where(torch.rand(n, c, generator=gen) < unknown, torch.full_like(y, -1), y)
    t[:, -1] = torch.where(t[:, -1] == 1, torch.zeros_like(t[:, -1]), t[:, -1])  # a class without positives
    return s, t


# ------------------------------------------------------------------------------ mAP
def test_map_hand_computed():
    scores = torch.tensor(
        [[0.9, 0.9, 0.9, 0.5], [0.8, 0.8, 0.8, 0.5], [0.7, 0.7, 0.7, 0.2], [0.6, 0.6, 0.6, 0.1]], dtype=DT
    )
    targets = torch.tensor([[1, 0, 0, 1], [0, -1, 0, 0], [1, 1, 0, 0], [0, 1, -1, 1]])
    # class 0: positives at ranks 1, 3 -> precisions 1/1, 2/3 -> AP = 5/6
    # class 1: row 1 dropped -> ranking 0.9 (neg), 0.7 (pos), 0.6 (pos) -> precisions 1/2, 2/3 -> AP = 7/12
    # class 2: no observed positive -> AP = 0, still in the mean
    # class 3: tie at 0.5 (one pos, one neg): P = 1/2, R = 1/2; 0.2 (neg) adds no recall;
    #          0.1 (pos): P = 2/4, ΔR = 1/2 -> AP = 1/2·1/2 + 1/2·1/2 = 1/2
    # mAP = 100 · (5/6 + 7/12 + 0 + 1/2) / 4 = 100 · 23/48
    out = mean_average_precision(scores, targets)
    assert set(out) == {"mAP"} and out["mAP"].shape == () and out["mAP"].dtype == DT
    assert out["mAP"].item() == pytest.approx(100 * 23 / 48, rel=1e-12)
    assert ref_map(scores, targets) == pytest.approx(100 * 23 / 48, rel=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_matches_plain_reference(seed, ties):
    s, t = random_case(60, 7, seed, ties=ties)
    got = mean_average_precision(s, t)["mAP"].item()
    assert got == pytest.approx(ref_map(s, t), rel=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_map_matches_sklearn_and_torchmetrics(ties):
    from torchmetrics.functional.classification import multilabel_average_precision

    s, t = random_case(200, 9, 5, ties=ties)
    aps = []
    for k in range(9):
        keep = (t[:, k] != -1).numpy()
        yk, sk = t[keep, k].numpy(), s[keep, k].numpy()
        aps.append(average_precision_score(yk, sk) if yk.sum() > 0 else 0.0)
    got = mean_average_precision(s, t)["mAP"].item()
    assert got == pytest.approx(100 * float(np.mean(aps)), rel=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = multilabel_average_precision(s, t, num_labels=9, average=None, ignore_index=-1)
    assert got == pytest.approx(100 * tm.double().mean().item(), rel=1e-6)


def test_map_logits_and_saturation():
    s, t = random_case(50, 4, 7)
    logits = torch.logit(s)
    torch.testing.assert_close(mean_average_precision(logits, t)["mAP"], mean_average_precision(s, t)["mAP"])
    # float32 sigmoid would tie 20 and 30 (both 1.0); ranking the logits keeps them apart:
    # negative at 30 above positive at 20 -> precision 1/2 -> AP 1/2
    lg = torch.tensor([[30.0], [20.0]])
    tg = torch.tensor([[0], [1]])
    assert mean_average_precision(lg, tg)["mAP"].item() == pytest.approx(50.0)
    assert mean_average_precision(lg, tg)["mAP"].dtype == torch.float32


def test_map_all_unknown_and_pure():
    s, t = random_case(20, 3, 8)
    s0, t0 = s.clone(), t.clone()
    mean_average_precision(s, t)
    assert torch.equal(s, s0) and torch.equal(t, t0)
    assert mean_average_precision(s, torch.full_like(t, -1))["mAP"].item() == 0.0
    # perfect ranking -> 100
    y = torch.tensor([[1, 0], [0, 1], [1, 0]])
    assert mean_average_precision(y.double(), y)["mAP"].item() == pytest.approx(100.0)


# ------------------------------------------------------------------------------ CP/CR/...
SCORES = torch.tensor([[0.9, 0.6, 0.1], [0.8, 0.4, 0.7], [0.3, 0.55, 0.2], [0.6, 0.1, 0.05]], dtype=DT)
TARGETS = torch.tensor([[1, 0, 0], [0, -1, 1], [1, 1, 0], [-1, 0, 0]])


def test_f1_hand_computed():
    # predictions (>= 0.5): row0 {0, 1}, row1 {0, 2}, row2 {1}, row3 {0}
    # class 0: Nc = 1 (row0), Np = 2 (rows 0, 1; row3 is -1), Ng = 2 (rows 0, 2)
    # class 1: Nc = 1 (row2), Np = 2 (rows 0, 2), Ng = 1 (row1 is -1)
    # class 2: Nc = 1, Np = 1, Ng = 1
    # CP = (1/2 + 1/2 + 1)/3 = 2/3, CR = (1/2 + 1 + 1)/3 = 5/6, CF1 = 2·(2/3)(5/6)/(2/3 + 5/6) = 20/27
    # OP = 3/5, OR = 3/4, OF1 = 2·(3/5)(3/4)/(3/5 + 3/4) = 2/3
    out = multilabel_f1_scores(SCORES, TARGETS)
    want = dict(CP=2 / 3, CR=5 / 6, CF1=20 / 27, OP=3 / 5, OR=3 / 4, OF1=2 / 3)
    assert set(out) == set(want)
    for k, v in want.items():
        assert out[k].item() == pytest.approx(100 * v, rel=1e-12), k
        assert out[k].dtype == DT and out[k].shape == ()


def test_f1_hand_computed_top1():
    # top-1: row0 {0}, row1 {0}, row2 {1}, row3 {0}
    # class 0: Nc 1, Np 2, Ng 2; class 1: Nc 1, Np 1, Ng 1; class 2: no prediction (CP_2 = 0), Ng 1
    # CP = (1/2 + 1 + 0)/3 = 1/2, CR = (1/2 + 1 + 0)/3 = 1/2, CF1 = 1/2
    # OP = 2/3 (true total; ML-GCN's N_p -> 1 rule would give 2/4), OR = 2/4, OF1 = 2·(2/3)(1/2)/(7/6) = 4/7
    out = multilabel_f1_scores(SCORES, TARGETS, top_k=1)
    want = dict(CP=1 / 2, CR=1 / 2, CF1=1 / 2, OP=2 / 3, OR=1 / 2, OF1=4 / 7)
    for k, v in want.items():
        assert out[k].item() == pytest.approx(100 * v, rel=1e-12), k


def test_f1_zero_division():
    s, t = random_case(10, 4, 9)
    none = multilabel_f1_scores(s, t, threshold=1.5)  # no predictions at all
    assert all(v.item() == 0.0 for v in none.values())
    no_pos = multilabel_f1_scores(s, torch.zeros_like(t))  # predictions but no positives
    assert all(v.item() == 0.0 for v in no_pos.values())
    assert all(torch.isfinite(v) for v in no_pos.values())


@pytest.mark.parametrize("top_k", [None, 1, 3, 10])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_f1_matches_plain_reference(top_k, threshold):
    s, t = random_case(40, 6, 11)
    out = multilabel_f1_scores(s, t, threshold=threshold, top_k=top_k)
    ref = ref_f1(s, t, threshold, top_k)
    for k in ref:
        assert out[k].item() == pytest.approx(ref[k], rel=1e-12, abs=1e-12), k


def test_f1_equals_mlgcn_without_unknowns():
    # ML-GCN formulas (every class predicted and positive, no -1): plain ratios of the counts
    s, _ = random_case(80, 5, 12)
    y = (s > 0.45).long()
    y[0] = 1 - y[0]
    pred = s >= 0.5
    nc = (pred & (y == 1)).sum(0).double()
    np_, ng = pred.sum(0).double(), y.sum(0).double()
    assert (np_ > 0).all() and (ng > 0).all()
    cp, cr = (nc / np_).mean(), (nc / ng).mean()
    op, orr = nc.sum() / np_.sum(), nc.sum() / ng.sum()
    out = multilabel_f1_scores(s, y)
    torch.testing.assert_close(out["CF1"], 100 * 2 * cp * cr / (cp + cr))
    torch.testing.assert_close(out["OF1"], 100 * 2 * op * orr / (op + orr))


# ------------------------------------------------------------------------------ Metric
def test_report_accumulates_like_one_shot():
    s, t = random_case(97, 6, 13, ties=True)
    metric = MultilabelReport(6, threshold=0.5, top_k=3)
    for chunk_s, chunk_t in zip(s.split(20), t.split(20)):
        metric.update(chunk_s, chunk_t)
    out = metric.compute()
    want = dict(mean_average_precision(s, t))
    want.update(multilabel_f1_scores(s, t, 0.5))
    want.update({f"{k}_top3": v for k, v in multilabel_f1_scores(s, t, 0.5, top_k=3).items()})
    assert set(out) == set(want) and len(want) == 13
    for k in want:
        torch.testing.assert_close(out[k], want[k], msg=k)
    # not a mean of per-batch values
    per_batch = np.mean(
        [mean_average_precision(a, b)["mAP"].item() for a, b in zip(s.split(20), t.split(20))]
    )
    assert abs(per_batch - out["mAP"].item()) > 1e-6
    metric.reset()
    metric.update(s[:10], t[:10])
    torch.testing.assert_close(metric.compute()["mAP"], mean_average_precision(s[:10], t[:10])["mAP"])


def test_report_from_logits_and_no_topk():
    s, t = random_case(30, 4, 14)
    logits = torch.logit(s)
    metric = MultilabelReport(4, top_k=None, from_logits=True)
    metric.update(logits[:15], t[:15])
    metric.update(logits[15:], t[15:])
    out = metric.compute()
    assert set(out) == {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"}
    torch.testing.assert_close(out["mAP"], mean_average_precision(s, t)["mAP"])
    torch.testing.assert_close(out["OF1"], multilabel_f1_scores(s, t)["OF1"])
    with pytest.raises(ValueError, match="classes"):
        metric.update(logits[:, :3], t[:, :3])


# ------------------------------------------------------------------------------ yeast
def test_yeast_hand_computed():
    s = torch.tensor([[0.95, 0.35, 0.05], [0.25, 0.65, 0.45]], dtype=DT)
    y = torch.tensor([[1, 1, 0], [0, 1, 0]])
    # p@1: row0 top = class 0 (pos), row1 top = class 1 (pos) -> 1
    # t = 0.3: pred row0 {0, 1}, row1 {1, 2}: 1 error of 6 -> HA 5/6; ebF1 = (2·2/4 + 2·1/3)/2 = 5/6;
    #   tp 3, fp 1, fn 0 -> miF1 6/7; maF1 = (1 + 1 + 0)/3 (class 2: 0/(0+1+0))
    # t = 0.4: pred row0 {0}, row1 {1, 2}: errors 2 -> HA 4/6; ebF1 = (2/3 + 2/3)/2 = 2/3
    # t = 0.5, 0.6: row0 {0}, row1 {1}: 1 error -> HA 5/6; ebF1 = (2/3 + 1)/2 = 5/6;
    #   miF1 = 2·2/(4 + 0 + 1) = 4/5; maF1 = (1 + 2/3 + 0)/3 = 5/9
    # t = 0.1, 0.2: row0 {0, 1}, row1 {0, 1, 2}: 2 errors -> HA 4/6; ebF1 (1 + 1/2)/2 = 3/4; miF1 6/8
    # t = 0.7, 0.8, 0.9: row0 {0}, row1 {} -> 2 errors; ebF1 (2/3 + 0)/2
    # best: HA 5/6, ebF1 5/6, miF1 6/7, maF1 2/3 (t = 0.3, ignoring the 1e-6)
    # mAP: class 0 AP 1, class 1 AP 1, class 2 no positive -> 0 -> 2/3
    out = yeast_metrics(s, y)
    assert out["p_at_1"].item() == 1.0
    assert out["HA"].item() == pytest.approx(5 / 6, rel=1e-12)
    assert out["ebF1"].item() == pytest.approx(5 / 6, rel=1e-12)
    assert out["miF1"].item() == pytest.approx(6 / 7, rel=1e-12)
    assert out["maF1"].item() == pytest.approx(2 / 3, rel=1e-5)
    assert out["mAP"].item() == pytest.approx(2 / 3, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_yeast_matches_plain_reference(seed):
    s, t = random_case(50, 5, 20 + seed, unknown=0.0)
    s = torch.round(s, decimals=2)  # scores hitting thresholds exactly exercise ">="
    out = yeast_metrics(s, t)
    ref = ref_yeast(s, t)
    for k, v in ref.items():
        assert out[k].item() == pytest.approx(v, rel=1e-12, abs=1e-12), k
    aps = [
        average_precision_score(t[:, k].numpy(), s[:, k].numpy()) if t[:, k].sum() else 0.0 for k in range(5)
    ]
    assert out["mAP"].item() == pytest.approx(float(np.mean(aps)), rel=1e-10)
    assert set(out) == {"mAP", "HA", "ebF1", "miF1", "maF1", "p_at_1"}
