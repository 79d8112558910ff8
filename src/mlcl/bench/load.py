"""Artificial background load: busy processes that the bench starts and stops itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import TracebackType

#: a child that keeps one core busy until it is stopped (pure Python: no threads of its own)
_SPIN = "while True:\n    pass\n"


class BusyProcesses:
    """``with BusyProcesses(2): ...`` keeps ``n`` cores busy while the block runs; the processes are
    stopped (by their own ids) on exit, also when the block raises."""

    def __init__(self, n: int = 2) -> None:
        self.n = int(n)
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> BusyProcesses:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for _ in range(self.n):
            self.procs.append(
                subprocess.Popen([sys.executable, "-c", _SPIN], env=env, stdin=subprocess.DEVNULL)
            )
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
