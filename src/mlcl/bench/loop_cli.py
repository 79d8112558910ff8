"""``mlcl-bench loop``: steps/s of mlcl's whole training loop against a bare PyTorch loop, per model, idle
and under an artificial background load, the time to the first step, and the issue's targets.

    python -m mlcl.bench loop                 # yeast fine-tune MLP, digits CNN, yeast MulSupCon pre-training
    python -m mlcl.bench loop --quick         # a few steps of each: checks that everything runs

Runs are interleaved (bare and mlcl alternate, thread counts alternate) so that a change of the machine's
load hits every variant alike; each variant keeps its fastest run. The first round of every case, the
load runs and the first-step runs come first; further rounds only while the time budget lasts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlcl.bench.budget import Budget
from mlcl.bench.cli_args import _nonneg_int, _positive_int
from mlcl.bench.load import BusyProcesses
from mlcl.bench.loop import CASES, LoopCase, Timing
from mlcl.bench.measure import BUSY_CORES
from mlcl.bench.report import _emit, _footer, machine_info

DEFAULT_BUDGET_S = 300.0
#: targets of the issue (2-core CPU)
MIN_RATIO = 0.5  # mlcl steps/s >= this x the bare loop's (at its best thread count)
MAX_FIRST_STEP_S = 10.0
MAX_AUTO_GAP = 1.2  # best fixed thread count / auto <= this
MIN_LOADED_SHARE = 0.4  # steps/s under the background load >= this x idle
PRETRAIN_REFERENCE = 30.0  # steps/s of the reference MulSupCon pre-training (idle 2-core machine)
PRETRAIN_TARGET = 2 * PRETRAIN_REFERENCE
#: a job runs only if the budget has this multiple of its expected duration left
COST_MARGIN = 1.25


@dataclass
class Job:
    """One planned measurement; ``fn`` returns a Timing (runs) or seconds (first step)."""

    case: str
    kind: str  # "bare" | "mlcl" | "first"
    setting: str
    loaded: bool
    fn: Callable[[], Timing | float | None]

    @property
    def cost_key(self) -> tuple[str, str, bool]:
        return (self.case, self.kind, self.loaded)


@dataclass
class CaseResult:
    case: LoopCase
    runs: list[Timing] = field(default_factory=list)
    first_step: float | None = None
    first_step_skipped: bool = False

    def best(self, loop: str, setting: str, loaded: bool = False) -> Timing | None:
        """The fastest run of a variant (None if it never ran)."""
        done = [t for t in self.runs if (t.loop, t.setting, t.loaded) == (loop, setting, loaded)]
        ok = [t for t in done if t.steps_per_s is not None]
        if ok:
            return max(ok, key=lambda t: t.steps_per_s)
        return done[0] if done else None

    def idle_before(self, loaded: Timing) -> Timing | None:
        """The last idle run of the same variant that finished before ``loaded`` (else its best)."""
        i = next(k for k, t in enumerate(self.runs) if t is loaded)
        key = (loaded.loop, loaded.setting, False)
        same = [t for t in self.runs[:i] if (t.loop, t.setting, t.loaded) == key and t.steps_per_s]
        return same[-1] if same else self.best(loaded.loop, loaded.setting)

    def settings(self, loop: str) -> list[str]:
        return list(dict.fromkeys(t.setting for t in self.runs if t.loop == loop and not t.loaded))

    def best_bare(self) -> Timing | None:
        """The bare loop at its best thread count."""
        cands = [self.best("bare", s) for s in self.settings("bare")]
        cands = [t for t in cands if t is not None and t.steps_per_s is not None]
        return max(cands, key=lambda t: t.steps_per_s) if cands else None


def run_jobs(jobs: Sequence[Job], budget: Budget) -> list[tuple[Job, Timing | float | None, bool]]:
    """Run ``jobs`` in order while the budget allows each one's expected cost (the duration of the last
    job of the same kind); a job that does not fit is skipped. Returns (job, result, skipped)."""
    cost: dict[tuple[str, str, bool], float] = {}
    out: list[tuple[Job, Timing | float | None, bool]] = []
    for job in jobs:
        # a margin on the estimate: runs of one kind vary with the load
        if budget.spent or not budget.allows(COST_MARGIN * cost.get(job.cost_key, 0.0)):
            out.append((job, None, True))
            continue
        t0 = budget.elapsed()
        out.append((job, job.fn(), False))
        cost[job.cost_key] = budget.elapsed() - t0
    return out


def plan(
    cases: Sequence[LoopCase],
    threads: Sequence[int],
    rounds: int,
    busy: int,
    first_step: bool,
    make: Callable[[LoopCase, str, str, bool], Callable[[], Timing | float | None]],
) -> list[Job]:
    """Jobs in priority order: round one of every case (interleaved), the runs under load, the first-step
    runs, then the remaining rounds. ``make(case, kind, setting, loaded)`` builds each job's function."""

    def round_jobs(case: LoopCase) -> list[Job]:
        if not case.full:
            return [
                Job(case.key, "bare", "1", False, make(case, "bare", "1", False)),
                Job(case.key, "mlcl", "auto", False, make(case, "mlcl", "auto", False)),
            ]
        jobs = []
        for i, t in enumerate(threads):  # bare t, mlcl auto (once), mlcl t: alternating loops
            jobs.append(Job(case.key, "bare", str(t), False, make(case, "bare", str(t), False)))
            if i == 0:
                jobs.append(Job(case.key, "mlcl", "auto", False, make(case, "mlcl", "auto", False)))
            jobs.append(Job(case.key, "mlcl", str(t), False, make(case, "mlcl", str(t), False)))
        return jobs

    jobs = [j for c in cases for j in round_jobs(c)]
    if busy:
        for c in (c for c in cases if c.full):
            jobs.append(Job(c.key, "bare", "best", True, make(c, "bare", "best", True)))
            jobs.append(Job(c.key, "mlcl", "auto", True, make(c, "mlcl", "auto", True)))
    if first_step:
        jobs += [Job(c.key, "first", "auto", False, make(c, "first", "auto", False)) for c in cases if c.full]
    for _ in range(rounds - 1):
        jobs += [j for c in cases for j in round_jobs(c)]
    return jobs


# ----------------------------------------------------------------------------------------- reporting
def _rate(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if x >= 100 else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def _load_cell(t: Timing) -> str:
    if t.background is None:
        return "—"
    return f"{t.background:.2f}" + (" !" if t.background > BUSY_CORES and not t.loaded else "")


def _row_cell(t: Timing | None) -> str:
    if t is None:
        return "not run"
    if t.skipped:
        return "skipped (time budget)"
    if t.error:
        return "error: " + t.error.replace("|", "\\|")
    return ""


def loop_table(results: Sequence[CaseResult], busy: int = 2) -> str:
    """One row per model x loop x thread setting (idle, then under load)."""
    lines = [
        "| model | loop | threads | steps/s | steps/CPU-s | vs bare (best threads) | other load | runs |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        bare = res.best_bare()
        base = bare.steps_per_s if bare is not None else None
        variants = [("bare", s, False) for s in res.settings("bare")]
        variants += [("mlcl", s, False) for s in res.settings("mlcl")]
        variants += [(lp, s, True) for lp, s in (("bare", "best"), ("mlcl", "auto")) if res.best(lp, s, True)]
        for loop, setting, loaded in variants:
            t = res.best(loop, setting, loaded)
            n = sum(1 for r in res.runs if (r.loop, r.setting, r.loaded) == (loop, setting, loaded))
            shown = (
                setting
                if t is None or t.threads is None or str(t.threads) == setting
                else f"{setting} → {t.threads}"
            )
            label = f"{loop} (+{busy} busy processes)" if loaded else loop
            problem = _row_cell(t)
            if problem:
                lines.append(f"| {res.case.label} | {label} | {shown} | {problem} | — | — | — | {n} |")
                continue
            ratio = f"{t.steps_per_s / base:.2f}×" if base and t.steps_per_s else "—"
            lines.append(
                f"| {res.case.label} | {label} | {shown} | {_rate(t.steps_per_s)} "
                f"| {_rate(t.steps_per_cpu_s)} | {ratio} | {_load_cell(t)} | {n} |"
            )
    return "\n".join(lines)


def targets(res: CaseResult, busy: int = 2) -> list[tuple[str, str, str]]:
    """(target, measured, met) of one model; ``met`` says why when a figure is missing."""
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None, *runs: Timing | None) -> str:
        if ok is None:
            return "— (not measured)"
        busy = any(
            t is not None and t.background is not None and t.background > BUSY_CORES and not t.loaded
            for t in runs
        )
        return ("yes" if ok else "**no**") + (" (busy machine)" if busy else "")

    auto = res.best("mlcl", "auto")
    auto_rate = auto.steps_per_s if auto is not None else None
    if not res.case.full:
        ok = None if auto_rate is None else auto_rate >= PRETRAIN_TARGET
        cpu = auto.steps_per_cpu_s if auto is not None else None
        measured = f"{_rate(auto_rate)} steps/s ({_rate(cpu)} per CPU-second)"
        target = f"≥ {PRETRAIN_TARGET:g} steps/s (2× the reference's {PRETRAIN_REFERENCE:g}, idle machine)"
        rows.append((target, measured, verdict(ok, auto)))
        return rows
    bare = res.best_bare()
    ratio = auto_rate / bare.steps_per_s if auto_rate and bare is not None else None
    rows.append(
        (
            f"mlcl (threads auto) ≥ {MIN_RATIO:g}× bare loop at its best thread count",
            "—" if ratio is None else f"{ratio:.2f}× (bare best: threads {bare.setting})",
            verdict(None if ratio is None else ratio >= MIN_RATIO, auto, bare),
        )
    )
    first = res.first_step
    rows.append(
        (
            f"time to first step ≤ {MAX_FIRST_STEP_S:g} s (fresh process)",
            "skipped (time budget)"
            if res.first_step_skipped
            else ("—" if first is None else f"{first:.1f} s"),
            "— (not measured)" if first is None else ("yes" if first <= MAX_FIRST_STEP_S else "**no**"),
        )
    )
    fixed = [res.best("mlcl", s) for s in res.settings("mlcl") if s != "auto"]
    fixed = [t for t in fixed if t is not None and t.steps_per_s]
    best_fixed = max(fixed, key=lambda t: t.steps_per_s) if fixed else None
    gap = best_fixed.steps_per_s / auto_rate if best_fixed is not None and auto_rate else None
    rows.append(
        (
            f"threads auto within {MAX_AUTO_GAP:g}× of the best fixed thread count",
            "—" if gap is None else f"best fixed ({best_fixed.setting}) / auto = {gap:.2f}",
            verdict(None if gap is None else gap <= MAX_AUTO_GAP, auto, best_fixed),
        )
    )
    loaded = res.best("mlcl", "auto", loaded=True)
    # against the idle run just before it (the machine's own load drifts over minutes)
    idle = res.idle_before(loaded) if loaded is not None else None
    share = loaded.steps_per_s / idle.steps_per_s if loaded and loaded.steps_per_s and idle else None
    rows.append(
        (
            f"under {busy} busy processes ≥ {MIN_LOADED_SHARE:.0%} of the idle steps/s just before",
            "—" if share is None else f"{share:.0%}",
            verdict(None if share is None else share >= MIN_LOADED_SHARE, auto),
        )
    )
    return rows


def targets_table(results: Sequence[CaseResult], busy: int = 2) -> str:
    lines = ["| model | target | measured | met |", "|---|---|---|---|"]
    for res in results:
        for target, measured, met in targets(res, busy):
            lines.append(f"| {res.case.label} | {target} | {measured} | {met} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlcl-bench loop",
        description="Steps/s of mlcl's training loop (callbacks, logging, progress bar, validation, "
        "checkpoints) against a bare PyTorch loop on the same model, idle and under load.",
    )
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument(
        "--threads", default=None, help="fixed thread counts to compare (default 1..min(cores, 4))"
    )
    p.add_argument("--rounds", type=_positive_int, default=2, help="interleaved rounds, best kept (2)")
    p.add_argument("--max-run-s", type=float, default=20.0, help="stop one timed run after this long (20)")
    p.add_argument(
        "--busy", type=_nonneg_int, default=2, help="busy processes of the load runs (2; 0 = none)"
    )
    p.add_argument("--no-first-step", action="store_true", help="skip the time-to-first-step runs")
    p.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"total wall-time budget; runs that no longer fit are skipped ({DEFAULT_BUDGET_S:g})",
    )
    p.add_argument("--quick", action="store_true", help="3 steps per run, one round: a smoke test")
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    return p


def bench_loop(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        parser.error(f"unknown case(s) {', '.join(unknown) or '(none)'}; valid: {', '.join(CASES)}")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        threads = (
            [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, min(cores, 4) + 1))
        )
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if min(threads) < 1:
        parser.error("--threads must be >= 1")
    rounds = 1 if args.quick else args.rounds
    budget = Budget(args.budget_s or None)
    started = time.perf_counter()
    info = machine_info("cpu")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    from mlcl.bench import loop

    work = Path(tempfile.mkdtemp(prefix="mlcl-bench-loop-"))
    yeast_note = ""
    results = {n: CaseResult(CASES[n]) for n in names}
    setups: dict[str, loop.BareSetup] = {}
    overrides: dict[str, list[str]] = {}
    for n in names:
        overrides[n] = loop.run_overrides(CASES[n], args.quick)
        if CASES[n].needs_yeast and not loop.yeast_present(loop.compose(overrides[n])):
            if not yeast_note:
                os.environ["MLCL_YEAST"] = str(loop.write_synthetic_yeast(Path(tempfile.mkdtemp(dir=work))))
                yeast_note = "../shared/data/yeast is absent: yeast rows use random data of the same shape. "
    max_s = 5.0 if args.quick else args.max_run_s

    def make(case: LoopCase, kind: str, setting: str, loaded: bool) -> Callable[[], Timing | float | None]:
        def fn() -> Timing | float | None:
            if kind == "first":
                return loop.time_to_first_step(overrides[case.key], work)
            if kind == "bare" and case.key not in setups:
                setups[case.key] = loop.bare_setup(overrides[case.key], work)
            t_count = setting
            if setting == "best":
                best = results[case.key].best_bare()
                t_count = best.setting if best is not None else "1"
            with BusyProcesses(args.busy if loaded else 0):
                if kind == "bare":
                    t = loop.run_bare(setups[case.key], int(t_count), max_s)
                else:
                    t = loop.run_mlcl(overrides[case.key], t_count, work, max_s)
            t.setting, t.loaded = setting if setting != "best" else f"best ({t_count})", loaded
            if setting == "best":
                t.setting = "best"
            print(
                f"[mlcl-bench loop] {case.key} {kind} threads={t_count}{' loaded' if loaded else ''}: "
                f"{_rate(t.steps_per_s)} steps/s" + (f" ({t.error})" if t.error else ""),
                file=sys.stderr,
                flush=True,
            )
            return t

        return fn

    jobs = plan([CASES[n] for n in names], threads, rounds, args.busy, not args.no_first_step, make)
    for job, result, skipped in run_jobs(jobs, budget):
        res = results[job.case]
        if job.kind == "first":
            res.first_step_skipped = skipped
            res.first_step = None if skipped else result
        elif skipped:
            if not any(
                (t.loop, t.setting, t.loaded) == (job.kind, job.setting, job.loaded) for t in res.runs
            ):
                res.runs.append(Timing(job.kind, job.setting, loaded=job.loaded, skipped=True))
        elif isinstance(result, Timing):
            res.runs.append(result)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    loads = "n/a" if load_start is None else f"{load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end"
    text = "\n".join(
        [
            "## mlcl-bench loop: mlcl's training loop against a bare PyTorch loop",
            "",
            info,
            "",
            f"1-minute load average while it ran: {loads}. "
            + yeast_note
            + "steps/s = training steps / wall time from the first step to the end of training; mlcl's time "
            "includes its validation, checkpoint writes, CSV logging and progress bar (the bare loop has "
            "none). "
            "steps/CPU-s = steps per CPU-second of this process: what a free core gives, whatever the load. "
            "'other load' = cores used by other processes while the run lasted (`!` above "
            f"{BUSY_CORES}: a disturbed row, kept and marked); each variant keeps its fastest of the runs "
            f"shown (up to {rounds} interleaved rounds while the {budget.text().split(' (')[0]} lasted; "
            f"a run stops after {max_s:g} s). `auto → n`: the thread policy chose n. Load rows add "
            f"{args.busy} busy processes that the bench starts and stops itself.",
            "",
            loop_table(list(results.values()), args.busy),
            "",
            "### Targets (2-core CPU)",
            "",
            targets_table(list(results.values()), args.busy),
        ]
    )
    text += _footer(started, budget)
    _emit(text, args.out)
    return 0
