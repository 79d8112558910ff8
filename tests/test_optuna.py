"""Persistent optuna studies in SQLite: a study resumes across invocations and is shared by processes.

Trial counts are read straight from the SQLite file (``sqlite3``), not through optuna.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TINY = [
    "data.source.sizes.train=96",
    "data.source.sizes.val=64",
    "data.source.sizes.test=64",
    "trainer.max_epochs=1",
    "progress_bar=false",
    "test=false",
]


def complete_trials(db: Path, study: str) -> list[int]:
    """Numbers of the finished trials of ``study`` in an optuna SQLite file."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "WHERE s.study_name = ? AND t.state = 'COMPLETE' ORDER BY t.number",
            (study,),
        ).fetchall()
    return [r[0] for r in rows]


def test_sqlite_study_is_created_and_resumed_in_process(tmp_path: Path):
    import optuna

    from mlcl.optuna_storage import patch_rdb_storage

    patch_rdb_storage()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    for _ in range(2):  # the second create_study loads the stored study and adds to it
        study = optuna.create_study(storage=url, study_name="s", load_if_exists=True, direction="maximize")
        study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=2)
    assert complete_trials(tmp_path / "study.db", "s") == [0, 1, 2, 3]


def sweep(tmp_path: Path, name: str, n_trials: int) -> subprocess.Popen:
    args = [
        "hparams_search=optuna",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}",
        "hydra.sweeper.study_name=shared",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.sampler.n_startup_trials=1",
        *TINY,
        f"hydra.sweep.dir={tmp_path / name}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "mlcl.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-4000:]


@pytest.mark.slow
def test_two_processes_share_a_study_and_a_third_invocation_resumes_it(tmp_path: Path):
    first, second = sweep(tmp_path, "a", 2), sweep(tmp_path, "b", 2)
    finish(first)
    finish(second)
    assert complete_trials(tmp_path / "study.db", "shared") == [0, 1, 2, 3]  # no trial number twice
    finish(sweep(tmp_path, "c", 1))
    assert complete_trials(tmp_path / "study.db", "shared") == [0, 1, 2, 3, 4]
    jobs = sorted(p.parent.name for p in tmp_path.glob("*/*/metrics.json"))
    assert len(jobs) == 5
