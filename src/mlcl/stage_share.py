"""Stages shared by the jobs of one sweep (``_shared_: true`` in a method's stage).

A stage whose config does not depend on what varies across a sweep (MulSupCon's yeast pre-training
runs with ``_fixed_: {seed: 0}`` for every fine-tune seed) is trained once per sweep, not once per job.
Its run directory is ``<sweep dir>/_shared_stages/<method>.<stage>-<key>``, where ``key`` hashes the
stage's unresolved config: jobs whose stage configs are identical share it, any difference (another
learning rate, another data split) gives another directory. A file lock serialises the jobs that need
the same stage, with any launcher: the first trains it, the others wait, then reuse its results and
checkpoints; a killed shared stage resumes from its ``last.ckpt`` like any stage.

``mlcl-compare`` and ``mlcl-study`` never count ``_shared_stages`` as runs of the sweep.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mlcl.filelock import exclusive

SHARED_DIR = "_shared_stages"
# settings of the stage mechanism that name the job, not the stage's training
_NOT_HASHED = ("hydra", "ckpt_path", "method_name")


def stage_key(cfg: DictConfig) -> str:
    """12 hex digits identifying the training a stage config describes (its ``hydra`` node excluded)."""
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        for key in _NOT_HASHED:
            if key in task:
                del task[key]  # (pop would resolve the value first)
    text = OmegaConf.to_yaml(task, resolve=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def shared_stage_dir(sweep_dir: Path, method: str | None, stage: str, key: str) -> Path:
    """Where the shared stage ``stage`` of ``method`` with config key ``key`` runs."""
    return Path(sweep_dir).resolve() / SHARED_DIR / f"{method or 'method'}.{stage}-{key}"


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<run_dir>.lock`` (released when the holder ends, killed included)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(run_dir.with_name(run_dir.name + ".lock")):
        yield


def is_shared_result(path: Path) -> bool:
    """Whether a ``metrics.json`` belongs to a shared stage (not a job of the sweep)."""
    return SHARED_DIR in Path(path).parts
