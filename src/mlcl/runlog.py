"""The run's log: ``train.log`` (appended, also on resume), ``metrics.csv`` (appended), console summaries.

``train.log`` is attached by :func:`attach_file_log` only after the run-directory guard has passed,
so a refused run never touches an existing run's log. It receives everything logged by mlcl,
Lightning and Python warnings, the resolved config (:func:`record_config`), one compact line per
epoch (:class:`EpochSummary`), the final results table and the traceback of a failure.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

LOG_FILE = "train.log"
FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
# written to the file only (its content is shown on the console in a richer form)
record_log = logging.getLogger("mlcl.record")
# Lightning's loggers do not propagate to the root logger when it had no handler at import time
_LIGHTNING = ("lightning.pytorch", "lightning.fabric", "lightning")


def attach_file_log(run_dir: Path, name: str = LOG_FILE) -> logging.Handler:
    """Append every INFO+ record (mlcl, Lightning, warnings) to ``run_dir/train.log``; returns the handler."""
    handler = logging.FileHandler(Path(run_dir) / name, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for name_ in _LIGHTNING:
        lg = logging.getLogger(name_)
        if not lg.propagate:
            lg.addHandler(handler)
    record_log.addHandler(handler)
    record_log.propagate = False
    record_log.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return handler


def detach_file_log(handler: logging.Handler) -> None:
    """Undo :func:`attach_file_log` (several runs in one process, e.g. a pipeline or the tests)."""
    for lg in (logging.getLogger(), record_log, *map(logging.getLogger, _LIGHTNING)):
        if handler in lg.handlers:
            lg.removeHandler(handler)
    handler.close()


def log_failure(handler: logging.Handler | None, message: str) -> None:
    """Write ``message`` and the traceback being handled to ``handler``'s file only.

    Not through the logger: Hydra's console handler would print the traceback too, and a user error
    must end in one paragraph on the console (the wrapper in :mod:`mlcl.cli` prints it).
    """
    if handler is None:
        return
    record = logging.LogRecord("mlcl", logging.ERROR, __file__, 0, message, None, sys.exc_info())
    handler.handle(record)


def print_config(cfg: DictConfig, console: Any = None) -> None:
    """Print the resolved config as a rich tree (one branch per top-level group)."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), guide_style="dim")
        text = OmegaConf.to_yaml(value, resolve=True) if OmegaConf.is_config(value) else f"{value}\n"
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    (console or Console()).print(tree)


def record_config(cfg: DictConfig, resumed_from: str | None = None) -> None:
    """Write the resolved config to ``train.log`` (the console shows :func:`print_config`'s tree)."""
    if resumed_from:
        record_log.info("resuming from %s", resumed_from)
    record_log.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))


def render_text(renderable: Any, width: int = 100) -> str:
    """A rich renderable (table) as plain text, for the log file."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, no_color=True, color_system=None).print(renderable)
    return buf.getvalue()


def _fmt(value: Any) -> str:
    v = float(value)
    return f"{v:.4g}" if math.isfinite(v) and abs(v) < 1 else f"{v:.2f}" if math.isfinite(v) else str(v)


class EpochSummary(L.Callback):
    """One log line per epoch: epoch number, train loss terms, val metrics and learning rate."""

    KEYS = ("mAP", "CF1", "OF1", "bce")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        parts += [
            f"{k.removesuffix('_epoch')}={_fmt(v)}"
            for k, v in m.items()
            if k.startswith("train/") and k.endswith("_epoch")
        ]
        parts += [f"val/{k}={_fmt(m[f'val/{k}'])}" for k in self.KEYS if f"val/{k}" in m]
        if trainer.optimizers:
            parts.append(f"lr={trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        if getattr(pl_module, "skipped_steps", 0):
            parts.append(f"skipped_steps={pl_module.skipped_steps}")
        log.info(" ".join(parts))


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer without deleting an existing ``metrics.csv``: new rows are appended."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file() and path.stat().st_size:
            with path.open(newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run's ``metrics.csv`` (a resumed run keeps the earlier rows;
    the epoch a kill interrupted appears twice, the later rows are the ones the resumed run used)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
