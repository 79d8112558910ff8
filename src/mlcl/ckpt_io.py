"""Writing checkpoints: atomic files, and checkpoint-callback state that is relative to the run.

- :class:`AtomicCheckpointIO` writes ``<dir>/.<name>.tmp-<pid>`` next to the target, fsyncs it,
  renames it over the target (atomic on one filesystem) and fsyncs the directory. A kill at any
  moment leaves either the previous file or the new one; a temporary file left by a kill is
  removed by :func:`remove_stale_tmp` when the run is resumed.
- :class:`RunCheckpoint` stores ``best_model_path`` and friends relative to its directory, and
  re-resolves them on load, so a copied or moved run directory resumes and tests its own
  ``best.ckpt``; and with ``save_last`` it rewrites ``last.ckpt`` at every checkpoint point, improved
  or not (Lightning 2.6 rewrites it only when a top-k file was saved at the same step, which leaves
  ``last.ckpt`` at the last improvement: a resume then repeats epochs, and a later stage that asks for
  ``_init_.ckpt: last`` would start from stale weights).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (the rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file in the target's directory + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # an exception (not a kill) on the way: leave nothing behind
            tmp.unlink()
    fsync_dir(path.parent)


def remove_stale_tmp(directory: Path) -> list[Path]:
    """Delete temporary checkpoint files that a killed process left in ``directory``; returns them."""
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(f".*{TMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink()
        log.info("removed %s (a partial checkpoint of an interrupted save)", p)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that saves local files with :func:`atomic_torch_save`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose saved state names files relative to its ``dirpath``.

    On load, relative names (and absolute ones written by older runs) are re-resolved against the
    current ``dirpath``; files that are not there (a checkpoint from another run) are forgotten
    instead of pointing into someone else's directory.
    """

    _PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")

    def _save_last_regardless(self, trainer: Any) -> None:
        """Write ``last.ckpt`` now unless this step was saved already or saving is off (sanity check)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_regardless(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_regardless(trainer)

    def _rel(self, path: str) -> str:
        if not path or not self.dirpath:
            return path
        p, d = Path(path), Path(self.dirpath)
        return str(p.relative_to(d)) if p.is_relative_to(d) else path

    def _resolve(self, path: str, old_dir: str | None) -> str:
        if not path or not self.dirpath:
            return path
        p = Path(path)
        if p.is_absolute():
            if old_dir is None or not p.is_relative_to(old_dir):
                return path if p.is_file() else ""
            p = p.relative_to(old_dir)
        resolved = Path(self.dirpath) / p
        return str(resolved) if resolved.is_file() else ""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for key in self._PATH_KEYS:
            state[key] = self._rel(state.get(key) or "")
        state["best_k_models"] = {self._rel(k): v for k, v in (state.get("best_k_models") or {}).items()}
        state["dirpath"] = "."  # relative to the checkpoint's own directory
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        old_dir = state.get("dirpath")
        old_dir = None if old_dir in (None, ".") else old_dir
        for key in self._PATH_KEYS:
            state[key] = self._resolve(state.get(key) or "", old_dir)
        state["best_k_models"] = {
            r: v for k, v in (state.get("best_k_models") or {}).items() if (r := self._resolve(k, old_dir))
        }
        if not state["best_model_path"]:  # its best file is elsewhere: start the ranking afresh
            state.update(best_model_score=None, best_k_models={}, kth_best_model_path="")
            state["kth_value"] = self.kth_value
        state["dirpath"] = self.dirpath
        super().load_state_dict(state)
