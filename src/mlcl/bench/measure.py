"""Timing, background load and peak-memory measurement of bench rows.

Time is the median of ``calls`` calls after ``warmup`` calls. Extra peak memory is the growth of peak RSS
over one forward + backward, measured in a fresh subprocess per case with ``MALLOC_MMAP_THRESHOLD_=0``
(freed memory goes back to the OS at once) and the peak reset through ``/proc/self/clear_refs`` just
before the call; on CUDA it is ``max_memory_allocated`` above the memory allocated before the call. Each
row also reports the cores other processes used while it was timed (``/proc/stat``); rows disturbed by a
busy machine are timed again while the bench's time budget allows and keep their least disturbed attempt.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlcl.bench.budget import Budget
from mlcl.bench.cases import Case, Prepared, Setup, _find_case
from mlcl.bench.report import _fmt_mib, _fmt_ms
from mlcl.threads import cpu_snapshot

_CASE_MARK = "MLCL_BENCH_CASE "


# ------------------------------------------------------------------------------------------ measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _call(prep: Prepared) -> float:
    """One forward + backward; returns the loss value."""
    for p in prep.params:
        p.grad = None
    loss = prep.fn()
    if loss.requires_grad:
        loss.backward()
    return float(loss.detach())


def time_calls(prep: Prepared, calls: int, warmup: int, device: str) -> tuple[list[float], float]:
    """Milliseconds of ``calls`` timed forward + backward calls after ``warmup`` untimed ones, and the
    last loss value."""
    value = math.nan
    for _ in range(warmup):
        value = _call(prep)
    times = []
    for _ in range(calls):
        _sync(device)
        t0 = time.perf_counter()
        value = _call(prep)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, value


#: other processes using more than this many cores while a row is timed make it "busy" (retried)
BUSY_CORES = 0.2
#: rows whose timing took longer than this are not timed again (keeps busy runs to a few minutes)
_RETRY_MAX_S = 15.0
#: shortest window over which the background load is estimated (/proc/stat counts in 10 ms ticks)
_MIN_WINDOW_S = 0.3


def background_load(start: tuple[float, float, float] | None) -> float | None:
    """Average number of cores other processes (and the hypervisor: steal) used since ``start``.

    Windows shorter than ``_MIN_WINDOW_S`` are padded by sleeping, so that short rows still get an
    estimate of the load around them."""
    if start is None:
        return None
    elapsed = time.perf_counter() - start[0]
    if elapsed < _MIN_WINDOW_S:
        time.sleep(_MIN_WINDOW_S - elapsed)
    end = cpu_snapshot()
    if end is None:
        return None
    return max(0.0, (end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0])


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory(prep: Prepared, device: str) -> tuple[float | None, str]:
    """Extra peak memory (MiB) of one forward + backward, and how it was measured."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _call(prep)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda max_memory_allocated"
    _trim_heap()
    reset = _reset_peak_rss()
    base = _proc_status_kib("VmRSS") if reset else _proc_status_kib("VmHWM")
    if base is None:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _call(prep)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (after - before) / 1024, "ru_maxrss growth (lower bound)"
    _call(prep)
    peak = _proc_status_kib("VmHWM") or base
    return max(0, peak - base) / 1024, ("VmHWM − VmRSS" if reset else "VmHWM growth (lower bound)")


def run_case(key: str, s: Setup, warmup: int = 2) -> dict[str, Any]:
    """Subprocess entry: build one case, warm it up, measure its extra peak memory."""
    prep = _find_case(key, s).build(s)
    for _ in range(warmup):
        _call(prep)
    mib, how = measure_memory(prep, s.device)
    return {"key": key, "mib": mib, "how": how}


def memory_in_subprocess(
    key: str, s: Setup, threads: int, timeout: float = 900.0
) -> tuple[float | None, str]:
    """Run :func:`run_case` in a fresh interpreter (glibc returns freed memory at once there)."""
    payload = json.dumps({"key": key, "setup": dataclasses.asdict(s), "threads": threads})
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="0")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mlcl.bench", "--_case", payload],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return None, f"memory subprocess timed out after {timeout:.0f} s"
    for line in proc.stdout.splitlines():
        if line.startswith(_CASE_MARK):
            res = json.loads(line[len(_CASE_MARK) :])
            return res["mib"], res["how"]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"memory subprocess failed: {tail[:160]}"


# ------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    case: Case
    setup: Setup
    inputs: str = ""
    times: list[float] = field(default_factory=list)
    value: float = math.nan
    mib: float | None = None
    mem_note: str = ""
    error: str | None = None
    #: cores used by other processes while the kept attempt was timed (None: unknown)
    background: float | None = None
    attempts: int = 0

    @property
    def busy(self) -> bool:
        return self.background is not None and self.background > BUSY_CORES

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def iqr(self) -> tuple[float, float] | None:
        if len(self.times) < 4:
            return None
        q = statistics.quantiles(self.times, n=4)
        return q[0], q[2]


def _measure_row(
    case: Case,
    s: Setup,
    calls: int,
    warmup: int,
    memory: str,
    threads: int,
    retries: int = 0,
    budget: Budget | None = None,
) -> Row:
    """Time one case here (again, up to ``retries`` times, while other processes keep the CPU busy and
    ``budget`` has time for another attempt); measure its memory (subprocess on the CPU unless ``memory``
    says otherwise). Once ``budget`` is spent the row is not measured and says so."""
    row = Row(case, s)
    budget = budget or Budget(None)
    if budget.spent:
        row.error = f"skipped: {budget.text()} spent"
        print(f"[mlcl-bench] {case.label} B={s.batch}: {row.error}", file=sys.stderr, flush=True)
        return row
    cuda = s.device.startswith("cuda")
    try:
        prep = case.build(s)
        row.inputs = prep.inputs
        best: tuple[bool, float] | None = None
        for attempt in range(retries + 1):
            start = cpu_snapshot()
            times, value = time_calls(prep, calls, warmup if attempt == 0 else min(warmup, 1), s.device)
            took = time.perf_counter() - start[0] if start else 0.0
            load = background_load(start)
            busy = load is not None and load > BUSY_CORES
            rank = (busy, statistics.median(times))
            if best is None or rank < best:
                best = rank
                row.times, row.value, row.background = times, value, load
            row.attempts = attempt + 1
            if not busy:
                break
            again = attempt < retries and took <= _RETRY_MAX_S and budget.allows(2 * took)
            print(
                f"[mlcl-bench] {case.label} B={s.batch}: other processes used {load:.2f} cores, "
                + ("retrying" if again else "keeping the least disturbed attempt"),
                file=sys.stderr,
                flush=True,
            )
            if not again:
                break
        if memory == "inprocess" or (memory != "none" and cuda):
            row.mib, how = measure_memory(prep, s.device)
            row.mem_note = how if cuda else f"in-process ({how})"
        del prep
    except Exception as err:  # a broken plugin gets a row that says why, the others still run
        row.error = f"{type(err).__name__}: {err}".replace("\n", " ")[:200]
    gc.collect()
    if row.error is None and memory == "subprocess" and not cuda:
        row.mib, row.mem_note = memory_in_subprocess(case.key, s, threads)
        if row.mib is None:  # e.g. a plugin registered at run time only: measure here instead
            note = row.mem_note
            try:
                prep = case.build(s)
                _call(prep)
                row.mib, how = measure_memory(prep, s.device)
                row.mem_note = f"in-process ({how}; {note})"
                del prep
            except Exception as err:
                row.mem_note = f"{note}; in-process: {type(err).__name__}: {err}"
    shown = row.error or f"{_fmt_ms(row.median)} ms, {_fmt_mib(row.mib)} MiB"
    print(f"[mlcl-bench] {case.label} B={s.batch}: {shown}", file=sys.stderr, flush=True)
    return row
