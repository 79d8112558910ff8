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


def test_losing_the_schema_stamp_race_to_another_process_is_harmless(tmp_path: Path, monkeypatch):
    import alembic.migration
    from optuna.storages import RDBStorage

    from mlcl.optuna_storage import patch_rdb_storage

    patch_rdb_storage()
    storage = RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")  # the other process: created and stamped
    manager = storage._version_manager
    head = manager.get_head_version()
    real = alembic.migration.MigrationContext.get_current_heads
    calls = []

    def read_before_the_other_process_stamped(self):  # once: then the real table is read again
        calls.append(1)
        return () if len(calls) == 1 else real(self)

    monkeypatch.setattr(
        alembic.migration.MigrationContext, "get_current_heads", read_before_the_other_process_stamped
    )
    manager._set_alembic_revision(head)  # its INSERT collides with the row already there
    monkeypatch.undo()
    assert len(calls) >= 2 and manager.get_current_version() == head
    with sqlite3.connect(tmp_path / "study.db") as con:
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]


def test_new_sqlite_study_files_are_set_up_one_process_at_a_time(tmp_path: Path):
    import fcntl
    import threading

    from optuna.storages import RDBStorage

    from mlcl.optuna_storage import patch_rdb_storage

    patch_rdb_storage()
    db = tmp_path / "study.db"
    done = threading.Event()
    with open(f"{db}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is creating the tables
        worker = threading.Thread(target=lambda: (RDBStorage(f"sqlite:///{db}"), done.set()))
        worker.start()
        assert not done.wait(1.0)  # waits for it
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(30)
    assert done.is_set()
