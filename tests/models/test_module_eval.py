"""Metrics the module logs in ``trainer.validate``/``trainer.test`` against sklearn on the same logits.

The logits are recomputed outside the Trainer from the trained weights; AP, precision and recall
come from sklearn, the ML-GCN combinations (CF1 = 2 CP CR / (CP + CR), ...) from numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_score, recall_score
from tests import looptools


def sklearn_report(logits: np.ndarray, targets: np.ndarray, threshold: float, top_k: int) -> dict[str, float]:
    """mAP and CP/CR/CF1/OP/OR/OF1 (plus ``_top{k}``) in percent of fully labelled ``targets`` [N, C]."""
    n, c = targets.shape
    out = {"mAP": 100 * np.mean([average_precision_score(targets[:, j], logits[:, j]) for j in range(c)])}
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    top = np.zeros_like(targets, dtype=bool)
    top[np.arange(n)[:, None], np.argsort(-logits, axis=1, kind="stable")[:, :top_k]] = True
    for suffix, pred in (("", probs >= threshold), (f"_top{top_k}", (probs >= threshold) & top)):
        cp = precision_score(targets, pred, average=None, zero_division=0).mean()
        cr = recall_score(targets, pred, average=None, zero_division=0).mean()
        op = precision_score(targets.ravel(), pred.ravel(), zero_division=0)
        orr = recall_score(targets.ravel(), pred.ravel(), zero_division=0)
        scores = {"CP": cp, "CR": cr, "OP": op, "OR": orr}
        scores["CF1"] = 2 * cp * cr / (cp + cr) if cp + cr else 0.0
        scores["OF1"] = 2 * op * orr / (op + orr) if op + orr else 0.0
        out.update({k + suffix: 100 * float(v) for k, v in scores.items()})
    return out


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    dm = looptools.datamodule(sizes={"train": 32, "val": 40, "test": 40})
    model = looptools.module(dm, threshold=0.4, top_k=2)
    trainer = looptools.trainer(2)
    trainer.fit(model, datamodule=dm)
    return dm, model, trainer


@pytest.mark.parametrize("split", ["val", "test"])
def test_logged_metrics_equal_sklearn_on_the_same_logits(trained, split):
    dm, model, trainer = trained
    run = trainer.validate if split == "val" else trainer.test
    logged = {k.removeprefix(f"{split}/"): float(v) for k, v in run(model, datamodule=dm)[0].items()}
    x, y = looptools.split_tensors(dm, split)
    model.eval()
    with torch.no_grad():
        logits = model(x)["logits"].double().numpy()
    targets = y.numpy()
    assert (targets.sum(0) > 0).all()  # every class has a positive: AP is defined everywhere
    pred_share = float((1 / (1 + np.exp(-logits)) >= 0.4).mean())
    assert 0.05 < pred_share < 0.95  # thresholded metrics are neither all-positive nor all-negative
    expected = sklearn_report(logits, targets, threshold=0.4, top_k=2)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, abs=1e-3), key
    bce = float(np.mean(np.logaddexp(0.0, logits) - targets * logits))
    assert logged["bce"] == pytest.approx(bce, rel=1e-5)
