"""Figures: a metric against a numeric setting (one line per method, mean ± std bands, chance level)
and a per-class AP heat map (method x class) from the runs' ``per_class.AP``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mlcl.compare.errors import CompareError
from mlcl.compare.grouping import _labels


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib Figure, imported lazily
    # a bare Figure (no pyplot): renders off-screen without touching the global backend
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _title(df: pd.DataFrame) -> str:
    parts = []
    for key in ("data", "backbone"):
        if key in df.columns:
            vals = sorted({str(v) for v in df[key].dropna()})
            if vals:
                parts.append(f"{key}: {', '.join(vals)}")
    return " · ".join(parts)


def numeric_axis(df: pd.DataFrame, x: str) -> pd.Series:
    """The values of ``x`` as numbers, or a one-line error (unknown key, non-numeric values)."""
    if x not in df.columns:
        raise CompareError(f"--plot {x}: no such config key in these runs (e.g. missing_rate, optimizer.lr)")
    xs = pd.to_numeric(df[x], errors="coerce")
    if xs.isna().any():
        bad = ", ".join(sorted({str(v) for v, n in zip(df[x], xs) if pd.isna(n)})[:5])
        raise CompareError(f"--plot {x}: the x axis must be numeric, but {x} takes the values {bad}")
    return xs


def line_plot(df: pd.DataFrame, x: str, metric: str, line: list[str], path: Path) -> Path:
    """``metric`` (mean ± std over runs) against the numeric setting ``x``, one line per ``line`` value."""
    data = df.assign(_x=numeric_axis(df, x))
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    labels = _labels(data, line)
    for name, sub in data.groupby(labels, sort=True):
        stats = sub.groupby("_x")[metric].agg(["mean", "std"]).sort_index()
        mean = stats["mean"].to_numpy(dtype=float)
        std = stats["std"].fillna(0.0).to_numpy(dtype=float)
        xv = stats.index.to_numpy(dtype=float)
        label = ", ".join(f"{k}={sub.iloc[0][k]}" for k in line) if len(line) > 1 else str(name)
        (handle,) = ax.plot(xv, mean, marker="o", label=label)
        ax.fill_between(xv, mean - std, mean + std, color=handle.get_color(), alpha=0.2, linewidth=0)
    if "chance_mAP" in data.columns and metric.endswith("mAP") and data["chance_mAP"].notna().any():
        chance = float(data["chance_mAP"].mean())
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.1f})")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(_title(df), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title=",".join(line), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def per_class_table(df: pd.DataFrame, rows: list[str]) -> pd.DataFrame:
    """Mean test AP per class (columns: stored order, numeric order for class indices) for each value
    of ``rows`` (index)."""
    if "per_class.AP" not in df.columns or df["per_class.AP"].isna().all():
        raise CompareError(
            "--per-class: these runs stored no per-class AP (metrics.json 'per_class'); "
            "re-run them with the current mlcl-train"
        )
    data = df[df["per_class.AP"].notna()]
    labels = _labels(data, rows).str.replace("\x1f", ", ")
    table = pd.DataFrame(list(data["per_class.AP"]), index=labels.to_numpy())
    table = table.groupby(level=0, sort=True).mean()
    names = [str(c) for c in table.columns]
    if all(n.lstrip("-").isdigit() for n in names):  # class indices: 2 before 10 (JSON keys sort as text)
        table = table[sorted(table.columns, key=lambda c: int(str(c)))]
    return table


def per_class_heatmap(df: pd.DataFrame, rows: list[str], path: Path) -> Path:
    """Mean test AP per class (columns) for each value of ``rows`` (e.g. the method or loss)."""
    table = per_class_table(df, rows)
    values = table.to_numpy(dtype=float)
    fig = _figure(max(4.0, 0.45 * values.shape[1] + 2.5), max(2.5, 0.45 * values.shape[0] + 1.5))
    ax = fig.subplots()
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    names = [str(c) for c in table.columns]
    long_names = max(len(n) for n in names) > 3  # slanted only when names would overlap
    ax.set_xticks(
        np.arange(len(names)), names, rotation=60 if long_names else 0, ha="right" if long_names else "center"
    )
    ax.set_yticks(np.arange(values.shape[0]), [str(i) for i in table.index])
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v) and values.size <= 400:
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    fig.colorbar(im, ax=ax, label="test AP (%)")
    ax.set_xlabel("class")
    ax.set_title(f"per-class test AP · {_title(df)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
