"""End-to-end: the real entry points, composed from the real configs, on a small slice of the digits."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SMALL = [
    "data=digits_easy",  # the easy mosaic: smoke tests need a few epochs to beat chance clearly
    "data.source.sizes.train=384",
    "data.source.sizes.val=128",
    "data.source.sizes.test=128",
    "trainer.max_epochs=3",
    "progress_bar=false",
]


def run_cli(
    module: str, args: list[str], cwd: Path = REPO, check: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def read_metrics_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "bce"
    run_cli("mlcl.train", [*SMALL, f"hydra.run.dir={run_dir}"])
    return run_dir


def test_run_dir_layout(trained_run: Path):
    for rel in (
        "config.yaml",
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "metrics.csv",
        "metrics.json",
    ):
        assert (trained_run / rel).is_file(), rel
    res = json.loads((trained_run / "metrics.json").read_text())
    assert res["run"]["loss"] == "bce" and res["run"]["data"] == "digits_easy"
    for key in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CF1_top3", "OF1_top3"):
        assert key in res["test"], key


def test_loss_decreases_and_beats_chance(trained_run: Path):
    rows = read_metrics_csv(trained_run / "metrics.csv")
    epoch_losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(epoch_losses) == 3
    assert epoch_losses[-1] < epoch_losses[0]
    res = json.loads((trained_run / "metrics.json").read_text())
    # chance level = mean per-class positive rate (about 21.5 % for the default label spread)
    assert 15 < res["chance_mAP"] < 30
    assert res["test"]["mAP"] > res["chance_mAP"] + 20


def test_eval_reproduces_test_metrics(trained_run: Path, tmp_path: Path):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    proc = run_cli("mlcl.eval", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}", "progress_bar=false"])
    assert "mAP" in proc.stdout
    out = json.loads((tmp_path / "eval_metrics.json").read_text())
    res = json.loads((trained_run / "metrics.json").read_text())
    assert out["test"]["mAP"] == pytest.approx(res["test"]["mAP"], abs=1e-4)


def test_existing_results_are_never_overwritten(trained_run: Path):
    before = (trained_run / "metrics.json").read_bytes()
    proc = run_cli("mlcl.train", [*SMALL, f"hydra.run.dir={trained_run}"], check=False)
    assert proc.returncode != 0
    assert "already holds results" in proc.stderr
    assert (trained_run / "metrics.json").read_bytes() == before


def test_unknown_loss_lists_valid_choices():
    proc = run_cli("mlcl.train", ["loss=nonexistent"], check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "nonexistent" in err
    for name in ("bce", "asl", "kmcl", "clml", "mulcon"):
        assert name in err


def test_unknown_backbone_suggests_names(tmp_path: Path):
    proc = run_cli(
        "mlcl.train",
        ["backbone=timm", "backbone.name=resnet1800", *SMALL, f"hydra.run.dir={tmp_path}"],
        check=False,
    )
    assert proc.returncode != 0
    assert "unknown backbone name 'resnet1800'" in proc.stderr and "resnet18" in proc.stderr


def test_pretrained_path_missing_names_config_key(tmp_path: Path):
    proc = run_cli(
        "mlcl.train",
        ["backbone=resnet18", "backbone.pretrained=/nope/w.pth", *SMALL, f"hydra.run.dir={tmp_path}"],
        check=False,
    )
    assert proc.returncode != 0
    assert "backbone.pretrained" in proc.stderr and "/nope/w.pth" in proc.stderr


def test_multirun_sweep(tmp_path: Path):
    run_cli(
        "mlcl.train",
        ["-m", "loss=bce,asl", "seed=0,1", *SMALL, "trainer.max_epochs=1", f"hydra.sweep.dir={tmp_path}"],
    )
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert len(results) == 4
    assert sorted((r["run"]["loss"], r["run"]["seed"]) for r in results) == [
        ("asl", 0),
        ("asl", 1),
        ("bce", 0),
        ("bce", 1),
    ]
