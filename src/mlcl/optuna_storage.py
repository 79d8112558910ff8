"""Persistent optuna studies (``hydra.sweeper.storage=sqlite:///study.db``) under SQLAlchemy 2.

hydra-optuna-sweeper 1.3 requires optuna < 3, and optuna 2.10's RDB storage stamps the schema
version through alembic on a bare ``engine.connect()``. SQLAlchemy 1.x autocommitted that write;
SQLAlchemy 2 rolls it back when the connection closes, so every new storage fails with
``AssertionError`` in ``get_current_version``. Pinning ``sqlalchemy<2`` would also need
``alembic<1.14`` (newer alembic requires SQLAlchemy 2), so instead the one method is replaced by a
version that writes inside ``engine.begin()`` (committed on exit), and that accepts losing the race to
another process stamping the same new file with the same revision. Nothing else in optuna 2.10's RDB
storage depends on autocommit: studies resume and are shared between processes (tests/test_optuna.py).

The patch is installed by a Hydra callback that ``conf/hparams_search/optuna.yaml`` registers, so it
runs before the sweeper creates the study; it is a no-op for optuna >= 3 or SQLAlchemy < 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def needs_patch() -> bool:
    """True for optuna 2.x together with SQLAlchemy 2.x (the combination that breaks)."""
    import optuna
    import sqlalchemy

    return int(optuna.__version__.split(".")[0]) < 3 and int(sqlalchemy.__version__.split(".")[0]) >= 2


def patch_rdb_storage() -> bool:
    """Make optuna 2.x commit its alembic schema stamp under SQLAlchemy 2; returns whether it patched."""
    if not needs_patch():
        return False
    import alembic.migration
    from optuna.storages._rdb.storage import _VersionManager

    if getattr(_VersionManager._set_alembic_revision, "_mlcl_patched", False):
        return True

    def _set_alembic_revision(self: Any, revision: str) -> None:
        from sqlalchemy.exc import IntegrityError

        try:
            with self.engine.begin() as connection:  # committed when the block exits
                context = alembic.migration.MigrationContext.configure(connection)
                context.stamp(self._create_alembic_script(), revision)
        except IntegrityError:
            # two processes opening a new study file at once both saw it unstamped; the other one
            # stamped first. Fine if it wrote the same revision.
            with self.engine.connect() as connection:
                current = alembic.migration.MigrationContext.configure(connection).get_current_revision()
            if current != revision:
                raise

    _set_alembic_revision._mlcl_patched = True  # type: ignore[attr-defined]
    _VersionManager._set_alembic_revision = _set_alembic_revision
    _serialise_sqlite_setup()
    return True


def _serialise_sqlite_setup() -> None:
    """Let one process at a time create the tables of a new SQLite study file (``<file>.lock``).

    Two sweeps started together on a new file otherwise race in ``CREATE TABLE`` and the schema stamp.
    """
    from optuna.storages import RDBStorage

    from mlcl.filelock import exclusive

    original = RDBStorage.__init__

    def __init__(self: Any, url: str, *args: Any, **kwargs: Any) -> None:
        path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
        if not path or path == ":memory:":
            return original(self, url, *args, **kwargs)
        with exclusive(Path(f"{path}.lock")):
            return original(self, url, *args, **kwargs)

    RDBStorage.__init__ = __init__


class PatchOptunaStorage(Callback):
    """Hydra callback: applies :func:`patch_rdb_storage` when Hydra builds its callbacks."""

    def __init__(self) -> None:
        patch_rdb_storage()
