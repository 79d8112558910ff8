"""The project root: MLCL_ROOT, else a marker above the current directory, else the editable
checkout, else the current directory (logged); ``${mlcl.root:}`` and the data paths follow it."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

import mlcl  # noqa: F401  (registers the resolver)
from mlcl.config import root
from tests.conftest import REPO, YEAST, compose


def test_env_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLCL_ROOT", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(REPO)
    assert root.project_root() == tmp_path / "elsewhere"
    assert OmegaConf.create({"r": "${mlcl.root:}"}).r == str(tmp_path / "elsewhere")


def test_marker_above_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MLCL_ROOT", raising=False)
    (tmp_path / ".mlcl-root").write_text("")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert root.project_root() == tmp_path


def test_checkout_above_cwd(monkeypatch):
    monkeypatch.delenv("MLCL_ROOT", raising=False)
    monkeypatch.chdir(REPO / "src" / "mlcl" / "conf")
    assert root.project_root() == REPO


def test_editable_checkout_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.delenv("MLCL_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    # this test imports the src/ tree (editable layout): the checkout holding it is the root
    assert root.project_root() == REPO


def test_cwd_fallback_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLCL_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(root, "_editable_checkout", lambda: None)
    with caplog.at_level(logging.INFO, logger="mlcl"):
        assert root.project_root() == tmp_path
    assert "MLCL_ROOT" in caplog.text and str(tmp_path) in caplog.text


def test_yeast_paths_from_another_directory(tmp_path, monkeypatch):
    if not (YEAST / "yeast_official_train.hdf5").is_file():
        pytest.skip("../shared/data/yeast is not present")
    monkeypatch.delenv("MLCL_ROOT", raising=False)
    monkeypatch.delenv("MLCL_YEAST", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = compose(["data=yeast", "backbone=mlp"])
    assert (REPO.parent / "shared" / "data" / "yeast" / "yeast_official_train.hdf5").samefile(
        cfg.data.source.train_path
    )


def test_missing_yeast_names_key_env_and_path(tmp_path, monkeypatch):
    from mlcl.config import validate
    from mlcl.errors import UserError

    monkeypatch.setenv("MLCL_YEAST", str(tmp_path / "nowhere"))
    with pytest.raises(UserError) as info:
        validate(compose(["data=yeast", "backbone=mlp"]))
    err = info.value
    assert err.where == "data.source.train_path"
    assert str(tmp_path / "nowhere" / "yeast_official_train.hdf5") in err.what
    assert "MLCL_YEAST" in err.fix and "MLCL_ROOT" in err.fix
