"""The bench's total wall-time budget: decides whether a disturbed row may be timed again and whether a
row still fits, so that a busy machine makes the tables noisier (and marked) instead of endless."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class Budget:
    """``total_s`` seconds of wall time from construction (``None``: unlimited).

    ``clock`` returns seconds (monotonic); tests pass a fake one.
    """

    def __init__(self, total_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        if total_s is not None and total_s <= 0:
            raise ValueError(f"a time budget must be positive, got {total_s}")
        self.total_s = total_s
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return self._clock() - self._start

    def left(self) -> float:
        """Seconds left (``inf`` when unlimited, negative once overrun)."""
        return math.inf if self.total_s is None else self.total_s - self.elapsed()

    def allows(self, cost_s: float) -> bool:
        """Whether something expected to take ``cost_s`` seconds still fits."""
        return self.left() >= cost_s

    @property
    def spent(self) -> bool:
        return self.left() <= 0

    def share(self, parts: int) -> float:
        """An equal share of what is left for each of ``parts`` remaining items (``inf`` if unlimited)."""
        return self.left() / max(1, parts)

    def text(self) -> str:
        if self.total_s is None:
            return f"no time budget ({self.elapsed():.0f} s used)"
        return f"time budget {self.total_s:.0f} s ({self.elapsed():.0f} s used)"
