"""``mlcl-compare``: turn a directory of runs (a sweep) into a leaderboard and plots.

Every run writes ``metrics.json``; runs that differ only in ``seed`` are grouped and reported as
mean ± std over seeds (with the seed count). Output: a markdown (or CSV) table on stdout, plus
``leaderboard.md`` / ``leaderboard.csv`` and, with ``--plot``, a PNG of a metric against a swept
value (e.g. mAP vs missing-label rate, one line per loss) written into the sweep directory (or
``--out``). Existing files are never overwritten (a numbered name is used instead).

    mlcl-compare multirun/2026-11-24_10-00-00
    mlcl-compare outputs/ --metric test.OF1 --group-by loss,backbone --format csv
    mlcl-compare multirun/... --plot missing_rate
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from mlcl import cli

GROUP_KEYS = ["experiment", "tag", "loss", "backbone", "data", "missing_mode", "missing_rate"]


def load_runs(root: Path) -> pd.DataFrame:
    """One row per ``metrics.json`` below ``root``: run fields plus ``test.*``, ``val.*`` metrics."""
    rows: list[dict[str, Any]] = []
    bad: list[str] = []
    for path in sorted(Path(root).rglob("metrics.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            bad.append(f"{path}: {err}")
            continue
        row: dict[str, Any] = {k: res.get("run", {}).get(k) for k in GROUP_KEYS + ["seed"]}
        row["run_dir"] = str(path.parent)
        for split in ("test", "val"):
            for k, v in (res.get(split) or {}).items():
                row[f"{split}.{k}"] = _num(v)
        row["best_val"] = _num(res.get("best_val"))
        row["chance_mAP"] = _num(res.get("chance_mAP"))
        rows.append(row)
    if bad:
        print("skipped unreadable results:\n  " + "\n  ".join(bad), file=sys.stderr)
    if not rows:
        raise FileNotFoundError(
            f"no metrics.json below {root}; point mlcl-compare at a run or sweep directory "
            "(e.g. multirun/<date>) whose runs finished"
        )
    df = pd.DataFrame(rows)
    df["experiment"] = df["experiment"].fillna("-")
    df["tag"] = df["tag"].fillna("-")
    return df


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def leaderboard(
    df: pd.DataFrame, metric: str = "test.mAP", group_by: list[str] | None = None
) -> pd.DataFrame:
    """Mean, std and count of ``metric`` over seeds for each group, best first."""
    if metric not in df.columns:
        metrics = sorted(c for c in df.columns if c.startswith(("test.", "val.")))
        raise KeyError(f"metric {metric!r} not found; available: {', '.join(metrics)}")
    keys = [k for k in (group_by or GROUP_KEYS) if k in df.columns and df[k].nunique(dropna=False) > 0]
    keys = [k for k in keys if df[k].nunique(dropna=False) > 1] or keys[:1]
    g = df.groupby(keys, dropna=False)[metric]
    board = g.agg(mean="mean", std="std", n="count").reset_index()
    board["std"] = board["std"].fillna(0.0)
    return board.sort_values("mean", ascending=False, ignore_index=True)


def to_markdown(board: pd.DataFrame, metric: str) -> str:
    keys = [c for c in board.columns if c not in ("mean", "std", "n")]
    head = "| rank | " + " | ".join(keys) + f" | {metric} (mean ± std) | seeds |"
    sep = "|---:|" + "|".join("---" for _ in keys) + "|---:|---:|"
    lines = [head, sep]
    for i, r in board.iterrows():
        cells = " | ".join(str(r[k]) for k in keys)
        lines.append(f"| {i + 1} | {cells} | {r['mean']:.2f} ± {r['std']:.2f} | {int(r['n'])} |")
    return "\n".join(lines)


def _new_path(path: Path) -> Path:
    i, p = 0, path
    while p.exists():
        i += 1
        p = path.with_name(f"{path.stem}-{i}{path.suffix}")
    return p


def plot(df: pd.DataFrame, x: str, metric: str, line: str, out: Path) -> Path:
    """Line plot of ``metric`` (mean ± std over seeds) against ``x``, one line per value of ``line``."""
    # a bare Figure (no pyplot): renders off-screen without touching the global backend
    from matplotlib.figure import Figure

    if x not in df.columns:
        raise KeyError(f"--plot {x!r} is not a run field; choose one of {', '.join(GROUP_KEYS)}")
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, sub in df.groupby(line, dropna=False):
        stats = sub.groupby(x)[metric].agg(["mean", "std"]).fillna(0.0).sort_index()
        ax.errorbar(
            stats.index.astype(float),
            stats["mean"],
            yerr=stats["std"],
            marker="o",
            capsize=3,
            label=str(name),
        )
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(title=line)
    fig.tight_layout()
    path = _new_path(out / f"{metric.replace('.', '_')}_vs_{x}.png")
    fig.savefig(path, dpi=120)
    return path


@cli.guard
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mlcl-compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="run or sweep directory (searched recursively for metrics.json)")
    ap.add_argument("--metric", default="test.mAP", help="column to rank by (default test.mAP)")
    ap.add_argument(
        "--group-by", default=None, help=f"comma-separated run fields (default: {','.join(GROUP_KEYS)})"
    )
    ap.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    ap.add_argument("--plot", default=None, help="run field for the x axis, e.g. missing_rate")
    ap.add_argument("--line", default="loss", help="run field giving one line per value (with --plot)")
    ap.add_argument("--out", type=Path, default=None, help="where to write files (default: ROOT)")
    args = ap.parse_args(argv)
    try:
        df = load_runs(args.root)
        board = leaderboard(df, args.metric, args.group_by.split(",") if args.group_by else None)
    except (FileNotFoundError, KeyError) as err:
        print(f"mlcl-compare: {err}", file=sys.stderr)
        return 2
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(board, args.metric)
    print(md if args.format == "markdown" else board.to_csv(index=False), end="\n")
    _new_path(out / "leaderboard.md").write_text(md + "\n")
    board.to_csv(_new_path(out / "leaderboard.csv"), index=False)
    if args.plot:
        print(f"plot: {plot(df, args.plot, args.metric, args.line, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
