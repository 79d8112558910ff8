"""Thread policy: how many intra-op threads torch (and OpenMP/MKL in child processes) may use.

``trainer.threads: auto | N`` (default ``auto``). ``auto`` gives each process its share of the cores that
are free for this run: the cores this process may run on (CPU affinity, capped by a cgroup CPU quota),
minus the cores other processes keep busy right now (sampled from ``/proc/stat`` over a fraction of a
second), rounded, then divided by the processes of this run on this node (DDP ranks per node, each with
its DataLoader workers), with a floor of 1. Oversubscription is what this avoids: an OpenMP thread that
waits for a core stalls every other thread at the next barrier, so small models ran 10-40x slower with
torch's default of one thread per core on a shared 2-core machine.

DDP ranks (``LOCAL_RANK`` > 0) take the decision of rank 0 from ``MLCL_THREADS`` so that all ranks agree.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlcl.errors import UserError

log = logging.getLogger(__name__)

#: the decision of the launching process, inherited by DDP ranks and other child processes
ENV_KEY = "MLCL_THREADS"
_CGROUP = Path("/sys/fs/cgroup")


# ------------------------------------------------------------------------------------ core counting
def parse_cpu_max(text: str) -> float | None:
    """Cores allowed by a cgroup v2 ``cpu.max`` line (``"200000 100000"`` -> 2.0; ``"max ..."`` -> None)."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = float(parts[1]) if len(parts) > 1 else 100000.0
    return float(parts[0]) / period if period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """Cores allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: no limit)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota(root: Path = _CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in cores, or None when there is none (or none readable)."""
    try:
        return parse_cpu_max((root / "cpu.max").read_text())
    except (OSError, ValueError, IndexError):
        pass
    for sub in ("cpu", "cpu,cpuacct"):
        try:
            folder = root / sub
            return parse_cfs(
                (folder / "cpu.cfs_quota_us").read_text(), (folder / "cpu.cfs_period_us").read_text()
            )
        except (OSError, ValueError):
            continue
    return None


def cores_available(affinity: int | None = None, quota: float | None = None) -> float:
    """Cores this process may use: its CPU affinity, capped by a cgroup quota (both read when not given)."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            affinity = os.cpu_count() or 1
    if quota is None:
        quota = cgroup_quota()
    return float(min(affinity, quota)) if quota else float(affinity)


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall clock, busy CPU seconds of the machine, CPU seconds of this process and its children)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def other_busy_cores(window_s: float = 0.2) -> float:
    """Cores other processes used over the next ``window_s`` seconds (0 where /proc/stat is missing)."""
    start = cpu_snapshot()
    if start is None:
        return 0.0
    time.sleep(window_s)
    end = cpu_snapshot()
    if end is None:
        return 0.0
    return max(0.0, (end[1] - start[1]) - (end[2] - start[2])) / max(end[0] - start[0], 1e-9)


# ------------------------------------------------------------------------------------ the arithmetic
def processes_per_node(ranks: int, workers: int) -> int:
    """Processes of one run on one node: every DDP rank plus its DataLoader workers."""
    return max(1, ranks) * (1 + max(0, workers))


def auto_threads(cores: float, ranks: int = 1, workers: int = 0, busy: float = 0.0) -> int:
    """Intra-op threads per process: free cores (``cores - busy``, rounded) // processes, at least 1."""
    free = max(0, round(cores - busy))
    return max(1, free // processes_per_node(ranks, workers))


def ranks_per_node(trainer: Mapping[str, Any], env: Mapping[str, str] | None = None) -> int:
    """DDP processes this run starts on each node, read off the trainer config (``devices``,
    ``strategy``, ``accelerator``); ``LOCAL_WORLD_SIZE`` from a launcher (torchrun, SLURM) wins."""
    env = os.environ if env is None else env
    if env.get("LOCAL_WORLD_SIZE", "").isdigit():
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    devices = trainer.get("devices", 1)
    if not isinstance(devices, (str, int)) and hasattr(devices, "__len__"):  # a list of device ids
        return max(1, len(devices))
    text = str(devices).strip()
    if text.lstrip("-").isdigit():
        n = int(text)
        if n > 0:
            return n
    if "," in text:  # "0,1"
        return len([d for d in text.split(",") if d.strip()])
    if str(trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto"):  # devices auto / -1
        try:
            import torch

            return max(1, torch.cuda.device_count())
        except Exception:
            return 1
    return 1


def parse_setting(value: Any) -> int | None:
    """``trainer.threads`` as a count, or None for ``auto`` (raises UserError on anything else)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or (isinstance(value, float) and not value.is_integer()):
        raise UserError(
            f"trainer.threads must be 'auto' or a positive integer, got {value!r}",
            "trainer.threads",
            "use trainer.threads=auto (one share of the free cores per process) or e.g. trainer.threads=1",
        )
    return n


# ------------------------------------------------------------------------------------ applying it
# OMP_NUM_THREADS as the user set it when this process started (apply_threads overwrites it later)
USER_OMP = os.environ.get("OMP_NUM_THREADS", "")


def apply_threads(n: int) -> None:
    """Set torch's intra-op (and, where still possible, inter-op) threads and OMP/MKL for children."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only allowed once, before any inter-op work; the intra-op count is what matters
        pass
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", ENV_KEY):
        os.environ[key] = str(n)


def decide(trainer: Mapping[str, Any], workers: int, setting: Any = "auto") -> tuple[int, str]:
    """Threads for this process and a one-line reason (samples the machine's load for ``auto``)."""
    fixed = parse_setting(setting)
    if fixed is not None:
        return fixed, f"threads {fixed} (trainer.threads={fixed})"
    inherited = os.environ.get(ENV_KEY, "")
    if os.environ.get("LOCAL_RANK", "0") not in ("", "0") and inherited.isdigit() and int(inherited) > 0:
        return int(inherited), f"threads {inherited} (auto, decided by rank 0)"
    user = USER_OMP.strip()
    if user.isdigit() and int(user) > 0:  # the user's own choice, made before mlcl started
        return int(user), f"threads {user} (auto: OMP_NUM_THREADS={user} set in the environment)"
    cores = cores_available()
    ranks = ranks_per_node(trainer)
    # deterministic runs must not depend on the machine's load: the thread count changes reductions,
    # and a resumed run has to reproduce the interrupted one bit for bit
    busy = 0.0 if trainer.get("deterministic") else other_busy_cores()
    n = auto_threads(cores, ranks, workers, busy)
    why = (
        f"threads {n} (auto: {cores:g} cores available, {busy:.2f} busy with other processes, "
        f"{processes_per_node(ranks, workers)} processes on this node = {ranks} rank(s) x (1 + {workers} "
        "DataLoader workers))"
    )
    return n, why


def apply_thread_policy(cfg: Any) -> int:
    """Remove ``trainer.threads`` from a run config (Lightning's Trainer does not know it), decide the
    thread count and apply it before any work; logs the decision. Returns the thread count."""
    from omegaconf import open_dict

    with open_dict(cfg):
        setting = cfg.trainer.pop("threads", "auto")
    workers = int((cfg.get("data") or {}).get("num_workers", 0) or 0)
    n, why = decide(cfg.trainer, workers, setting)
    apply_threads(n)
    log.info(why)
    return n
