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
import contextlib
import io
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


def compare_table(runs_dir: Path, metric: str, column: str, baseline: str, out: Path) -> str:
    """The paper table of ``metric`` in markdown: ``mlcl-compare`` when it offers ``--columns/--baseline``,
    else the local stand-in :func:`mlcl.study_table.paper_table` (the one place the study calls compare)."""
    from mlcl import compare

    args = [str(runs_dir), "--metrics", metric, "--columns", column, "--baseline", baseline]
    buf_out, buf_err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            rc = compare.main([*args, "--format", "markdown", "--out", str(out)])
    except SystemExit as err:  # argparse: an mlcl-compare without these options
        rc = err.code if isinstance(err.code, int) else 2
    if rc == 0 and buf_out.getvalue().strip():
        return buf_out.getvalue().strip()
    from mlcl.study_table import load_runs, paper_table

    table, _ = paper_table(load_runs(runs_dir), metric, column, baseline)
    return table


def write_report(
    study: dict[str, Any],
    study_dir: Path,
    cmds: list[list[str]],
    wall_s: float | None,
    status: list[int],
    extra: Sequence[str] = (),
) -> Path:
    """Write ``<study_dir>/report.md``: tables, plots, commands, versions, wall time."""
    from mlcl.study_table import load_runs, per_class_heatmap, plot_vs

    runs_dir = study_dir / RUNS
    df = load_runs(runs_dir)
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
        lines += [f"## {metric}", ""]
        lines += [
            compare_table(runs_dir, metric, study["columns"], f"method={study['baseline']}", study_dir),
            "",
        ]
        plot = plot_vs(df, metric, study["columns"], study_dir) if metric in df.columns else None
        if plot is not None:
            lines += [f"![{metric} vs {study['columns']}]({plot.name})", ""]
    heat = per_class_heatmap(df, study_dir)
    lines += ["## Per-class AP", ""]
    lines += [
        f"![per-class AP]({heat.name})" if heat else "The runs record no per-class AP (`per_class`).",
        "",
    ]
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
    root = Path(os.environ.get("MLCL_ROOT", "."))
    study_dir = Path(out or root / "outputs" / "studies" / study["name"]).resolve()
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
    path = write_report(study, study_dir, cmds, wall, status, extra)
    print(f"report: {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``mlcl-study``, ``python -m mlcl.study``)."""
    ap = argparse.ArgumentParser(prog="mlcl-study", description=__doc__.split("\n\n")[0])
    ap.add_argument("study", help=f"a shipped study ({', '.join(available())}) or a study .yaml file")
    ap.add_argument("--out", type=Path, default=None, help="study directory (default outputs/studies/<name>)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite report.md from finished runs")
    ap.add_argument("--dry-run", action="store_true", help="print the multirun commands, run nothing")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every job (e.g. hydra/launcher=local)")
    args = ap.parse_intermixed_args(argv)
    try:
        run_study(args.study, args.out, args.overrides, args.report_only, args.dry_run)
    except UserError as err:
        print(err.paragraph(), file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
