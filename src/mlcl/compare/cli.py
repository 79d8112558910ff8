"""``mlcl-compare``: a directory of runs (a sweep) -> a table over seeds, paired tests and plots.

    mlcl-compare multirun/2026-11-24_10-00-00
    mlcl-compare multirun/... --metrics test.mAP,test.CF1 --group-by loss,optimizer.lr
    mlcl-compare multirun/... --columns missing_rate --baseline loss=bce --format latex
    mlcl-compare multirun/... --plot missing_rate --per-class

Files go to ``--out`` (default ``<root>/compare``), named by metric and layout; the same call
replaces its own previous files. Run directories are only read.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import pandas as pd

from mlcl.compare.errors import CompareError
from mlcl.compare.grouping import check_keys, default_group_keys
from mlcl.compare.load import load_runs, metric_columns
from mlcl.compare.plots import line_plot, numeric_axis, per_class_heatmap, per_class_table
from mlcl.compare.tables import build_table, parse_baseline, render

EXTENSIONS = {"markdown": "md", "csv": "csv", "latex": "tex"}


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")[:120] or "all"


def _write(path: Path, text: str | None = None) -> Path:
    """Write ``text`` to ``path`` through a temporary file (a re-run replaces its own output)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def table_name(metrics: list[str], group_keys: list[str], columns: str | None, baseline: str | None) -> str:
    """File stem naming what a table shows: metrics, rows (x columns) and the baseline."""
    rows = [k for k in group_keys if k != columns]
    layout = f"{'+'.join(rows) or 'all'}_x_{columns}" if columns else f"by_{'+'.join(rows) or 'all'}"
    stem = f"table_{'+'.join(metrics)}_{layout}"
    return _slug(stem + (f"_vs_{baseline}" if baseline else ""))


def resolve_keys(df: pd.DataFrame, group_by: str | None, columns: str | None) -> list[str]:
    """The grouping keys (explicit or the varying settings), with the pivot key included."""
    if columns:
        check_keys(df, [columns], "--columns")
    keys = _split(group_by) if group_by else default_group_keys(df)
    check_keys(df, keys, "--group-by")
    if columns and columns not in keys:
        keys.append(columns)
    return keys


def check_metrics(df: pd.DataFrame, metrics: list[str]) -> None:
    have = metric_columns(df)
    unknown = [m for m in metrics if m not in df.columns]
    if unknown:
        shown = ", ".join(m for m in have if not m.startswith("label_stats."))
        raise CompareError(
            f"--metrics {','.join(unknown)}: not in these runs' metrics.json; available: {shown}"
        )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mlcl-compare",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("root", type=Path, help="run or sweep directory (searched for metrics.json)")
    ap.add_argument("--metrics", "--metric", default="test.mAP", help="comma-separated (default test.mAP)")
    ap.add_argument("--group-by", default=None, help="comma-separated config keys (default: all that vary)")
    ap.add_argument(
        "--columns", default=None, help="config key whose values become columns, e.g. missing_rate"
    )
    ap.add_argument(
        "--baseline", default=None, help="key=value paired by seed with every cell, e.g. loss=bce"
    )
    ap.add_argument("--format", choices=tuple(EXTENSIONS), default="markdown")
    ap.add_argument("--plot", default=None, help="numeric config key for the x axis, e.g. missing_rate")
    ap.add_argument("--line", default=None, help="key(s) giving one line per value (default method or loss)")
    ap.add_argument("--per-class", action="store_true", help="per-class AP heat map (method x class)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default ROOT/compare)")
    return ap


def compare(args: argparse.Namespace) -> list[Path]:
    """Build, print and write the table (and plots) asked for; returns the files written."""
    df = load_runs(args.root)
    metrics = _split(args.metrics)
    check_metrics(df, metrics)
    keys = resolve_keys(df, args.group_by, args.columns)
    baseline = parse_baseline(args.baseline)
    line = _split(args.line) or [k for k in ("method", "loss") if k in df.columns and df[k].notna().any()][:1]
    check_keys(df, line, "--line")
    if args.plot:  # every argument is checked before anything is written
        numeric_axis(df, args.plot)
    if args.per_class:
        per_class_table(df, line)
    table = build_table(df, metrics, keys, columns=args.columns, baseline=baseline)
    text = render(table, args.format)
    print(text)
    for note in table.notes:
        print(f"mlcl-compare: warning: {note}", file=sys.stderr)
    out = args.out or args.root / "compare"
    out.mkdir(parents=True, exist_ok=True)
    stem = table_name(metrics, keys, args.columns, args.baseline)
    written = [_write(out / f"{stem}.{EXTENSIONS[args.format]}", text + "\n")]
    if args.plot:
        path = out / _slug(f"plot_{metrics[0]}_vs_{args.plot}_by_{'+'.join(line)}.png")
        written.append(line_plot(df, args.plot, metrics[0], line, path))
    if args.per_class:
        written.append(per_class_heatmap(df, line, out / _slug(f"per_class_AP_by_{'+'.join(line)}.png")))
    for p in written:
        print(f"written: {p}", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    """Console entry point; bad arguments give one ``mlcl-compare: error:`` line and exit code 2."""
    args = parser().parse_args(argv)
    try:
        compare(args)
    except CompareError as err:
        print(f"mlcl-compare: error: {err}", file=sys.stderr)
        return 2
    return 0
