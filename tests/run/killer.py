"""A test-only callback that SIGKILLs its own training process at a chosen step (simulated pre-emption)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L


class SigkillAt(L.Callback):
    """``os.kill(getpid(), SIGKILL)`` at the start of the first training batch with ``global_step >= step``.

    Added on the command line (``+callbacks.killer={_target_: tests.run.killer.SigkillAt, step: 5}``);
    nothing can run after SIGKILL (no ``finally``, no flush), as with a pre-empted job.
    """

    def __init__(self, step: int, during: str = "batch") -> None:
        self.step, self.during = int(step), during

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.during == "batch" and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.during == "validation" and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseAt(L.Callback):
    """Raise ``RuntimeError(message)`` at the first training batch with ``global_step >= step``."""

    def __init__(self, step: int, message: str = "injected failure", user: bool = False) -> None:
        self.step, self.message, self.user = int(step), message, bool(user)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            if self.user:  # a user error (bad data, say) found mid-run
                from mlcl.errors import UserError

                raise UserError(self.message, "data.path", "fix the file")
            raise RuntimeError(self.message)
