"""W&B: one offline run per sweep job, read back from the ``.wandb`` files (no mocks, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from mlcl import wandb_run
from tests.conftest import compose
from tests.test_train import run_cli
from tests.wandb_records import offline_runs

TINY = [
    "data.source.sizes.train=128",
    "data.source.sizes.val=64",
    "data.source.sizes.test=64",
    "trainer.max_epochs=2",
    "progress_bar=false",
]


def test_sweep_keys_from_multirun_yaml_and_optuna_params(tmp_path: Path):
    task = ["loss=bce,asl", "missing.rate=0,0.5", "trainer.max_epochs=1", "seed=range(2)", "+tag=x"]
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": task}}}), tmp_path / "multirun.yaml")
    hc = OmegaConf.create({"sweep": {"dir": str(tmp_path)}, "sweeper": {"params": None}})
    assert wandb_run.sweep_keys(hc) == ["loss", "missing.rate", "seed"]
    optuna = OmegaConf.create(
        {"sweep": {"dir": str(tmp_path / "none")}, "sweeper": {"params": {"optimizer.lr": "x"}}}
    )
    assert wandb_run.sweep_keys(optuna) == ["optimizer.lr"]


def _hydra_cfg(tmp_path: Path, overrides: list[str]):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(["logger=wandb", f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path}", *overrides])
    HydraConfig.instance().set_config(cfg)
    # the job config, as Hydra passes it to the task function
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_jobs_in_one_process_get_their_own_runs_and_a_failed_job_is_marked(tmp_path: Path):
    cfg = _hydra_cfg(tmp_path, ["loss=asl", "++tags=[ablation]"])
    with pytest.raises(RuntimeError), wandb_run.job(cfg, "train"):
        raise RuntimeError("the job crashed")
    with wandb_run.job(cfg, "train") as run:
        run.log({"x": 1.0})
    runs = offline_runs(tmp_path)
    assert [r.exit_code for r in runs] == [1, 0]
    for r in runs:
        assert r.tags == ["ablation", "asl", "digits", "small_cnn"] and r.job_type == "train"
        assert r.config["loss_name"] == "asl" and r.group == ""
        # a single run is named by its own overrides, without where-to-write and logger choices
        assert r.name == "loss=asl,++tags=[ablation]"


@pytest.mark.slow
def test_two_job_sweep_two_runs_with_own_names_configs_and_best_val(tmp_path: Path):
    sweep = tmp_path / "sweep"
    run_cli("mlcl.train", ["-m", "logger=wandb", "loss=bce,asl", *TINY, f"hydra.sweep.dir={sweep}"])
    runs = {r.name: r for r in offline_runs(sweep)}
    assert sorted(runs) == ["loss=asl", "loss=bce"]
    for job in sorted(sweep.glob("[0-9]")):
        res = json.loads((job / "metrics.json").read_text())
        config = yaml.safe_load((job / "config.yaml").read_text())
        r = runs[f"loss={res['run']['loss']}"]
        assert r.exit_code == 0 and r.group == str(sweep) and r.job_type == "train"
        assert {"bce", "asl"} & set(r.tags) == {res["run"]["loss"]} and {"digits", "small_cnn"} <= set(r.tags)
        # the resolved config once: exactly the run's config.yaml keys, no module hparams copy
        assert {k: v for k, v in r.config.items() if not k.startswith("_")} == config
        assert r.summary["best_val"] == pytest.approx(res["best_val"])
        assert r.summary["val/mAP"] == pytest.approx(res["best_val"])  # the checkpointed best, not the last
        assert r.summary["test/mAP"] == pytest.approx(res["test"]["mAP"])
        assert r.summary["chance_mAP"] == pytest.approx(res["chance_mAP"])
        assert r.summary["label_stats/positives"] == res["label_stats"]["positives"]
        assert {"test/per_class_AP/nrows", "test/pr_curves_table/nrows"} <= r.history_keys
        assert {"metrics.json", "config.yaml"} <= set(r.artifacts)
        # per-class AP in metrics.json: one per class, their mean is the test mAP
        ap = res["per_class"]["AP"]
        assert len(ap) == 10 and sum(ap.values()) / len(ap) == pytest.approx(res["test"]["mAP"], abs=1e-3)
        # positives per class on the 64 test rows: their mean rate is the chance level
        pos = res["per_class"]["positives"]
        assert 100 * sum(pos.values()) / (64 * len(pos)) == pytest.approx(res["chance_mAP"])
    ckpt = sweep / "0" / "checkpoints" / "best.ckpt"
    eval_dir = tmp_path / "eval"
    run_cli(
        "mlcl.eval", [f"ckpt_path={ckpt}", "+logger=wandb", "progress_bar=false", f"hydra.run.dir={eval_dir}"]
    )
    (ev,) = offline_runs(eval_dir)
    assert ev.job_type == "eval" and ev.exit_code == 0 and ev.name.startswith("eval:loss=")
    assert ev.summary["test/mAP"] == pytest.approx(
        json.loads((eval_dir / "eval_metrics.json").read_text())["test"]["mAP"]
    )
