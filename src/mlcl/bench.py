"""``mlcl-bench``: speed and memory of every registered loss plugin, and of real training steps.

    python -m mlcl.bench                      # one row per loss + a batch-size scaling table
    python -m mlcl.bench --losses kmcl,clml --device cuda --out bench.md
    python -m mlcl.bench train                # a few MLCLModule steps per loss (timm resnet18, 224²)

Loss rows time what the specs timed for the reference implementations: forward + backward of the loss on
head outputs of the spec's typical case (B = 64, C = 80, COCO-like targets with ~2.9 positives per row).
KMCL, CLML, MulCon, SupCon and MulSupCon call their pure loss function on inputs shaped like the spec's
(see ``SPEC_CASES``); every other registered plugin, including plugins added later, is built through its
class with default hyper-parameters and timed as ``plugin(outputs, targets, ctx)`` on the outputs of its
own head applied to random backbone features (head evaluated outside the timer). Time is the median of
``--calls`` calls after ``--warmup`` calls. Extra peak memory is the growth of peak RSS over one forward +
backward, measured in a fresh subprocess per case with ``MALLOC_MMAP_THRESHOLD_=0`` (freed memory goes
back to the OS at once) and the peak reset through ``/proc/self/clear_refs`` just before the call; on
CUDA it is ``max_memory_allocated`` above the memory allocated before the call. Each row also reports the
cores other processes used while it was timed (``/proc/stat``); rows disturbed by a busy machine are timed
again (``--retries``) and keep their least disturbed attempt.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcl import cli
from mlcl.losses.base import LossContext, get_loss_class, list_losses

__all__ = ["SPEC_CASES", "Case", "Setup", "coco_targets", "main", "run_case"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_CASE_MARK = "MLCL_BENCH_CASE "
#: losses of the scaling table (rows come from their spec cases, or their plugin with --via plugin)
SCALING_LOSSES = ("kmcl", "clml", "mulcon", "supcon", "mulsupcon")
#: views a plugin is fed when it has no ``num_views`` class attribute (the specs' two-crop setting)
_KNOWN_VIEWS = {"supcon": 2, "mulsupcon": 2}


# ----------------------------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Setup:
    """Everything that defines the inputs of a case (sent as JSON to the memory subprocess)."""

    batch: int = 64
    classes: int = 80
    positives: float = 2.9
    #: backbone width for plugin rows and for KMCL anisotropic's projection input
    feature_dim: int = 2048
    kmcl_aniso_dim: int = 128
    kmcl_iso_dim: int = 2048
    kmcl_chunk: int | None = None
    clml_dim: int = 2048
    mulcon_dim: int = 128
    supcon_dim: int = 128
    mulsupcon_dim: int = 128
    queue: int = 256
    epoch: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    #: "spec": spec-style rows for the losses in SPEC_CASES; "plugin": every row through its plugin
    via: str = "spec"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass
class Prepared:
    """A ready-to-time case: ``fn()`` returns the 0-dim loss; ``params`` get ``.grad = None`` per call."""

    fn: Callable[[], Tensor]
    params: list[Tensor]
    inputs: str


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
TARGETS: dict[str, Target] = {
    "kmcl/anisotropic": Target(5.0, 400.0),
    "kmcl/isotropic": Target(2.0),
    "clml": Target(2.0),
    "mulcon": Target(10.0),
    "plugin/asl": Target(1.0),
    "supcon": Target(1.0),
    "mulsupcon": Target(1.0),
}


def coco_targets(rows: int, classes: int, positives: float = 2.9, seed: int = 0) -> Tensor:
    """COCO-like multi-hot targets ``[rows, classes]`` (int64, {0, 1}): Bernoulli(positives / classes)
    per entry, then one random class switched on in rows that drew none."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(rows, classes, generator=g) < min(1.0, positives / classes)
    fallback = torch.randint(classes, (rows,), generator=g)
    empty = (~y.any(1)).nonzero().squeeze(1)
    y[empty, fallback[empty]] = True
    return y.long()


def _features(s: Setup, *shape: int, offset: int = 0) -> Tensor:
    """Post-ReLU-like backbone features |N(0, 1)| on the CPU in float32 (seeded per case)."""
    g = torch.Generator().manual_seed(s.seed + 1000 + offset)
    return torch.randn(*shape, generator=g).abs()


def _randn(s: Setup, *shape: int, offset: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(s.seed + 2000 + offset)
    return torch.randn(*shape, generator=g)


def _leaf(t: Tensor, s: Setup) -> Tensor:
    """A fresh leaf on the case's device and dtype that requires grad."""
    return t.detach().to(device=s.device, dtype=s.torch_dtype).clone().requires_grad_(True)


def _shape(t: Tensor) -> str:
    return "[" + ",".join(str(d) for d in t.shape) + "]"


# ------------------------------------------------------------------------------------------ spec cases
@dataclass(frozen=True)
class Case:
    """One benchmark row: ``key`` identifies it (also in the subprocess), ``build`` prepares it."""

    key: str
    loss: str
    label: str
    build: Callable[[Setup], Prepared]


def _kmcl(loss_case: str) -> Callable[[Setup], Prepared]:
    def build(s: Setup) -> Prepared:
        from mlcl.losses.kmcl import kmcl_loss

        cls = get_loss_class("kmcl")
        if loss_case == "anisotropic":
            in_features, head_kwargs = s.feature_dim, {"embed_dim": s.kmcl_aniso_dim, "loss_case": loss_case}
        else:  # the reference isotropic model reads the backbone features directly (no projection)
            in_features, head_kwargs = s.kmcl_iso_dim, {"embed_dim": None, "loss_case": loss_case}
        torch.manual_seed(s.seed)
        head = cls.build_head(in_features, s.classes, head_kwargs)
        with torch.no_grad():
            out = head(_features(s, s.batch, in_features))
        e, z, mu, var = (_leaf(out[k], s) for k in ("features", "logits", "mu", "var"))
        y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)
        pos = y == 1
        anchors = int((pos & (pos.sum(0, keepdim=True) >= 2)).sum())
        chunk = f", chunk {s.kmcl_chunk}" if s.kmcl_chunk else ""

        def fn() -> Tensor:
            return kmcl_loss(e, z, mu, var, y, loss_case=loss_case, chunk_size=s.kmcl_chunk)["loss"]

        return Prepared(
            fn, [e, z, mu, var], f"`kmcl_loss` mu, var {_shape(mu)}; {anchors} anchor entries{chunk}"
        )

    return build


def _clml(s: Setup) -> Prepared:
    from mlcl.losses.clml import clml_loss, correct_labels

    cls = get_loss_class("clml")
    torch.manual_seed(s.seed)
    head = cls.build_head(s.clml_dim, s.classes, None)
    with torch.no_grad():
        out = head(_features(s, s.batch, s.clml_dim))
    x = _leaf(out["features"], s)
    z = out["logits"].to(device=s.device, dtype=s.torch_dtype)  # read detached by the loss
    y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)
    corrected = int(((correct_labels(z, y, tau=0.75) == 1) & (y != 1)).sum()) if s.epoch >= 1 else 0
    state = f"correction on, {corrected} promoted" if s.epoch >= 1 else "correction off"

    def fn() -> Tensor:
        return clml_loss(x, z, y, epoch=s.epoch)["loss"]

    return Prepared(fn, [x], f"`clml_loss` features {_shape(x)}; {state}")


def _mulcon(s: Setup) -> Prepared:
    from mlcl.losses.mulcon import mulcon_loss

    feats = _leaf(_randn(s, s.batch, s.classes, s.mulcon_dim), s)
    logits = _leaf(_randn(s, s.batch, s.classes, offset=1), s)
    y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)

    def fn() -> Tensor:
        return mulcon_loss(feats, logits, y)["loss"]

    return Prepared(
        fn, [feats, logits], f"`mulcon_loss` z {_shape(feats)}; P = {int((y == 1).sum())} anchors"
    )


def _supcon(s: Setup) -> Prepared:
    from mlcl.losses.contrastive import supcon_loss

    feats = _leaf(F.normalize(_randn(s, s.batch, 2, s.supcon_dim), dim=-1), s)
    y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)

    def fn() -> Tensor:
        return supcon_loss(feats, y, positive_rule="exact")["loss"]

    return Prepared(fn, [feats], f"`supcon_loss` {_shape(feats)}, exact mask from {_shape(y)} multi-hot")


def _mulsupcon(s: Setup) -> Prepared:
    from mlcl.losses.contrastive import mulsupcon_loss

    q = _leaf(F.normalize(_randn(s, s.batch, s.mulsupcon_dim), dim=-1), s)
    # keys come from the momentum encoder and the queue: no gradient
    keys = F.normalize(_randn(s, s.batch + s.queue, s.mulsupcon_dim, offset=1), dim=-1)
    keys = keys.to(device=s.device, dtype=s.torch_dtype)
    y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)
    y_queue = coco_targets(s.queue, s.classes, s.positives, s.seed + 1).to(s.device)
    y_keys = torch.cat([y, y_queue])

    def fn() -> Tensor:
        return mulsupcon_loss(q, y, keys, y_keys)["loss"]

    rows = int((y == 1).sum())
    return Prepared(fn, [q], f"`mulsupcon_loss` q {_shape(q)}, {s.batch}+{s.queue} keys; {rows} anchor rows")


#: spec-style rows per registry name (the plugin path is used for every other loss)
SPEC_CASES: dict[str, Callable[[Setup], list[Case]]] = {
    "kmcl": lambda s: [
        Case("kmcl/anisotropic", "kmcl", f"kmcl (anisotropic D={s.kmcl_aniso_dim})", _kmcl("anisotropic")),
        Case("kmcl/isotropic", "kmcl", f"kmcl (isotropic D={s.kmcl_iso_dim})", _kmcl("isotropic")),
    ],
    "clml": lambda s: [Case("clml", "clml", f"clml (D={s.clml_dim})", _clml)],
    "mulcon": lambda s: [Case("mulcon", "mulcon", f"mulcon (d={s.mulcon_dim})", _mulcon)],
    "supcon": lambda s: [Case("supcon", "supcon", "supcon", _supcon)],
    "mulsupcon": lambda s: [Case("mulsupcon", "mulsupcon", f"mulsupcon (queue {s.queue})", _mulsupcon)],
}


# ---------------------------------------------------------------------------------------- plugin cases
class _StubModel(nn.Module):
    """What ``attach`` may look at: an identity ``backbone`` (inputs are already backbone features)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Identity()
        self.head = head

    def encode(self, x: Tensor) -> Tensor:
        from mlcl.models.backbones import pool

        return pool(self.backbone(x))


def plugin_views(name: str) -> int:
    """Views per sample a plugin is fed: its ``num_views`` class attribute, else the spec setting."""
    cls = get_loss_class(name)
    return int(getattr(cls, "num_views", 0) or _KNOWN_VIEWS.get(name, 1))


def _plugin(name: str) -> Callable[[Setup], Prepared]:
    def build(s: Setup) -> Prepared:
        cls = get_loss_class(name)
        views = plugin_views(name)
        rows = views * s.batch
        torch.manual_seed(s.seed)
        head = cls.build_head(s.feature_dim, s.classes, None)
        plugin = cls(num_classes=s.classes, feature_dim=head.out_features, num_samples=s.batch)
        shape = (rows, s.feature_dim, 7, 7) if cls.spatial else (rows, s.feature_dim)
        x = _features(s, *shape)
        with torch.no_grad():
            out = head(x)
        # the training module hands plugins float32 outputs (half precision is upcast first)
        dtype = torch.float64 if s.dtype == "float64" else torch.float32
        plugin.to(device=s.device, dtype=dtype).train()
        plugin.attach(_StubModel(head))
        y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)
        plugin.on_train_targets(y)
        outputs = {
            k: v.detach().to(device=s.device, dtype=dtype).clone().requires_grad_(v.is_floating_point())
            if torch.is_tensor(v)
            else v
            for k, v in out.items()
        }
        ctx = LossContext(
            indices=torch.arange(s.batch, device=s.device).repeat(views),
            epoch=s.epoch,
            step=0,
            num_views=views,
            training=True,
            inputs=x.to(device=s.device, dtype=dtype),
        )
        y_rows = y.repeat(views, 1)

        def fn() -> Tensor:
            return plugin(outputs, y_rows, ctx)["loss"]

        leaves = [v for v in outputs.values() if torch.is_tensor(v) and v.requires_grad]
        shown = ", ".join(f"{k} {_shape(v)}" for k, v in outputs.items() if torch.is_tensor(v))
        where = f"{views}×{s.batch} rows, " if views > 1 else ""
        desc = f"plugin on `{cls.head}` head of {_shape(x)}: {where}{shown}"
        return Prepared(fn, leaves + list(plugin.parameters()), desc)

    return build


def cases_for(losses: Sequence[str], s: Setup) -> list[Case]:
    """Rows for the given registry names, in order (spec cases, else the plugin path)."""
    cases: list[Case] = []
    for name in losses:
        if s.via == "spec" and name in SPEC_CASES:
            cases.extend(SPEC_CASES[name](s))
        else:
            cases.append(Case(f"plugin/{name}", name, name, _plugin(name)))
    return cases


def _find_case(key: str, s: Setup) -> Case:
    if key.startswith("plugin/"):
        name = key.split("/", 1)[1]
        get_loss_class(name)  # a clear KeyError for unknown names
        return Case(key, name, name, _plugin(name))
    for case in SPEC_CASES.get(key.split("/")[0], lambda _: [])(s):
        if case.key == key:
            return case
    raise KeyError(f"unknown bench case {key!r}")


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


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall clock, busy CPU seconds of the whole machine, CPU seconds of this process and children)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def background_load(start: tuple[float, float, float] | None) -> float | None:
    """Average number of cores other processes (and the hypervisor: steal) used since ``start``.

    Windows shorter than ``_MIN_WINDOW_S`` are padded by sleeping, so that short rows still get an
    estimate of the load around them."""
    if start is None:
        return None
    elapsed = time.perf_counter() - start[0]
    if elapsed < _MIN_WINDOW_S:
        time.sleep(_MIN_WINDOW_S - elapsed)
    end = _cpu_snapshot()
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
    src = str(Path(__file__).resolve().parents[1])
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


def _measure_row(
    case: Case, s: Setup, calls: int, warmup: int, memory: str, threads: int, retries: int = 0
) -> Row:
    """Time one case here (again, up to ``retries`` times, while other processes keep the CPU busy);
    measure its memory (subprocess on the CPU unless ``memory`` says otherwise)."""
    row = Row(case, s)
    cuda = s.device.startswith("cuda")
    try:
        prep = case.build(s)
        row.inputs = prep.inputs
        best: tuple[bool, float] | None = None
        for attempt in range(retries + 1):
            start = _cpu_snapshot()
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
            again = attempt < retries and took <= _RETRY_MAX_S
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


def _speedup(row: Row) -> tuple[str, str, str, str]:
    """(reference, speed-up, target, met) cells of a main-table row."""
    ref = REFERENCES.get(row.case.key)
    tgt = TARGETS.get(row.case.key)
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


def main_table(rows: Sequence[Row]) -> str:
    lines = [
        "| loss | inputs | median (ms) | min (ms) | IQR (ms) | other load | extra peak (MiB) "
        "| reference (spec) | speed-up | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.case.label} | error: {_escape(r.error)} |" + " — |" * 9)
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
        "| loss | B | inputs | median (ms) | min (ms) | median vs first B | other load | extra peak (MiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    first: dict[str, float] = {}
    for r in rows:
        if r.error:
            lines.append(f"| {r.case.label} | {r.setup.batch} | error: {_escape(r.error)} |" + " — |" * 5)
            continue
        base = first.setdefault(r.case.key, r.median)
        growth = f"{r.median / base:.1f}×" if base else "—"
        mem = _fmt_mib(r.mib) + ("~" if r.mem_note.startswith("in-process") else "")
        lines.append(
            f"| {r.case.label} | {r.setup.batch} | {_escape(r.inputs)} | {_fmt_ms(r.median)} "
            f"| {_fmt_ms(min(r.times))} | {growth} | {_fmt_load(r)} | {mem} |"
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


def _footer(started: float) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"\n\ntotal wall time {time.perf_counter() - started:.0f} s; load average at the end {load}"


def _notes(rows: Sequence[Row]) -> list[str]:
    notes = []
    for r in rows:
        if r.mem_note and not r.mem_note.startswith(("VmHWM − VmRSS", "cuda")):
            notes.append(f"- {r.case.label} (B={r.setup.batch}) memory: {r.mem_note}")
    return notes


# ----------------------------------------------------------------------------------------------- CLI
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes >= 2, got {text!r}")
    return values


def _loss_list(parser: argparse.ArgumentParser, text: str | None) -> list[str]:
    valid = list_losses()
    if text is None or text.strip() in ("", "all"):
        return valid
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        parser.error(f"unknown loss(es) {', '.join(unknown)}; registered losses: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--losses", default=None, help="comma-separated registry names (default: all)")
    parser.add_argument("--num-classes", type=_positive_int, default=80, help="C (default 80)")
    parser.add_argument(
        "--positives", type=float, default=2.9, help="mean positives per target row (default 2.9, COCO)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")


def _loss_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlcl-bench",
        description="Forward+backward time and extra peak memory of every registered loss "
        "(subcommand `train`: real training steps per loss; see `mlcl-bench train -h`).",
    )
    _common(p)
    p.add_argument("--batch-size", type=_positive_int, default=64, help="B (default 64)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32", help="input dtype (default float32)")
    p.add_argument("--calls", type=_positive_int, default=20, help="timed calls per row (default 20)")
    p.add_argument("--warmup", type=_nonneg_int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--feature-dim", type=_positive_int, default=2048, help="backbone width F (default 2048)")
    p.add_argument("--kmcl-aniso-dim", type=_positive_int, default=128, help="KMCL anisotropic D (128)")
    p.add_argument("--kmcl-iso-dim", type=_positive_int, default=2048, help="KMCL isotropic D (2048)")
    p.add_argument("--kmcl-chunk", type=_positive_int, default=None, help="KMCL anchor entries per chunk")
    p.add_argument("--clml-dim", type=_positive_int, default=2048, help="CLML feature width (2048)")
    p.add_argument("--mulcon-dim", type=_positive_int, default=128, help="MulCon projector width d (128)")
    p.add_argument("--supcon-dim", type=_positive_int, default=128, help="SupCon feature width (128)")
    p.add_argument("--mulsupcon-dim", type=_positive_int, default=128, help="MulSupCon feature width (128)")
    p.add_argument("--queue", type=_nonneg_int, default=256, help="MulSupCon queued keys (256)")
    p.add_argument(
        "--epoch", type=_nonneg_int, default=1, help="ctx.epoch (default 1: epoch-gated corrections are on)"
    )
    p.add_argument(
        "--via",
        choices=("spec", "plugin"),
        default="spec",
        help="spec: time KMCL/CLML/MulCon/SupCon/MulSupCon as the specs did (pure loss functions); "
        "plugin: time every row through its plugin (default spec)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument(
        "--memory",
        choices=("subprocess", "inprocess", "none"),
        default="subprocess",
        help="CPU memory: fresh subprocess per case (default), in this process (approximate), or none",
    )
    p.add_argument(
        "--retries",
        type=_nonneg_int,
        default=2,
        help=f"time a row again up to N times while other processes use > {BUSY_CORES} cores (default 2)",
    )
    p.add_argument("--no-scaling", action="store_true", help="skip the batch-size scaling table")
    p.add_argument(
        "--scaling-batches",
        type=_int_list,
        default=[64, 256, 1024],
        help="B of the scaling table (64,256,1024)",
    )
    p.add_argument("--scaling-calls", type=_positive_int, default=5, help="timed calls per scaling row (5)")
    p.add_argument("--scaling-warmup", type=_nonneg_int, default=1, help="warm-up calls per scaling row (1)")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    return p


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


def _bench_losses(argv: Sequence[str]) -> int:
    parser = _loss_parser()
    args = parser.parse_args(argv)
    if args._case is not None:
        spec = json.loads(args._case)
        torch.set_num_threads(int(spec["threads"]))
        res = run_case(spec["key"], Setup(**spec["setup"]))
        print(_CASE_MARK + json.dumps(res), flush=True)
        return 0
    _check_device(parser, args.device)
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (contrastive terms need two samples)")
    if not 0 < args.positives <= args.num_classes:
        parser.error(f"--positives must be in (0, num_classes={args.num_classes}], got {args.positives}")
    losses = _loss_list(parser, args.losses)
    memory = "none" if args.no_memory else args.memory
    torch.set_num_threads(args.threads)
    setup = Setup(
        batch=args.batch_size,
        classes=args.num_classes,
        positives=args.positives,
        feature_dim=args.feature_dim,
        kmcl_aniso_dim=args.kmcl_aniso_dim,
        kmcl_iso_dim=args.kmcl_iso_dim,
        kmcl_chunk=args.kmcl_chunk,
        clml_dim=args.clml_dim,
        mulcon_dim=args.mulcon_dim,
        supcon_dim=args.supcon_dim,
        mulsupcon_dim=args.mulsupcon_dim,
        queue=args.queue,
        epoch=args.epoch,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        via=args.via,
    )
    started = time.perf_counter()
    y = coco_targets(setup.batch, setup.classes, setup.positives, setup.seed)
    mem_how = {
        "subprocess": "growth of peak RSS over one fwd+bwd, fresh subprocess per case "
        "(MALLOC_MMAP_THRESHOLD_=0, peak reset via /proc/self/clear_refs), after 2 warm-up calls",
        "inprocess": "growth of peak RSS over one fwd+bwd in this process (approximate)",
        "none": "not measured",
    }[memory]
    if setup.device.startswith("cuda") and memory != "none":
        mem_how = "torch.cuda.max_memory_allocated above the allocation before one fwd+bwd"
    head = [
        "## mlcl-bench: loss forward + backward",
        "",
        machine_info(setup.device),
        "",
        f"setup: B={setup.batch}, C={setup.classes}, device {setup.device}, dtype {setup.dtype}, "
        f"COCO-like targets (Bernoulli p={setup.positives:g}/{setup.classes}, ≥ 1 positive per row; "
        f"{float(y.sum()) / setup.batch:.2f} positives/row drawn), seed {setup.seed}, "
        f"ctx.epoch {setup.epoch}; "
        f"time = median of {args.calls} calls after {args.warmup} warm-up calls"
        + (" (fewer than the 20 the specs used)" if args.calls < 20 else "")
        + f"; extra peak memory = {mem_how}.",
        "",
        "Rows marked `plugin` are timed as `plugin(outputs, targets, ctx)` on the outputs of the plugin's "
        f"own head applied to |N(0,1)| backbone features of width F={setup.feature_dim} (head outside the "
        "timer, plugin parameters included in the backward). Speed-ups are against the fastest reference "
        "run the spec lists and are only computed where the row matches the spec's setting. 'other load' = "
        "cores used by other processes (incl. hypervisor steal) while the row was timed, from /proc/stat; "
        f"rows above {BUSY_CORES} were timed again up to {args.retries} times (if an attempt took at most "
        f"{_RETRY_MAX_S:g} s) and keep the least disturbed attempt, `!` marks rows that stayed disturbed. "
        "Targets are for the 2-core CPU"
        + ("" if args.threads == 2 else f" (this run: threads={args.threads})")
        + ".",
        "",
    ]
    rows = [
        _measure_row(c, setup, args.calls, args.warmup, memory, args.threads, args.retries)
        for c in cases_for(losses, setup)
    ]
    text = "\n".join(head) + "\n" + main_table(rows)
    notes = _notes(rows)
    scaled: list[Row] = []
    scaling_names = [n for n in SCALING_LOSSES if n in losses]
    if not args.no_scaling and scaling_names:
        done = {r.case.key: r for r in rows if r.error is None}
        for case in cases_for(scaling_names, setup):
            for b in args.scaling_batches:
                if b == setup.batch and case.key in done:  # measured above, with more calls
                    scaled.append(done[case.key])
                    continue
                s_b = dataclasses.replace(setup, batch=b)
                (case_b,) = [c for c in cases_for([case.loss], s_b) if c.key == case.key]
                scaled.append(
                    _measure_row(
                        case_b,
                        s_b,
                        args.scaling_calls,
                        args.scaling_warmup,
                        memory,
                        args.threads,
                        args.retries,
                    )
                )
        text += (
            "\n\n### Scaling with the (gathered) batch size\n\n"
            f"Same inputs at B ∈ {{{', '.join(map(str, args.scaling_batches))}}}; median of "
            f"{args.scaling_calls} calls after {args.scaling_warmup} warm-up (rows at B={setup.batch} are "
            "those of the table above). MulCon contrasts only the "
            "P ≈ 2.9·B positive entries (never a (B·C)² matrix); KMCL evaluates Bhattacharyya terms for "
            "anchor entries only, in chunks of ~4M-element temporaries (`--kmcl-chunk` bounds them further)."
            "\n\n" + scaling_table(scaled)
        )
        notes += _notes(scaled)
    if notes:
        text += "\n\nNotes (`~` = measured in this process, approximate):\n" + "\n".join(dict.fromkeys(notes))
    text += _footer(started)
    _emit(text, args.out)
    return 0


# ---------------------------------------------------------------------------------------------- train
def _kv_json(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, payload = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{name}: invalid JSON {payload!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{name}: expected a JSON object, got {payload!r}")
    return name.strip(), value


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlcl-bench train",
        description="A few training steps of the real MLCLModule per loss (random images and COCO-like "
        "targets): steps/s and the loss's share of the step against BCE.",
    )
    _common(p)
    p.add_argument("--batch-size", type=_positive_int, default=None, help="B per view (cpu 8, cuda 64)")
    p.add_argument("--steps", type=_positive_int, default=None, help="timed steps (cpu 10, cuda 30)")
    p.add_argument("--warmup", type=_nonneg_int, default=None, help="untimed steps first (cpu 2, cuda 5)")
    p.add_argument("--backbone", default="resnet18", help="timm model name (default resnet18, random init)")
    p.add_argument("--image-size", type=_positive_int, default=224)
    p.add_argument("--precision", default=None, help="Lightning precision (cpu 32-true, cuda bf16-mixed)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument(
        "--retries",
        type=_nonneg_int,
        default=1,
        help=f"repeat a loss's run while other processes use > {BUSY_CORES} cores (default 1)",
    )
    p.add_argument(
        "--head-kwargs",
        type=_kv_json,
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="head keyword arguments for one loss, e.g. mulcon='{\"embed_dim\": 256}' (repeatable)",
    )
    p.add_argument(
        "--loss-kwargs",
        type=_kv_json,
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="hyper-parameters for one loss, e.g. kmcl='{\"chunk_size\": 64}' (repeatable)",
    )
    return p


@dataclass
class TrainRow:
    loss: str
    views: int
    head: str = ""
    steps: list[float] = field(default_factory=list)
    loss_fwd: list[float] = field(default_factory=list)
    skipped: int = 0
    error: str | None = None
    baseline: bool = False
    #: cores used by other processes during the fit (None: unknown)
    background: float | None = None

    @property
    def busy(self) -> bool:
        return self.background is not None and self.background > BUSY_CORES

    @property
    def step_ms(self) -> float | None:
        return statistics.median(self.steps) if self.steps else None


def _head_text(head: nn.Module) -> str:
    extra = head.extra_repr()
    return f"{type(head).__name__}" + (f"({extra})" if extra else "")


class _RandomImages(torch.utils.data.Dataset):
    """``{"input", "target", "index"}`` items: a small pool of random images, COCO-like targets."""

    def __init__(self, targets: Tensor, views: int, size: int, pool: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        shape = (pool, views, 3, size, size) if views > 1 else (pool, 3, size, size)
        self.images = torch.randn(*shape, generator=g)
        self.targets = targets

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input": self.images[i % self.images.shape[0]], "target": self.targets[i], "index": i}


def _train_one(name: str, views: int, args: argparse.Namespace, extra: dict[str, dict]) -> TrainRow:
    import lightning as L

    from mlcl.models.module import MLCLModule

    row = TrainRow(name, views)
    cls = get_loss_class(name)
    loss_cfg: dict[str, Any] = {
        "_target_": f"{cls.__module__}.{cls.__qualname__}",
        **extra["loss"].get(name, {}),
    }
    if name in extra["head"]:
        loss_cfg["head_kwargs"] = extra["head"][name]
    total = args.warmup + args.steps
    n = args.batch_size * total
    targets = coco_targets(n, args.num_classes, args.positives, args.seed)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    try:
        torch.manual_seed(args.seed)
        module = MLCLModule(
            backbone={"name": args.backbone, "pretrained": None},
            loss=loss_cfg,
            optimizer={"_target_": "torch.optim.AdamW", "lr": args.lr},
            scheduler={"name": "none"},
            num_classes=args.num_classes,
            num_samples=n,
            num_views=views,
            on_nonfinite="skip",
        )
        module.loss_fn.on_train_targets(targets)
        row.head = _head_text(module.head)
        fwd: list[float] = []
        starts: list[float] = []

        def before_loss(*_: Any) -> None:
            sync()
            starts.append(time.perf_counter())

        def after_loss(*_: Any) -> None:
            sync()
            fwd.append((time.perf_counter() - starts[-1]) * 1e3)

        module.loss_fn.register_forward_pre_hook(before_loss)
        module.loss_fn.register_forward_hook(after_loss)

        class StepTimer(L.Callback):
            def on_train_batch_start(self, *_: Any) -> None:
                sync()
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, *_: Any) -> None:
                sync()
                row.steps.append((time.perf_counter() - self.t0) * 1e3)

        data = _RandomImages(targets, views, args.image_size, pool=2 * args.batch_size, seed=args.seed)
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False, drop_last=True)
        trainer = L.Trainer(
            accelerator="gpu" if device.startswith("cuda") else "cpu",
            devices=[int(device.split(":")[1])] if device.startswith("cuda:") else 1,
            precision=args.precision,
            max_steps=total,
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[StepTimer()],
        )
        start = _cpu_snapshot()
        trainer.fit(module, train_dataloaders=loader)
        row.background = background_load(start)
        row.skipped = int(module.skipped_steps)
    except Exception as err:
        row.error = f"{type(err).__name__}: {err}".replace("\n", " ")[:200]
        return row
    row.steps = row.steps[args.warmup :]
    row.loss_fwd = fwd[args.warmup :]
    return row


def train_table(rows: Sequence[TrainRow]) -> str:
    lines = [
        "| loss | views | head | median step (ms) | steps/s | loss forward (ms) | Δ step vs BCE (ms) "
        "| loss share of step | other load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    bce = {r.views: r.step_ms for r in rows if r.loss == "bce" and r.step_ms}
    for r in rows:
        label = r.loss + (" (baseline)" if r.baseline else "")
        if r.error or not r.step_ms:
            lines.append(
                f"| {label} | {r.views} | {_escape(r.head)} | error: {_escape(r.error or 'no steps')} "
                "| — | — | — | — | — |"
            )
            continue
        fwd = _fmt_ms(statistics.median(r.loss_fwd)) if r.loss_fwd else "—"
        base = bce.get(r.views)
        if base is None or r.loss == "bce":
            delta, share = ("0", "0 %") if r.loss == "bce" else ("—", "—")
        else:
            d = r.step_ms - base
            delta, share = f"{d:+.0f}", f"{100 * d / r.step_ms:+.0f} %"
        skipped = f" ({r.skipped} non-finite steps skipped)" if r.skipped else ""
        lines.append(
            f"| {label}{skipped} | {r.views} | {_escape(r.head)} | {_fmt_ms(r.step_ms)} | "
            f"{1e3 / r.step_ms:.2f} | {fwd} | {delta} | {share} | "
            + (
                "—"
                if r.background is None
                else f"{r.background:.2f}" + (" !" if r.background > BUSY_CORES else "")
            )
            + " |"
        )
    return "\n".join(lines)


def _bench_train(argv: Sequence[str]) -> int:
    parser = _train_parser()
    args = parser.parse_args(argv)
    _check_device(parser, args.device)
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (64 if cuda else 8)
    args.steps = args.steps or (30 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (contrastive terms need two samples)")
    if not 0 < args.positives <= args.num_classes:
        parser.error(f"--positives must be in (0, num_classes={args.num_classes}], got {args.positives}")
    losses = _loss_list(parser, args.losses)
    extra = {"head": dict(args.head_kwargs), "loss": dict(args.loss_kwargs)}
    for kind, given in extra.items():
        bad = [n for n in given if n not in list_losses()]
        if bad:
            parser.error(f"--{kind}-kwargs for unknown loss(es) {', '.join(bad)}")
    try:
        import timm

        if not timm.is_model(args.backbone):
            parser.error(f"--backbone {args.backbone!r} is not a timm model name")
    except ImportError:
        parser.error("mlcl-bench train needs timm")
    torch.set_num_threads(args.threads)
    import lightning  # noqa: F401  (it sets its loggers to INFO on import; quieten them afterwards)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    started = time.perf_counter()
    info = machine_info(args.device)
    # BCE at every view count in use comes first: the baseline of the "share" columns
    views = {name: plugin_views(name) for name in losses}
    order = [("bce", v, views.get("bce") != v) for v in sorted(set(views.values()))]
    order += [(n, views[n], False) for n in losses if n != "bce"]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the first fit of a process pays one-time costs (fresh memory pages, kernel caches) that
        # would otherwise be charged to the BCE baseline
        _train_one("bce", 1, argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1}), extra)
        for name, v, baseline in order:
            row = None
            for _ in range(args.retries + 1):
                cand = _train_one(name, v, args, extra)
                busy = cand.background is not None and cand.background > BUSY_CORES
                if row is None or (busy, cand.step_ms or math.inf) < (row.busy, row.step_ms or math.inf):
                    row = cand
                print(
                    f"[mlcl-bench train] {name} (views {v}): {_fmt_ms(cand.step_ms or math.nan)} ms/step"
                    + (f" ({cand.error})" if cand.error else "")
                    + (f", other processes used {cand.background:.2f} cores" if busy else ""),
                    file=sys.stderr,
                    flush=True,
                )
                if not busy or cand.error:
                    break
            row.baseline = baseline
            rows.append(row)
    head = [
        "## mlcl-bench train: MLCLModule steps per loss",
        "",
        info,
        "",
        f"setup: backbone {args.backbone} (random init), {args.image_size}² random images, "
        f"B={args.batch_size} per view, C={args.num_classes}, "
        f"COCO-like targets (p={args.positives:g}/{args.num_classes}), "
        f"AdamW lr {args.lr:g}, precision {args.precision}, device {args.device}; median of {args.steps} "
        f"steps after {args.warmup} warm-up steps (forward, loss, backward and optimiser step; data loading "
        "excluded). Two-view losses get 2·B rows and are compared with BCE on the same 2·B rows. "
        "'loss forward' is the plugin call alone; 'Δ step vs BCE' is the whole extra cost of the loss "
        "(head, projector, key encoder, backward included); the share is Δ / step. Logit-only losses, whose "
        "forward takes well under 1 ms, show the run-to-run noise of a step. "
        "'other load' = cores used by other processes "
        f"during the run; runs above {BUSY_CORES} were repeated up to {args.retries} times and keep the "
        "least disturbed one (`!`: still disturbed).",
        "",
    ]
    custom = [f"{n}: head_kwargs {json.dumps(k)}" for n, k in extra["head"].items()]
    custom += [f"{n}: loss kwargs {json.dumps(k)}" for n, k in extra["loss"].items()]
    text = "\n".join(head) + "\n" + train_table(rows)
    if custom:
        text += "\n\nNon-default settings: " + "; ".join(custom)
    text += _footer(started)
    _emit(text, args.out)
    return 0


@cli.guard
def main(argv: Sequence[str] | None = None) -> int:
    """``mlcl-bench [options]`` (loss table) or ``mlcl-bench train [options]`` (training steps)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _bench_train(argv[1:])
    if argv and argv[0] == "losses":
        argv = argv[1:]
    return _bench_losses(argv)


if __name__ == "__main__":
    raise SystemExit(main())
