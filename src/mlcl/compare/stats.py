"""Statistics over seeds: mean ± std per group, and paired comparisons against a baseline.

Runs are paired by seed: for seed s the difference is ``d_s = x_s - b_s`` (the row's metric minus the
baseline's). Reported: the mean difference, its 95 % confidence interval ``d̄ ± t_{0.975, n-1} s_d/√n``,
the paired t-test p-value (``scipy.stats.ttest_rel``) and, from 6 pairs on, the Wilcoxon signed-rank
p-value. With fewer than 2 pairs nothing but the difference itself can be said (``n/a``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
MIN_WILCOXON = 6


@dataclass(frozen=True)
class Summary:
    """Mean ± sample std of a metric over the runs of one cell; ``std`` is None for a single run."""

    mean: float
    std: float | None
    n: int


@dataclass(frozen=True)
class Paired:
    """A cell against its baseline, paired by seed (``None`` = not computable with these pairs)."""

    n: int
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_t: float | None
    p_wilcoxon: float | None

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p_t is not None and self.p_t < alpha


def summarize(values: pd.Series) -> Summary | None:
    """Mean, std and count of the finite values; None when there are none."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return None
    std = float(v.std(ddof=1)) if len(v) > 1 else None
    return Summary(float(v.mean()), std, int(len(v)))


def per_seed(runs: pd.DataFrame, metric: str) -> pd.Series:
    """The metric per seed (mean over runs that share a seed, which a flagged group may have)."""
    v = pd.to_numeric(runs[metric], errors="coerce")
    return v.groupby(runs["seed"]).mean().dropna()


def paired(x: pd.Series, base: pd.Series) -> Paired:
    """Paired statistics of ``x - base`` over the seeds (index) both have."""
    both = pd.concat([x.rename("x"), base.rename("b")], axis=1, join="inner").dropna()
    n = len(both)
    if n == 0:
        return Paired(0, None, None, None, None, None)
    d = (both["x"] - both["b"]).to_numpy(dtype=float)
    mean = float(d.mean())
    if n < 2:
        return Paired(n, mean, None, None, None, None)
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    p_t: float | None = None
    if sd > 0:
        p_t = float(stats.ttest_rel(both["x"], both["b"]).pvalue)
    p_w: float | None = None
    if n >= MIN_WILCOXON and np.any(d != 0):
        p_w = float(stats.wilcoxon(both["x"], both["b"]).pvalue)
    return Paired(n, mean, mean - half, mean + half, p_t, p_w)


def higher_is_better(metric: str) -> bool:
    """Losses, BCE, and the alignment / uniformity of embeddings (Wang & Isola: lower is better) are
    minimised; every other metric (mAP, F1, retrieval, ...) is maximised."""
    name = metric.rsplit(".", 1)[-1].lower()
    return not name.endswith(("loss", "bce", "alignment", "uniformity"))
