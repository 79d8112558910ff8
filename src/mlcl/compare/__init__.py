"""``mlcl-compare`` and its functions: load runs, group them, test against a baseline, tabulate, plot.

* :mod:`.load` — runs below a directory as one table (config keys, aliases, metrics).
* :mod:`.grouping` — which runs are seeds of one setting; flags groups that mix settings.
* :mod:`.stats` — mean ± std, paired-by-seed differences with CI, t-test and Wilcoxon.
* :mod:`.tables` — one table builder, rendered as markdown, CSV or LaTeX.
* :mod:`.plots` — metric vs a numeric setting, per-class AP heat map.
* :mod:`.cli` — the command line.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mlcl.compare.cli import main
from mlcl.compare.errors import CompareError
from mlcl.compare.grouping import default_group_keys
from mlcl.compare.load import load_runs
from mlcl.compare.plots import line_plot, per_class_heatmap
from mlcl.compare.stats import paired, summarize
from mlcl.compare.tables import build_table, leaderboard, render


def plot(
    df: pd.DataFrame, x: str, metric: str = "test.mAP", line: str = "loss", out: Path = Path(".")
) -> Path:
    """``metric`` against ``x``, one line per ``line`` value, into ``out`` (legacy API)."""
    return line_plot(df, x, metric, [line], Path(out) / f"plot_{metric}_vs_{x}_by_{line}.png")


def to_markdown(board: pd.DataFrame, metric: str) -> str:
    """A :func:`leaderboard` as a markdown table (one run: no ± shown)."""
    keys = [c for c in board.columns if c not in ("mean", "std", "n")]
    lines = [
        "| rank | " + " | ".join(keys) + f" | {metric} | n |",
        "|---:|" + "---|" * len(keys) + "---:|---:|",
    ]
    for i, r in enumerate(board.itertuples(index=False)):
        row = r._asdict()
        value = f"{row['mean']:.2f}" + ("" if pd.isna(row["std"]) else f" ± {row['std']:.2f}")
        lines.append(
            f"| {i + 1} | " + " | ".join(str(row[k]) for k in keys) + f" | {value} | {int(row['n'])} |"
        )
    return "\n".join(lines)


__all__ = [
    "plot",
    "to_markdown",
    "CompareError",
    "build_table",
    "default_group_keys",
    "leaderboard",
    "line_plot",
    "load_runs",
    "main",
    "paired",
    "per_class_heatmap",
    "render",
    "summarize",
]
