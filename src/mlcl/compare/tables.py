"""One table builder for every layout and format.

:func:`build_table` turns a run table into rows of structured cells: the group's settings, then per
metric and condition a ``mean ± std (n)`` cell and, with a baseline, the paired difference with its
95 % CI and the p-value(s). The flat layout is the pivot layout with a single condition.
:func:`render` writes the same table as markdown, CSV or a LaTeX ``tabular`` with booktabs rules.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mlcl.compare.errors import CompareError
from mlcl.compare.grouping import _labels, candidate_keys, differing
from mlcl.compare.stats import ALPHA, Paired, Summary, higher_is_better, paired, per_seed, summarize

FORMATS = ("markdown", "csv", "latex")


@dataclass
class Cell:
    """One table cell: plain ``text`` (settings) or a statistic (``summary``, ``paired``, ``p``)."""

    kind: str  # "text" | "stat" | "diff" | "p"
    text: str = ""
    summary: Summary | None = None
    paired: Paired | None = None
    mark: int = 0  # +1 significantly better than the baseline, -1 worse
    bold: bool = False
    is_baseline: bool = False


@dataclass
class Table:
    header: list[str]  # may hold {pm} / {delta} placeholders, filled per format
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)


def parse_baseline(text: str | None) -> tuple[str, str] | None:
    """``"loss=bce"`` -> ``("loss", "bce")``."""
    if not text:
        return None
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise CompareError(f"--baseline {text!r} must look like key=value, e.g. --baseline loss=bce")
    return key.strip(), value.strip()


def _matches(series: pd.Series, value: Any) -> pd.Series:
    """Rows whose value equals ``value``, numerically when both sides are numbers (0.5 == "0.50")."""
    try:
        target = float(value)
    except (TypeError, ValueError):
        return series.map(str) == str(value)
    num = pd.to_numeric(series, errors="coerce")
    if num.notna().all():
        return (num - target).abs() <= 1e-12 * max(1.0, abs(target))
    return series.map(str) == str(value)


def _sorted_values(series: pd.Series) -> list[Any]:
    vals = series.drop_duplicates().tolist()
    try:
        return sorted(vals, key=float)
    except (TypeError, ValueError):
        return sorted(vals, key=str)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float) and math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return f"{v:g}"
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def build_table(
    df: pd.DataFrame,
    metrics: list[str],
    group_keys: list[str],
    columns: str | None = None,
    baseline: tuple[str, str] | None = None,
) -> Table:
    """Rows = groups of ``group_keys`` (minus ``columns``), cells = ``metrics`` per condition.

    ``columns``: a key whose values become column blocks (the paper layout); ``baseline``:
    ``(key, value)`` whose runs every other cell is paired with by seed.
    """
    row_keys = [k for k in group_keys if k != columns]
    conditions = _sorted_values(df[columns]) if columns else [None]
    ident = row_keys + ([columns] if columns else [])
    if baseline is not None:
        key, value = baseline
        if key not in ident:
            raise CompareError(
                f"--baseline {key}={value}: {key} is not a grouping key ({', '.join(ident) or 'none'}); "
                f"add it with --group-by or --columns"
            )
        if not _matches(df[key], value).any():
            seen = ", ".join(_fmt_value(v) for v in _sorted_values(df[key]))
            raise CompareError(f"--baseline {key}={value}: no run has {key}={value}; values present: {seen}")
    # settings other than the seed and the table's own keys: a cell whose runs differ in one is flagged
    others = [k for k in candidate_keys(df) if k not in ident]
    labels = _labels(df, row_keys)
    multi = len(metrics) > 1
    header = list(row_keys)
    for m in metrics:
        for c in conditions:
            if c is None:
                name = m
            else:
                name = f"{m} {columns}={_fmt_value(c)}" if multi else f"{columns}={_fmt_value(c)}"
            header.append(name)
            if baseline is not None:
                header += ["{delta} [95% CI]", "p"]

    rows: list[list[Cell]] = []
    row_notes: list[str] = []
    notes: list[str] = []
    for _, sub in df.groupby(labels, sort=False):
        first = sub.iloc[0]
        cells = [Cell("text", _fmt_value(first[k])) for k in row_keys]
        differ: list[str] = []
        for c in conditions:
            runs = sub if c is None else sub[_matches(sub[columns], c)]
            differ += [k for k in differing(runs, others) if k not in differ]
        for m in metrics:
            for c in conditions:
                runs = sub if c is None else sub[_matches(sub[columns], c)]
                cells.append(Cell("stat", summary=summarize(runs[m]) if len(runs) else None))
                if baseline is not None:
                    cells += _paired_cells(df, runs, first, row_keys, columns, c, baseline, m, cells[-1])
        text = ", ".join(differ)
        row_notes.append(f"differs in: {text}" if text else "")
        if text:
            where = ", ".join(f"{k}={_fmt_value(first[k])}" for k in row_keys) or "all runs"
            notes.append(f"{where}: runs differ in {text}, not only in the seed (add it to --group-by)")
        rows.append(cells)
    if any(row_notes):
        header.append("note")
        for cells, note in zip(rows, row_notes):
            cells.append(Cell("text", note))
    _bold_best(rows, metrics)
    if columns is None:  # a leaderboard: best first
        first_stat = len(row_keys)
        rows.sort(key=lambda r: -_sort_score(r[first_stat], metrics[0]))
    else:  # a paper table: the baseline row first, then the rows in the order of their settings
        rows.sort(
            key=lambda r: (not any(c.is_baseline for c in r), [_natural(c.text) for c in r[: len(row_keys)]])
        )
    return Table(header, rows, notes)


def _natural(text: str) -> tuple[int, float, str]:
    """Sort key: numbers by value before words alphabetically."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _sort_score(cell: Cell, metric: str) -> float:
    if cell.summary is None:
        return -math.inf
    return cell.summary.mean if higher_is_better(metric) else -cell.summary.mean


def _paired_cells(
    df: pd.DataFrame,
    runs: pd.DataFrame,
    first: pd.Series,
    row_keys: list[str],
    columns: str | None,
    condition: Any,
    baseline: tuple[str, str],
    metric: str,
    stat: Cell,
) -> list[Cell]:
    """The Δ [CI] and p cells of one (row, condition) against the matching baseline runs."""
    key, value = baseline
    mask = _matches(df[key], value)
    for k in row_keys:
        if k != key:
            mask &= df[k].map(str) == str(first[k])
    if columns is not None and columns != key:
        mask &= _matches(df[columns], condition)
    base_runs = df[mask]
    is_base = len(runs) > 0 and bool(_matches(runs[key], value).all())
    if is_base:
        stat.is_baseline = True
        return [Cell("diff", is_baseline=True), Cell("p", is_baseline=True)]
    if runs.empty or base_runs.empty or "seed" not in df.columns:
        return [Cell("diff", paired=Paired(0, None, None, None, None, None)), Cell("p")]
    result = paired(per_seed(runs, metric), per_seed(base_runs, metric))
    if result.significant(ALPHA) and result.diff is not None:
        stat.mark = 1 if (result.diff > 0) == higher_is_better(metric) else -1
    return [Cell("diff", paired=result), Cell("p", paired=result)]


def _bold_best(rows: list[list[Cell]], metrics: list[str]) -> None:
    """Bold the best mean of every statistic column (ties all bold)."""
    if not rows:
        return
    width = len(rows[0])
    stat_cols = [j for j in range(width) if rows[0][j].kind == "stat"]
    per_metric = len(stat_cols) // max(1, len(metrics))
    for i, j in enumerate(stat_cols):
        metric = metrics[min(i // max(1, per_metric), len(metrics) - 1)]
        sign = 1.0 if higher_is_better(metric) else -1.0
        means = [sign * r[j].summary.mean for r in rows if r[j].summary is not None]
        if len(means) < 2:
            continue
        best = max(means)
        for r in rows:
            s = r[j].summary
            if s is not None and math.isclose(sign * s.mean, best, rel_tol=0, abs_tol=1e-9):
                r[j].bold = True


# ---------------------------------------------------------------- rendering
@dataclass(frozen=True)
class _Style:
    pm: str
    delta: str
    up: str
    down: str
    na: str = "n/a"

    def escape(self, s: str) -> str:
        return s

    def bold(self, s: str) -> str:
        return s


class _Markdown(_Style):
    def escape(self, s: str) -> str:
        return s.replace("|", "\\|")

    def bold(self, s: str) -> str:
        return f"**{s}**"


class _Latex(_Style):
    _SPECIAL = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
    }

    def escape(self, s: str) -> str:
        return "".join(self._SPECIAL.get(ch, ch) for ch in s)

    def bold(self, s: str) -> str:
        return rf"\textbf{{{s}}}"


STYLES: dict[str, _Style] = {
    "markdown": _Markdown("±", "Δ", " ▲", " ▼"),
    "csv": _Style("±", "Δ", " ▲", " ▼"),
    "latex": _Latex(r"$\pm$", r"$\Delta$", r"$^{\uparrow}$", r"$^{\downarrow}$"),
}


def _p_text(p: float | None, st: _Style) -> str:
    if p is None:
        return st.na
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def cell_text(cell: Cell, st: _Style) -> str:
    """The text of one cell in a format's style (escaped, bold and marks applied)."""
    if cell.kind == "text":
        return st.escape(cell.text)
    if cell.kind == "stat":
        s = cell.summary
        if s is None:
            return "-"
        text = f"{s.mean:.2f}" if s.std is None else f"{s.mean:.2f} {st.pm} {s.std:.2f}"
        text += f" ({s.n})"
        text = st.bold(text) if cell.bold else text
        return text + (st.up if cell.mark > 0 else st.down if cell.mark < 0 else "")
    if cell.is_baseline:
        return "baseline" if cell.kind == "diff" else ""
    r = cell.paired
    if cell.kind == "diff":
        if r is None or r.diff is None:
            return st.na
        if r.ci_low is None:
            return f"{r.diff:+.2f} [{st.na}]"
        return f"{r.diff:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
    if r is None:
        return st.na
    text = _p_text(r.p_t, st)
    if r.p_wilcoxon is not None:
        text += f" (W {_p_text(r.p_wilcoxon, st)})"
    return text


def render(table: Table, fmt: str, caption: str = "") -> str:
    """``table`` as markdown, CSV or a booktabs LaTeX ``tabular``."""
    if fmt not in STYLES:
        raise CompareError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    st = STYLES[fmt]
    head = [st.escape(h).replace("\\{delta\\}", "{delta}").format(delta=st.delta) for h in table.header]
    body = [[cell_text(c, st) for c in row] for row in table.rows]
    n_text = sum(1 for c in table.rows[0] if c.kind == "text") if table.rows else 0
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(head)
        w.writerows(body)
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |"]
        lines.append("|" + "|".join("---" if i < n_text else "---:" for i in range(len(head))) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in body]
        if table.notes:
            lines += ["", *(f"⚠ {st.escape(n)}" for n in table.notes)]
        if caption:
            lines += ["", caption]
        return "\n".join(lines)
    spec = "l" * n_text + "r" * (len(head) - n_text)
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    lines += [" & ".join(r) + r" \\" for r in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.insert(0, f"% {caption}")
    return "\n".join(lines)


def leaderboard(
    df: pd.DataFrame, metric: str = "test.mAP", group_by: list[str] | None = None
) -> pd.DataFrame:
    """Mean, std (NaN for one run) and count of ``metric`` per group, best first, as a DataFrame."""
    from mlcl.compare.grouping import check_keys, default_group_keys

    if metric not in df.columns:
        raise CompareError(f"metric {metric!r} not found")
    keys = group_by or default_group_keys(df)
    check_keys(df, keys, "--group-by")
    if not keys:
        out = pd.DataFrame(
            {"mean": [df[metric].mean()], "std": [df[metric].std()], "n": [df[metric].count()]}
        )
        return out
    board = df.groupby(keys, dropna=False)[metric].agg(mean="mean", std="std", n="count").reset_index()
    return board.sort_values("mean", ascending=not higher_is_better(metric), ignore_index=True)
