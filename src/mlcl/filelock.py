"""An exclusive lock between processes on one machine or a shared filesystem (``fcntl.flock``)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if missing; its directory must exist).

    The lock is released on exit, and by the operating system when the holder dies (a killed job
    never leaves a stale lock behind).
    """
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
