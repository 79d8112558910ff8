"""Shared test fixtures: offline W&B, deterministic threads, Hydra config composition, shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "src" / "mlcl" / "conf"
SHARED = REPO.parent / "shared"
YEAST = SHARED / "data" / "yeast"


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)
    yield


@pytest.fixture
def yeast_dir() -> Path:
    if not (YEAST / "yeast_official_train.hdf5").is_file():
        pytest.skip("../shared/data/yeast is not present")
    return YEAST


def compose(overrides: list[str], config_name: str = "train"):
    """Compose a real config from conf/ with overrides (hydra runtime values filled as a run would)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
