"""The study's paper table and plots: methods x conditions, paired differences against a baseline.

A local stand-in for the parts of ``mlcl-compare`` a study report needs (``--metrics --columns
--baseline --format markdown``), used when the installed ``mlcl-compare`` does not offer them. Runs
are every ``metrics.json`` below the root that has no ancestor (below the root) with its own
``metrics.json`` (stage runs inside a method job are not counted twice).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mlcl.errors import UserError


def _flat(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}", out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)


def top_level_results(root: Path) -> list[Path]:
    """``metrics.json`` files below ``root`` without an ancestor directory (below root) holding one."""
    root = Path(root)
    found = sorted(root.rglob("metrics.json"))
    dirs = {p.parent for p in found}
    keep = []
    for p in found:
        ancestors = [a for a in p.parent.parents if a != root and root in a.parents]
        if not any(a in dirs for a in ancestors):
            keep.append(p)
    return keep


def load_runs(root: Path) -> pd.DataFrame:
    """One row per job: ``method`` (the method, else the loss), ``missing_rate``, ``data``, ``seed``,
    ``run_dir``, and every numeric metric flattened (``test.mAP``, ``selections.dev_loss.mAP``, ...)."""
    rows = []
    for path in top_level_results(root):
        res = json.loads(path.read_text())
        run = res.get("run") or {}
        row: dict[str, Any] = {
            "method": run.get("method") or run.get("loss"),
            "missing_rate": run.get("missing_rate"),
            "data": run.get("data"),
            "seed": run.get("seed"),
            "run_dir": str(path.parent),
            "duration_s": run.get("duration_s"),
        }
        for key in ("test", "val", "selections", "representation"):
            _flat(res.get(key) or {}, key, row)
        for cls, ap in ((res.get("per_class") or {}).get("AP") or {}).items():
            row[f"per_class.AP.{cls}"] = float(ap)
        rows.append(row)
    if not rows:
        raise UserError(f"no finished runs (metrics.json) below {root}", str(root), "run the study first")
    return pd.DataFrame(rows)


def _paired(diffs: np.ndarray) -> tuple[float, float, float, float]:
    """Mean paired difference, 95 % t confidence interval and the paired t-test p-value."""
    n = len(diffs)
    mean = float(diffs.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    se = float(diffs.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if se > 0 else (1.0 if mean == 0 else 0.0)
    return mean, mean - half, mean + half, p


def paper_table(
    df: pd.DataFrame, metric: str, column: str, baseline: str, alpha: float = 0.05
) -> tuple[str, pd.DataFrame]:
    """Markdown table (rows = method, columns = values of ``column``) and its long-form statistics.

    Cells: ``mean ± std (n)``; for other methods, the mean difference to ``baseline`` over seeds present
    in both (paired), its 95 % CI and paired t-test p-value; ▲/▼ = significantly better/worse at
    ``alpha``; the best mean of each column is bold. Fewer than 2 pairs: statistics "n/a".
    """
    if metric not in df.columns:
        have = sorted(c for c in df.columns if c.startswith(("test.", "selections.", "representation.")))
        raise UserError(
            f"metric {metric!r} is in no run", "--metrics", f"choose among {', '.join(have[:20])}"
        )
    base_key, _, base_value = baseline.partition("=")
    col_vals = sorted(df[column].dropna().unique().tolist()) if column in df.columns else [None]
    methods = sorted(df["method"].dropna().unique().tolist(), key=lambda m: (m != base_value, m))
    rows = []
    for m in methods:
        for c in col_vals:
            sub = df[(df["method"] == m) & ((df[column] == c) if c is not None else True)]
            vals = sub.set_index("seed")[metric].dropna()
            if vals.empty:
                continue
            rec = {"method": m, column: c, "mean": vals.mean(), "std": vals.std(ddof=1), "n": len(vals)}
            base = df[(df[base_key] == base_value) & ((df[column] == c) if c is not None else True)]
            bvals = base.set_index("seed")[metric].dropna()
            common = sorted(set(vals.index) & set(bvals.index))
            if m != base_value and common:
                d = vals.loc[common].to_numpy() - bvals.loc[common].to_numpy()
                rec["diff"], rec["ci_lo"], rec["ci_hi"], rec["p"] = _paired(d)
                rec["pairs"] = len(common)
            rows.append(rec)
    long = pd.DataFrame(rows)
    best = (
        long.groupby(column, dropna=False)["mean"].transform("max") if column in long else long["mean"].max()
    )
    long["best"] = np.isclose(long["mean"], best)
    head = "| method | " + " | ".join(f"{column}={c}" for c in col_vals) + " |"
    lines = [head, "|---|" + "---|" * len(col_vals)]
    for m in methods:
        cells = []
        for c in col_vals:
            r = long[(long["method"] == m) & ((long[column] == c) if c is not None else True)]
            cells.append(_cell(r.iloc[0], alpha) if len(r) else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines), long


def _cell(r: pd.Series, alpha: float) -> str:
    std = "n/a" if r["n"] < 2 else f"{r['std']:.2f}"
    mean = f"**{r['mean']:.2f}**" if r["best"] else f"{r['mean']:.2f}"
    text = f"{mean} ± {std} ({int(r['n'])})"
    if "diff" in r and not pd.isna(r.get("diff")):
        if pd.isna(r["p"]):
            return f"{text}<br>Δ {r['diff']:+.2f}, CI n/a, p n/a"
        mark = ("▲" if r["diff"] > 0 else "▼") if r["p"] < alpha else ""
        return f"{text}<br>Δ {r['diff']:+.2f} [{r['ci_lo']:+.2f}, {r['ci_hi']:+.2f}] p={r['p']:.3f}{mark}"
    return text


def plot_vs(df: pd.DataFrame, metric: str, x: str, out: Path) -> Path | None:
    """``metric`` (mean, band ± std over seeds) against ``x``, a line per method; None if x is constant."""
    from matplotlib.figure import Figure

    if x not in df.columns or df[x].nunique() < 2:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for m, sub in df.groupby("method"):
        s = sub.groupby(x)[metric].agg(["mean", "std"]).fillna(0.0).sort_index()
        xs = s.index.astype(float)
        ax.plot(xs, s["mean"], marker="o", label=str(m))
        ax.fill_between(xs, s["mean"] - s["std"], s["mean"] + s["std"], alpha=0.2)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / f"{metric.replace('.', '_')}_vs_{x}.png"
    fig.savefig(path, dpi=110)
    return path


def per_class_heatmap(df: pd.DataFrame, out: Path) -> Path | None:
    """Mean per-class test AP (methods x classes); None when the runs record no ``per_class`` AP."""
    from matplotlib.figure import Figure

    cols = [c for c in df.columns if c.startswith("per_class.AP.")]
    if not cols:
        return None
    mat = df.groupby("method")[cols].mean()
    fig = Figure(figsize=(max(4, 0.5 * len(cols) + 2), 0.4 * len(mat) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(mat.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), [c.removeprefix("per_class.AP.") for c in cols], rotation=90, fontsize=7)
    ax.set_yticks(range(len(mat)), mat.index.tolist(), fontsize=7)
    fig.colorbar(im, ax=ax, label="test AP (mean over seeds and conditions)")
    fig.tight_layout()
    path = out / "per_class_AP.png"
    fig.savefig(path, dpi=110)
    return path
