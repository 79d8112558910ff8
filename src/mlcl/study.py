"""``mlcl-study <study>``: run a named grid (methods x conditions x seeds) and write its ``report.md``.

A study is ``conf/study/<name>.yaml`` (or a path to such a file)::

    description: ...            # one paragraph for the report
    note: ...                   # what was shrunk to fit the budget (shown in the report)
    baseline: bce               # the method every other one is paired against
    metrics: [test.mAP]         # one table per metric
    columns: missing_rate       # the condition axis of the table (a run field)
    overrides: [...]            # every job
    grid: {missing.rate: [0, 0.5], seed: [0, 1, 2]}   # swept for every method
    methods: {bce: [], mulcon: [loss.head_kwargs.embed_dim=64]}   # method -> its own overrides

Methods with the same overrides share one ``python -m mlcl.train -m method=a,b,...`` multirun; all runs
go to ``<study dir>/runs/<method=..,missing.rate=..,seed=..>`` (Hydra's ``override_dirname``) with
``ckpt_path=last``, so re-running the study skips finished jobs and resumes unfinished ones. Extra
arguments (e.g. ``hydra/launcher=local``) are passed to every multirun.

    mlcl-study default_quick                      # or: make study
    mlcl-study missing_labels --out outputs/ml trainer.max_epochs=2
    mlcl-study default_quick --report-only        # rewrite report.md from the finished runs
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mlcl import cli
from mlcl.errors import UserError

STUDY_DIR = Path(__file__).resolve().parent / "conf" / "study"
RUNS = "runs"


def available() -> list[str]:
    """Names of the shipped studies."""
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def load_study(name: str) -> dict[str, Any]:
    """The study ``name`` (shipped) or the study file at path ``name``, with defaults filled in."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else STUDY_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(
            f"no study {name!r}", str(path), f"choose one of {', '.join(available())} or a .yaml file"
        )
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    study = {
        "name": path.stem,
        "description": "",
        "note": "",
        "metrics": ["test.mAP"],
        "columns": "missing_rate",
        "overrides": [],
        "grid": {},
        **raw,
    }
    methods = study.get("methods") or {}
    if isinstance(methods, list):
        methods = {m: [] for m in methods}
    study["methods"] = {str(m): [str(o) for o in (ovs or [])] for m, ovs in methods.items()}
    if not study["methods"]:
        raise UserError("the study lists no methods", str(path), "add methods: {bce: [], ...}")
    study.setdefault("baseline", next(iter(study["methods"])))
    if study["baseline"] not in study["methods"]:
        raise UserError(
            f"baseline {study['baseline']!r} is not one of the study's methods", str(path), "fix baseline"
        )
    return study


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _config_exists(override: str) -> bool:
    """Whether ``group=option`` names a shipped config (``conf/<group>/<option>.yaml``)."""
    group, _, option = override.lstrip("+").partition("=")
    return (STUDY_DIR.parent / group / f"{option}.yaml").is_file()


def commands(study: dict[str, Any], study_dir: Path, extra: Sequence[str] = ()) -> list[list[str]]:
    """The ``python -m mlcl.train -m ...`` command lines of the study (one per distinct method overrides)."""
    grid = [
        f"{k}={','.join(str(v) for v in (vals if isinstance(vals, list) else [vals]))}"
        for k, vals in study["grid"].items()
    ]
    by_overrides: dict[tuple[str, ...], list[str]] = {}
    for method, ovs in study["methods"].items():
        by_overrides.setdefault(tuple(ovs), []).append(method)
    optional = [o for o in study.get("optional_overrides") or [] if _config_exists(o)]
    cmds = []
    for ovs, methods in by_overrides.items():
        fixed = [*study["overrides"], *optional, *ovs, *extra]
        exclude = sorted({_key(o) for o in fixed if not _key(o).startswith("hydra")} | {"ckpt_path"})
        cmds.append(
            [
                sys.executable, "-m", "mlcl.train", "-m",
                f"method={','.join(methods)}",
                *grid,
                *fixed,
                "ckpt_path=last",
                f"hydra.sweep.dir={study_dir / RUNS}",
                "hydra.sweep.subdir=${hydra.job.override_dirname}",
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]",
            ]
        )  # fmt: skip
    return cmds


def versions() -> dict[str, str]:
    """Software versions for the report (python, torch, lightning, hydra, mlcl and its git commit)."""
    from importlib.metadata import PackageNotFoundError, version

    import hydra
    import lightning
    import torch

    try:
        mlcl_version = version("mlcl")
    except PackageNotFoundError:
        mlcl_version = "not installed"
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "hydra": hydra.__version__,
        "mlcl": mlcl_version,
        "platform": platform.platform(),
    }
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            out["mlcl git commit"] = commit.stdout.strip() + (
                " (uncommitted changes)" if dirty.stdout.strip() else ""
            )
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _numeric(values: Any) -> bool:
    """Whether every value of a pandas column reads as a number."""
    import pandas as pd

    return bool(pd.to_numeric(values, errors="coerce").notna().all())


def method_table(df: Any, metrics: list[str], column: str, baseline: str | None) -> str:
    """The paper table (rows = methods, column blocks = ``column`` values) of ``mlcl.compare``, markdown."""
    from mlcl import compare

    base = ("method", baseline) if baseline else None
    return compare.render(
        compare.build_table(df, metrics, ["method", column], columns=column, baseline=base), "markdown"
    )


def _embedding_pictures(df: Any, column: str) -> dict[str, Path]:
    """One t-SNE picture per method (its first run in grid order; the final stage's for multi-stage jobs)."""
    pictures: dict[str, Path] = {}
    for _, row in df.sort_values([column, "seed"]).iterrows():
        found = sorted(Path(row["run_dir"]).rglob("embeddings.png"))
        if found and row["method"] not in pictures:
            pictures[str(row["method"])] = found[-1]
    return pictures


def write_report(
    study: dict[str, Any],
    study_dir: Path,
    cmds: list[list[str]],
    wall_s: float | None,
    status: list[int],
    extra: Sequence[str] = (),
) -> Path:
    """Write ``<study_dir>/report.md``: paper tables and plots (``mlcl.compare``), representation
    diagnostics with the embedding grid, commands, versions, wall time."""
    from mlcl import compare

    runs_dir = study_dir / RUNS
    df = compare.load_runs(runs_dir)
    column = study["columns"]
    lines = [f"# Study `{study['name']}`", "", str(study["description"]).strip(), ""]
    if study["note"]:
        lines += [f"**Budget note.** {str(study['note']).strip()}", ""]
    expected = len(study["methods"]) * _grid_size(study["grid"])
    lines += [
        f"Finished jobs: {len(df)} of {expected}. Baseline: `method={study['baseline']}`; Δ = mean paired "
        "difference over seeds (95 % t confidence interval, paired t-test p-value); ▲/▼ = significantly "
        "better/worse than the baseline at p < 0.05; bold = best mean of the column.",
        "",
    ]
    for metric in study["metrics"]:
        if metric not in df.columns or df[metric].isna().all():
            lines += [f"## {metric}", "", f"No finished job records `{metric}`.", ""]
            continue
        lines += [f"## {metric}", "", method_table(df, [metric], column, study["baseline"]), ""]
        if _numeric(df[column]) and df[column].nunique() > 1:  # a line over conditions needs a numeric axis
            plot = compare.line_plot(df, column, metric, ["method"], study_dir / f"{metric}_vs_{column}.png")
            lines += [f"![{metric} vs {column}]({plot.name})", ""]
    lines += ["## Per-class AP", ""]
    if "per_class.AP" in df.columns and df["per_class.AP"].notna().any():
        heat = compare.per_class_heatmap(df, ["method"], study_dir / "per_class_AP.png")
        lines += [f"![per-class AP]({heat.name})", ""]
    else:
        lines += ["The runs record no per-class AP (`per_class`).", ""]
    rep = sorted(c for c in df.columns if c.startswith("representation.") and df[c].notna().any())
    if rep:
        lines += [
            "## Representation diagnostics",
            "",
            "Test-split embeddings (`diagnostics=embeddings`).",
            "",
        ]
        for value in sorted(df[column].dropna().unique()):  # one table per condition: metrics as columns
            sub = df[df[column] == value]
            table = compare.render(compare.build_table(sub, rep, ["method"]), "markdown")
            table = table.replace("representation.", "")
            lines += [f"{column}={value:g}:" if isinstance(value, float) else f"{column}={value}:", ""]
            lines += [table, ""]
        pictures = _embedding_pictures(df, column)
        if pictures:
            from mlcl.diagnostics import embedding_grid

            grid = embedding_grid(pictures, study_dir / "embeddings_grid.png")
            lines += [f"![t-SNE of the test embeddings per method]({grid.name})", ""]
    lines += ["## Commands", "", "```"]
    lines += [shlex.join(["mlcl-study", study["name"], *extra])]
    lines += [shlex.join(["python", *c[1:]]) for c in cmds] + ["```", ""]
    if any(status):
        lines += [
            f"Exit statuses of the multiruns: {status} (non-zero: some jobs failed; see their logs).",
            "",
        ]
    total = float(df["duration_s"].sum()) if "duration_s" in df else None
    lines += ["## Software and time", ""]
    lines += [f"- {k}: {v}" for k, v in versions().items()]
    if wall_s is not None:
        lines += [
            f"- wall time of this invocation: {wall_s / 60:.1f} min (finished jobs are skipped on re-runs)"
        ]
    if total:
        lines += [f"- summed job time: {total / 60:.1f} min"]
    lines += [f"- written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", ""]
    path = study_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _grid_size(grid: dict[str, Any]) -> int:
    n = 1
    for v in grid.values():
        n *= len(v) if isinstance(v, list) else 1
    return n


def run_study(
    name: str,
    out: Path | None = None,
    extra: Sequence[str] = (),
    report_only: bool = False,
    dry_run: bool = False,
) -> Path | None:
    """Run the study's multiruns (unless ``report_only``) and write its report; return the report path."""
    study = load_study(name)
    from mlcl.config.root import project_root

    # the same root as every run's outputs/ (MLCL_ROOT, a marker or checkout above the cwd, the editable
    # checkout, the cwd), so `mlcl-study` from any directory writes where `mlcl-train` does
    study_dir = Path(out or project_root() / "outputs" / "studies" / study["name"]).resolve()
    cmds = commands(study, study_dir, extra)
    if dry_run:
        for c in cmds:
            print(shlex.join(["python", *c[1:]]))
        return None
    start, status = time.time(), []
    if not report_only:
        study_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for c in cmds:
            print(f"mlcl-study: {shlex.join(['python', *c[1:]])}", flush=True)
            status.append(subprocess.run(c, env=env).returncode)
    wall = None if report_only else time.time() - start
    runs_dir = study_dir / RUNS
    if not runs_dir.is_dir() or not compare_has_results(runs_dir):
        failed = f"the multirun commands above exited with {status}" if any(status) else "nothing has run yet"
        raise UserError(
            f"no finished job to report on in {runs_dir} ({failed}); no report was written",
            f"mlcl-study {study['name']}",
            "fix the error printed above (an override the jobs refused, say) and re-run the same command"
            if any(status)
            else f"run `mlcl-study {study['name']}` without --report-only first",
        )
    path = write_report(study, study_dir, cmds, wall, status, extra)
    print(f"report: {path}")
    if any(status):  # a partial study still gets its report, but the command says that jobs failed
        raise UserError(
            f"some jobs of the study failed (multirun exit statuses {status}); "
            f"{path} reports the finished ones",
            f"mlcl-study {study['name']}",
            "see the failed jobs' train.log, fix the cause and re-run the same command "
            "(finished jobs are skipped)",
        )
    return path


def compare_has_results(runs_dir: Path) -> bool:
    """Whether any job below ``runs_dir`` has finished (written its ``metrics.json``)."""
    from mlcl.compare.load import find_results

    return bool(find_results(runs_dir))


@cli.guard
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``mlcl-study``, ``python -m mlcl.study``)."""
    ap = argparse.ArgumentParser(prog="mlcl-study", description=__doc__.split("\n\n")[0])
    ap.add_argument("study", help=f"a shipped study ({', '.join(available())}) or a study .yaml file")
    ap.add_argument("--out", type=Path, default=None, help="study directory (default outputs/studies/<name>)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite report.md from finished runs")
    ap.add_argument("--dry-run", action="store_true", help="print the multirun commands, run nothing")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every job (e.g. hydra/launcher=local)")
    args = ap.parse_intermixed_args(argv)
    run_study(args.study, args.out, args.overrides, args.report_only, args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
