"""Acceptance flows of the loss issues, run through the real CLI on small data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, compose
from tests.test_train import SMALL, run_cli


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """A small learnable multi-label table: labels are thresholded linear functions of the features."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    y = (x @ rng.normal(size=(16, 5)) + 0.5 * rng.normal(size=(500, 5)) > 1.0).astype(np.int64)
    path = tmp_path_factory.mktemp("tab") / "table.npz"
    np.savez(path, feature=x, target=y)
    return path


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(name: str):
    cfg = compose(
        [f"experiment={name}", "++stage1_ckpt=x", "++pretrain_ckpt=x", "++data.root=/r", "++data.path=/p"]
    )
    OmegaConf.resolve(cfg.loss)
    assert cfg.loss._target_.startswith("mlcl.losses.")


def test_kmcl_trains_on_default_data(tmp_path: Path):
    run_cli("mlcl.train", ["loss=kmcl", *SMALL, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}"])
    res = results(tmp_path)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    for term in ("train/asl_epoch", "train/rec_epoch", "train/kmcl_epoch"):
        assert term in rows  # every term is logged
    assert res["test"]["mAP"] > res["chance_mAP"] + 10


def test_missing_label_sweep_bce_clml(tmp_path: Path):
    """Issue acceptance: -m loss=bce,clml missing=uniform missing.rate=0,0.5 runs four jobs."""
    run_cli(
        "mlcl.train",
        [
            "-m",
            "loss=bce,clml",
            "missing=uniform",
            "missing.rate=0,0.5",
            *SMALL,
            "trainer.max_epochs=1",
            f"hydra.sweep.dir={tmp_path}",
        ],
    )
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert sorted((r["run"]["loss"], r["run"]["missing_rate"]) for r in runs) == [
        ("bce", 0.0),
        ("bce", 0.5),
        ("clml", 0.0),
        ("clml", 0.5),
    ]
    for r in runs:
        assert r["test"]["mAP"] > 0
        stats = r["label_stats"]
        if r["run"]["missing_rate"] == 0.5:
            assert 0.5 < stats["kept_fraction"] < 0.8 and stats["hidden"] > 0
        else:
            assert stats["hidden"] == 0
    # the test split stays fully labelled whatever the rate: identical chance level
    assert len({r["chance_mAP"] for r in runs}) == 1


def test_tabular_mulsupcon(table: Path, tmp_path: Path):
    """Issue acceptance: data=arrays data.path=<file> backbone=mlp loss=mulsupcon gives mAP and F1."""
    run_cli(
        "mlcl.train",
        [
            "data=arrays",
            f"data.path={table}",
            "backbone=mlp",
            "loss=mulsupcon",
            "trainer.max_epochs=2",
            "progress_bar=false",
            f"hydra.run.dir={tmp_path}",
        ],
    )
    res = results(tmp_path)
    for key in ("mAP", "CF1", "OF1"):
        assert key in res["test"]
    assert res["run"]["loss"] == "mulsupcon"


def test_pretrain_then_finetune(table: Path, tmp_path: Path):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    run_cli(
        "mlcl.train",
        [
            "experiment=mulsupcon_pretrain",
            "data=arrays",
            f"data.path={table}",
            "trainer.max_epochs=1",
            "data.iterations_per_epoch=4",
            "progress_bar=false",
            f"hydra.run.dir={pre}",
        ],
    )
    proc = run_cli(
        "mlcl.train",
        [
            "experiment=mulsupcon_finetune",
            "data=arrays",
            f"data.path={table}",
            f"pretrain_ckpt={pre}/checkpoints/last.ckpt",
            "trainer.max_epochs=2",
            "progress_bar=false",
            f"hydra.run.dir={ft}",
        ],
    )
    assert "initialised" in proc.stderr + proc.stdout and "backbone" in proc.stderr + proc.stdout
    res = results(ft)
    assert res["test"]["mAP"] > res["chance_mAP"]


def test_yeast_runs(yeast_dir: Path, tmp_path: Path):
    run_cli(
        "mlcl.train",
        ["experiment=yeast_bce", "trainer.max_epochs=2", "progress_bar=false", f"hydra.run.dir={tmp_path}"],
    )
    res = results(tmp_path)
    assert res["run"]["data"] == "yeast"
    assert res["test"]["mAP"] > res["chance_mAP"]


def test_kmcl_coco_experiment_starts_on_a_local_coco(tmp_path: Path):
    """Issue acceptance: experiment=kmcl_coco_tresnet_m data.root=<coco> composes and starts (CPU, 1 step)."""
    from tests.data.test_sources import make_fake_coco

    root = tmp_path / "coco"
    make_fake_coco(root)
    run_cli(
        "mlcl.train",
        [
            "experiment=kmcl_coco_tresnet_m",
            f"data.root={root}",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.pin_memory=false",
            "data.persistent_workers=false",
            "data.augment.image_size=64",
            "progress_bar=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
    )
    res = results(tmp_path / "run")
    assert res["run"]["backbone"] == "tresnet_m" and res["run"]["loss"] == "kmcl"
    assert "mAP" in res["test"]


def test_ddp_two_cpu_processes_with_gathered_contrastive_loss(tmp_path: Path):
    """trainer=ddp on 2 CPU processes (gloo): SupCon gathers embeddings across ranks; one metrics.json."""
    run_cli(
        "mlcl.train",
        [
            "loss=supcon",
            "loss.gather=true",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            *SMALL,
            "trainer.max_epochs=1",
            f"hydra.run.dir={tmp_path}",
        ],
    )
    assert len(list(tmp_path.glob("metrics*.json"))) == 1
    assert results(tmp_path)["test"]["mAP"] > 0


@pytest.mark.parametrize("loss", ["kmcl", "mulcon", "clml"])
def test_bf16_mixed_precision_stays_finite(loss: str, tmp_path: Path):
    extra = ["loss.head_kwargs.embed_dim=32", "loss.head_kwargs.num_pixel_blocks=1", "loss.proj_hidden=32"]
    run_cli(
        "mlcl.train",
        [
            f"loss={loss}",
            "trainer.precision=bf16-mixed",
            *SMALL,
            "trainer.max_epochs=1",
            *(extra if loss == "mulcon" else []),
            f"hydra.run.dir={tmp_path}",
        ],
    )
    res = results(tmp_path)
    assert res["run"]["skipped_steps"] == 0  # a non-finite loss would have raised
    assert res["test"]["mAP"] > 0


def test_optuna_sweep_returns_best_val_map(tmp_path: Path):
    run_cli(
        "mlcl.train",
        [
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=1",
            *SMALL,
            "trainer.max_epochs=1",
            f"hydra.sweep.dir={tmp_path}",
        ],
    )
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    trials = [results(p.parent)["best_val"] for p in tmp_path.glob("*/metrics.json")]
    assert len(trials) == 2 and best.best_value == pytest.approx(max(trials))
