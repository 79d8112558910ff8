"""Bench reporting: spec reference figures and targets, number formats, markdown tables, output."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mlcl.bench.budget import Budget
    from mlcl.bench.cases import Setup
    from mlcl.bench.measure import Row


@dataclass(frozen=True)
class Reference:
    """A spec's measurement of the reference implementation (2-core CPU, float32)."""

    ms: tuple[float, ...]  # the runs the spec lists; speed-ups use the fastest (conservative)
    memory: str | None  # as the spec words it
    source: str
    #: Setup fields that must match for the figure to apply
    when: dict[str, Any]

    @property
    def best_ms(self) -> float:
        return min(self.ms)

    def applies(self, s: Setup) -> bool:
        return all(getattr(s, k) == v for k, v in self.when.items())

    def text(self) -> str:
        runs = f"{_fmt_ms(min(self.ms))}–{_fmt_ms(max(self.ms))}" if len(self.ms) > 1 else _fmt_ms(self.ms[0])
        mem = f", {self.memory}" if self.memory else ""
        return f"{runs} ms{mem} ({self.source})"


@dataclass(frozen=True)
class Target:
    """Issue targets on the 2-core CPU: minimum speed-up over the reference, optional memory cap."""

    speedup: float
    max_mib: float | None = None

    def text(self) -> str:
        mem = f", ≤ {self.max_mib:.0f} MiB" if self.max_mib is not None else ""
        return f"≥ {self.speedup:g}×{mem}"


_TYPICAL = {"batch": 64, "classes": 80, "dtype": "float32"}
REFERENCES: dict[str, Reference] = {
    "kmcl/anisotropic": Reference(
        (3237, 3173, 3411), "+1.66 GB", "kmcl.md §10", {**_TYPICAL, "kmcl_aniso_dim": 128, "via": "spec"}
    ),
    "kmcl/isotropic": Reference(
        (235, 236, 255), None, "kmcl.md §10", {**_TYPICAL, "kmcl_iso_dim": 2048, "via": "spec"}
    ),
    "clml": Reference(
        (38.0,), None, "clml.md §13", {**_TYPICAL, "clml_dim": 2048, "epoch": 1, "via": "spec"}
    ),
    "mulcon": Reference(
        (27.0, 27.6), "+15.3 MiB", "mulcon.md §16", {**_TYPICAL, "mulcon_dim": 128, "via": "spec"}
    ),
    "plugin/asl": Reference((0.28, 0.32), None, "baselines.md §7", dict(_TYPICAL)),
    "supcon": Reference(
        (1.03, 1.11), None, "baselines.md §7", {**_TYPICAL, "supcon_dim": 128, "via": "spec"}
    ),
    "mulsupcon": Reference(
        (1.63, 1.65), None, "baselines.md §7", {**_TYPICAL, "mulsupcon_dim": 128, "queue": 256, "via": "spec"}
    ),
}
#: the specs' reference figures at other batch sizes (shown in the scaling table)
SCALING_REFERENCES: dict[str, tuple[Reference, ...]] = {
    "mulcon": (
        Reference(
            (110.0,), "+71 MiB", "mulcon.md §16", {**_TYPICAL, "batch": 256, "mulcon_dim": 128, "via": "spec"}
        ),
    ),
}
TARGETS: dict[str, Target] = {
    "kmcl/anisotropic": Target(5.0, 400.0),
    "kmcl/isotropic": Target(2.0),
    "clml": Target(2.0),
    "mulcon": Target(10.0),
    "plugin/asl": Target(1.0),
    "supcon": Target(1.0),
    "mulsupcon": Target(1.0),
}


def _fmt_ms(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _fmt_mib(x: float | None) -> str:
    return "—" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.1f}")


def _speedup(row: Row, scaling: bool = False) -> tuple[str, str, str, str]:
    """(reference, speed-up, target, met) cells of a main-table row; ``scaling``: of a scaling-table row,
    against the reference figure measured at that row's batch size (none: "—")."""
    ref = REFERENCES.get(row.case.key)
    tgt = TARGETS.get(row.case.key)
    if scaling:
        refs = [r for r in (ref, *SCALING_REFERENCES.get(row.case.key, ())) if r and r.applies(row.setup)]
        if not refs:
            return "—", "—", "—", "—"
        ref = refs[0]
    ref_cell = ref.text() if ref else "—"
    tgt_cell = tgt.text() if tgt else "—"
    if ref is None or row.median is None:
        return ref_cell, "—", tgt_cell, "—"
    if not ref.applies(row.setup):
        return ref_cell, "— (other shape)", tgt_cell, "—"
    speed = ref.best_ms / row.median
    speed_cell = f"{speed:.1f}×" if speed < 100 else f"{speed:.0f}×"
    if tgt is None:
        return ref_cell, speed_cell, tgt_cell, "—"
    if row.setup.device != "cpu":
        return ref_cell, speed_cell, tgt_cell, "— (CPU target)"
    ok = speed >= tgt.speedup
    parts = []
    if tgt.max_mib is not None:
        if row.mib is None:
            parts.append("memory not measured")
        elif row.mib > tgt.max_mib:
            ok = False
    if row.busy:
        parts.append("busy machine")
    met = "yes" if ok else "**no**"
    return ref_cell, speed_cell, tgt_cell, met + (f" ({', '.join(parts)})" if parts else "")


def _fmt_load(row: Row) -> str:
    """Background load cell: cores used by other processes, ``!`` when the row was disturbed."""
    if row.background is None:
        return "—"
    return f"{row.background:.2f}" + (" !" if row.busy else "")


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _problem(error: str) -> str:
    """The inputs cell of a row that was not measured: skipped for the time budget, or its error."""
    return _escape(error) if error.startswith("skipped:") else f"error: {_escape(error)}"


def main_table(rows: Sequence[Row]) -> str:
    lines = [
        "| loss | inputs | median (ms) | min (ms) | IQR (ms) | other load | extra peak (MiB) "
        "| reference (spec) | speed-up | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.case.label} | {_problem(r.error)} |" + " — |" * 9)
            continue
        iqr = f"{_fmt_ms(r.iqr[0])}–{_fmt_ms(r.iqr[1])}" if r.iqr else "—"
        mem = _fmt_mib(r.mib) + ("~" if r.mem_note.startswith("in-process") else "")
        finite = "" if math.isfinite(r.value) else " (non-finite loss!)"
        ref, speed, tgt, met = _speedup(r)
        lines.append(
            f"| {r.case.label} | {_escape(r.inputs)}{finite} | {_fmt_ms(r.median)} | {_fmt_ms(min(r.times))} "
            f"| {iqr} | {_fmt_load(r)} | {mem} | "
            f"{ref} | {speed} | {tgt} | {met} |"
        )
    return "\n".join(lines)


def scaling_table(rows: Sequence[Row]) -> str:
    lines = [
        "| loss | B | inputs | median (ms) | min (ms) | median vs first B | other load | extra peak (MiB) "
        "| reference (spec) | speed-up | target | met |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    first: dict[str, float] = {}
    for r in rows:
        if r.error:
            lines.append(f"| {r.case.label} | {r.setup.batch} | {_problem(r.error)} |" + " — |" * 9)
            continue
        base = first.setdefault(r.case.key, r.median)
        growth = f"{r.median / base:.1f}×" if base else "—"
        mem = _fmt_mib(r.mib) + ("~" if r.mem_note.startswith("in-process") else "")
        ref, speed, tgt, met = _speedup(r, scaling=True)
        lines.append(
            f"| {r.case.label} | {r.setup.batch} | {_escape(r.inputs)} | {_fmt_ms(r.median)} "
            f"| {_fmt_ms(min(r.times))} | {growth} | {_fmt_load(r)} | {mem} "
            f"| {ref} | {speed} | {tgt} | {met} |"
        )
    return "\n".join(lines)


def machine_info(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    parts = [
        f"CPU {cpu} ({usable} usable cores)",
        f"torch {torch.__version__}",
        f"threads {torch.get_num_threads()}",
        f"load average {load}",
    ]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(torch.device(device))}")
    text = "machine: " + ", ".join(parts)
    if hasattr(os, "getloadavg") and usable and os.getloadavg()[0] > usable:
        text += (
            f"\n\n**Warning: the machine is busy** (1-min load {os.getloadavg()[0]:.1f} on {usable} usable "
            "cores): timings may be inflated by other processes (see the 'other load' column)."
        )
    return text


def _footer(started: float, budget: Budget | None = None) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    limit = f" (budget {budget.total_s:.0f} s)" if budget is not None and budget.total_s else ""
    return f"\n\ntotal wall time {time.perf_counter() - started:.0f} s{limit}; load average at the end {load}"


def _notes(rows: Sequence[Row]) -> list[str]:
    notes = []
    for r in rows:
        if r.mem_note and not r.mem_note.startswith(("VmHWM − VmRSS", "cuda")):
            notes.append(f"- {r.case.label} (B={r.setup.batch}) memory: {r.mem_note}")
    return notes


def _new_path(path: Path) -> Path:
    """``path``, or ``stem-1.suffix``, ``stem-2.suffix``, ... if it exists (never overwrite)."""
    if not path.exists():
        return path
    i = 1
    while True:
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
        i += 1


def _emit(text: str, out: Path | None) -> None:
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        target = _new_path(out)
        target.write_text(text + "\n")
        print(f"wrote {target}", file=sys.stderr)
