"""Methods as sweep units (mlcl.stages, conf/method/): composition of every shipped method, per-stage
override scoping, and a real two-stage MulCon job (replaces the former mulcon_pipeline tests).

Expected values (learning rates, loaded tensors, stage settings) are written down from spec mulcon.md
§8/§17.5 and the method files' documented recipes, not read off the code under test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from mlcl import stages as st
from mlcl.errors import UserError
from tests.conftest import CONF, REPO, compose

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
SMALL = [
    "backbone.width=16",
    "data.source.sizes.train=128",
    "data.source.sizes.val=128",
    "data.source.sizes.test=128",
    "trainer.max_epochs=1",
    "loss.head_kwargs.embed_dim=32",
    "loss.head_kwargs.num_pixel_blocks=1",
    "loss.proj_hidden=32",
    "ema.decay=0.9",
    "progress_bar=false",
    "logger=none",
]
REF = ["method=mulcon_reference", "data=digits", "backbone=small_cnn", "trainer=cpu"]
VIEWS = ["+stages.stage2.data.augment.max_shift=1"]  # the two views differ by a random shift


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "mlcl.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def job_stages(overrides: list[str]):
    """(job config with hydra node, stages, shared and per-stage overrides) as ``run_method`` sees them."""
    cfg = compose(overrides)
    with st.hydra_runtime(cfg) as task:
        stages = st.method_stages(task) if task.get("stages") else []
    shared, scoped = st.split_overrides(overrides, [s.name for s in stages])
    return cfg, stages, shared, scoped


def stage_cfg(overrides: list[str], name: str, run_dir: Path, settings: dict | None = None):
    _, stages, shared, scoped = job_stages(overrides)
    stage = next(s for s in stages if s.name == name)
    return st.compose_stage(stage, shared, scoped[name], run_dir, settings)


def _leaves(d: dict, path: tuple = ()) -> list[tuple[tuple, object]]:
    """(key path, value) of every leaf of a nested dict (keys may contain dots, e.g. head.classifier)."""
    out = []
    for k, v in d.items():
        out += _leaves(v, (*path, k)) if isinstance(v, dict) and v else [((*path, k), v)]
    return out


# --------------------------------------------------------------------------- composition of every method
@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_with_its_stage_settings(method, tmp_path):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "method" / f"{method}.yaml"))
    raw.pop("defaults", None)
    cfg, stages, shared, scoped = job_stages([f"method={method}"])
    with st.hydra_runtime(cfg) as job:
        assert job.method_name == method
    if "stages" not in raw:  # one-stage: the method picks the loss of the same name
        assert stages == [] and cfg.hydra.runtime.choices.loss == method
        return
    assert [s.name for s in stages] == list(raw["stages"])
    for stage in stages:
        body = raw["stages"][stage.name]
        settings = {body["_init_"].get("key", "init_ckpt"): "/x/y.ckpt"} if "_init_" in body else {}
        c = st.compose_stage(stage, shared, scoped[stage.name], tmp_path / stage.name, settings)
        for group, choice in (body.get("_groups_") or {}).items():
            assert c.hydra.runtime.choices[group] == choice
        with st.hydra_runtime(c) as task:
            resolved = OmegaConf.to_container(task, resolve=False)
            for path, value in _leaves({k: v for k, v in body.items() if not k.startswith("_")}):
                node = resolved
                for k in path:
                    node = node[k]
                assert node == value, (stage.name, path)
            for key, value in (body.get("_fixed_") or {}).items():
                assert resolved[key] == value
            assert task.get("stages") is None  # a stage is a plain run, never a method again
            if "_init_" in body:
                assert OmegaConf.select(task, "init_ckpt") == "/x/y.ckpt"


def test_overrides_reach_every_stage_unless_scoped(tmp_path):
    ovs = [
        "method=mulcon",
        "trainer.max_epochs=3",
        "optimizer.lr=0.5",
        "stages.stage2.optimizer.lr=0.25",  # the method sets it: no + needed
        "+stages.stage1.trainer.max_epochs=7",
        "seed=4",
    ]
    s1 = stage_cfg(ovs, "stage1", tmp_path / "s1")
    s2 = stage_cfg(ovs, "stage2", tmp_path / "s2", {"init_ckpt": "/a.ckpt"})
    # the method: AdamW 2e-4 in stage one, SGD 0.01 in stage two; the command line wins over both,
    # and the stage-scoped override over the plain one, in its stage only
    assert s1.optimizer._target_ == "torch.optim.AdamW" and s2.optimizer._target_ == "torch.optim.SGD"
    assert s1.optimizer.lr == 0.5 and s2.optimizer.lr == 0.25
    assert s1.trainer.max_epochs == 7 and s2.trainer.max_epochs == 3
    assert s1.seed == s2.seed == 4
    assert s1.loss.con_weight == 0.0 and s2.loss.con_weight == 0.5 and s2.data.num_views == 2
    assert list(s2.init_modules) == ["backbone", "head"] and s2.init_weights == "ema"
    assert (
        "++optimizer.lr=0.25" in s2.hydra.overrides.task
        and "++optimizer.lr=0.25" not in s1.hydra.overrides.task
    )


def test_fixed_values_beat_the_command_line(tmp_path):
    ovs = ["method=yeast_mulsupcon", "seed=2"]
    pre = stage_cfg(ovs, "pretrain", tmp_path / "p", {"seed": 0})
    fine = stage_cfg(ovs, "finetune", tmp_path / "f", {"pretrain_ckpt": "/p.ckpt"})
    assert pre.seed == 0 and fine.seed == 2  # the reference pre-trains with seed 0
    assert pre.hydra.runtime.choices.experiment == "mulsupcon_pretrain"
    cb = pre.callbacks.lowest_train_loss
    assert (cb.monitor, cb.mode, cb.save_on_train_epoch_end) == ("train/loss_epoch", "min", True)
    with st.hydra_runtime(fine) as task:
        assert task.init_ckpt == "/p.ckpt" and list(task.init_modules) == ["backbone"]
        assert (
            task.callbacks.best_dev_loss.monitor == "val/bce" and task.callbacks.best_dev_loss.mode == "min"
        )
        assert task.callbacks.best_dev_loss.dirpath == str((tmp_path / "f").resolve() / "checkpoints")


def test_split_overrides():
    shared, scoped = st.split_overrides(
        [
            "method=mulcon",
            "a=1",
            "stages.s1.b=2",
            "+stages.s2.c.d=3",
            "~stages.s2.e",
            "ckpt_path=last",
            "hydra.x=1",
            "+stages.s1._shared_=true",  # stage metadata: read from the job's stages node, not a value
        ],
        ["s1", "s2"],
    )
    assert shared == ["a=1"]
    assert scoped == {"s1": ["++b=2"], "s2": ["++c.d=3", "~e"]}
    with pytest.raises(UserError, match="stage 's3'"):
        st.split_overrides(["stages.s3.b=1"], ["s1"])


def test_bad_stage_override_is_refused_before_any_stage_trains(tmp_path):
    from omegaconf import open_dict

    # valid for the job and stage one (cosine schedule), not for stage two's StepLR: refused up front
    cfg = compose(["method=mulcon", "scheduler.min_lr_ratio=0.1"])
    with open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(tmp_path / "job")
    with (
        st.hydra_runtime(cfg) as task,
        pytest.raises(UserError, match=r"scheduler\.min_lr_ratio.*stage stage2"),
    ):
        st.run_method(task)
    assert not (tmp_path / "job" / "stages" / "stage1").exists()


def test_select_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("last", "best", "lowest_train_loss"):
        (ckpts / f"{name}.ckpt").write_bytes(b"x")
    assert (
        st.select_checkpoint(tmp_path, {"best_ckpt": str(ckpts / "best.ckpt")}, "best") == ckpts / "best.ckpt"
    )
    # metrics.json stores it relative to the run directory (a copied run stays self-contained)
    rel = {"best_ckpt": "checkpoints/best.ckpt"}
    assert st.select_checkpoint(tmp_path, rel, "best") == ckpts / "best.ckpt"
    assert st.select_checkpoint(tmp_path, {"best_ckpt": None}, "best") == ckpts / "last.ckpt"
    assert st.select_checkpoint(tmp_path, {}, "last") == ckpts / "last.ckpt"
    assert st.select_checkpoint(tmp_path, {}, "lowest_train_loss.ckpt") == ckpts / "lowest_train_loss.ckpt"
    with pytest.raises(UserError, match="does not exist"):
        st.select_checkpoint(tmp_path, {}, "nope.ckpt")


# --------------------------------------------------------------------------- a real two-stage job
@pytest.fixture(scope="module")
def mulcon_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    job = tmp_path_factory.mktemp("method") / "job"
    proc = run_train([*REF, *SMALL, *VIEWS, f"hydra.run.dir={job}"])
    if proc.returncode != 0:
        raise AssertionError(f"method job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return job, proc


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_job_runs_both_stages_in_nested_dirs(mulcon_job):
    job, proc = mulcon_job
    res = json.loads((job / "metrics.json").read_text())
    s1 = json.loads((job / "stages" / "stage1" / "metrics.json").read_text())
    s2 = json.loads((job / "stages" / "stage2" / "metrics.json").read_text())
    assert res["stages"]["stage1"]["test"] == pytest.approx(s1["test"])
    assert res["stages"]["stage2"]["test"] == pytest.approx(s2["test"])
    assert res["test"] == pytest.approx(s2["test"])  # the job reports the final stage
    assert res["run"]["method"] == "mulcon_reference" and res["run"]["stages"] == ["stage1", "stage2"]
    assert res["run"]["run_dir"] == str(job) and s2["run"]["run_dir"] == str(job / "stages" / "stage2")
    printed = dict(re.findall(r"stage (stage[12]): test mAP = ([\d.]+)", proc.stdout))
    assert float(printed["stage2"]) == pytest.approx(s2["test"]["mAP"], abs=0.006)
    for stage in ("stage1", "stage2"):
        overrides = yaml.safe_load((job / "stages" / stage / ".hydra" / "overrides.yaml").read_text())
        assert f"experiment=mulcon_{stage}" in overrides
    assert yaml.safe_load((job / "config.yaml").read_text())["method_name"] == "mulcon_reference"


@pytest.mark.slow
def test_stage_configs_follow_the_spec_and_cli_wins(mulcon_job):
    job, _ = mulcon_job
    s1 = yaml.safe_load((job / "stages" / "stage1" / "config.yaml").read_text())
    s2 = yaml.safe_load((job / "stages" / "stage2" / "config.yaml").read_text())
    ckpt = str(job / "stages" / "stage1" / "checkpoints" / "best.ckpt")
    for cfg in (s1, s2):  # the experiments pick resnet101; the command line wins
        assert cfg["backbone"]["name"] == "small_cnn" and cfg["data_name"] == "digits"
    assert s1["loss"]["con_weight"] == 0.0 and s1["data"]["num_views"] in (None, 1)
    assert s1["optimizer"]["_target_"] == "torch.optim.AdamW" and s1["optimizer"]["lr"] == pytest.approx(2e-4)
    assert s1["init_ckpt"] is None and s1["data"]["augment"]["max_shift"] == 0
    assert s2["stage1_ckpt"] == ckpt and s2["init_ckpt"] == ckpt
    assert s2["init_weights"] == "ema" and s2["init_modules"] == ["backbone", "head"]
    assert s2["loss"]["con_weight"] == 0.5 and s2["data"]["num_views"] == 2
    assert s2["data"]["augment"]["max_shift"] == 1
    assert s2["optimizer"]["_target_"] == "torch.optim.SGD" and s2["optimizer"]["momentum"] == 0.9
    assert s2["scheduler"]["name"] == "step" and s2["ema"]["decay"] == 0.9
    sd1 = load_ckpt(job / "stages" / "stage1" / "checkpoints" / "last.ckpt")["state_dict"]
    sd2 = load_ckpt(job / "stages" / "stage2" / "checkpoints" / "last.ckpt")["state_dict"]
    assert not any(k.startswith("loss_fn.") for k in sd1)
    assert {"loss_fn.projector.fc1.weight", "loss_fn.projector.fc2.weight"} <= set(sd2)


def build(task):
    """Datamodule + MLCLModule exactly as ``mlcl.train.run`` builds them (no training)."""
    from hydra.utils import instantiate

    from mlcl.train import build_module, num_views

    dm = instantiate(
        task.data, missing=OmegaConf.to_container(task.missing, resolve=True), num_views=num_views(task)
    )
    dm.setup("fit")
    return build_module(task, dm)


@pytest.mark.slow
def test_stage2_initialisation_is_the_stage1_ema_weights(mulcon_job, tmp_path):
    from mlcl.checkpoints import load_init_weights

    job, _ = mulcon_job
    path = job / "stages" / "stage1" / "checkpoints" / "best.ckpt"
    ckpt = load_ckpt(path)
    c = stage_cfg([*REF, *SMALL], "stage2", tmp_path, {"stage1_ckpt": str(path)})
    with st.hydra_runtime(c) as task:
        module = build(task)
        fresh_projector = {k: v.clone() for k, v in module.loss_fn.projector.state_dict().items()}
        loaded = load_init_weights(module, task.init_ckpt, task.init_weights, task.init_modules)
    own = module.state_dict()
    expected = sorted(k for k in own if k.startswith(("backbone.", "head.")))
    assert sorted(loaded) == expected and any(k.startswith("head.classifier.") for k in expected)
    differs_from_raw = 0
    for k in expected:
        assert torch.equal(own[k], ckpt["ema"][k]), k
        differs_from_raw += not torch.equal(ckpt["ema"][k], ckpt["state_dict"][k])
    assert differs_from_raw > 0  # EMA (decay 0.9) and raw weights differ after a few steps: EMA was loaded
    for k, v in module.loss_fn.projector.state_dict().items():
        assert torch.equal(v, fresh_projector[k])


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_parameter_groups_follow_the_reference_multipliers(stage, tmp_path):
    # spec §8: stage one AdamW lr 2e-4, backbone x0.1, whole head x1; stage two SGD lr 0.01, backbone and
    # head x0.1, classifier and projector x1; weight decay 1e-4 everywhere
    expected_lr = {
        "stage1": {"backbone": 2e-5, "head": 2e-4, "classifier": 2e-4},
        "stage2": {"backbone": 1e-3, "head": 1e-3, "classifier": 1e-2, "projector": 1e-2},
    }[stage]
    c = stage_cfg([*REF, *SMALL, "scheduler=none"], stage, tmp_path, {"stage1_ckpt": "unused.ckpt"})
    with st.hydra_runtime(c) as task:
        module = build(task)
    opt = module.configure_optimizers()
    names = {id(p): n for n, p in module.named_parameters()}
    lrs = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert set(lrs) == {n for n, p in module.named_parameters() if p.requires_grad}
    for name, lr in lrs.items():
        part = next(
            part
            for prefix, part in (
                ("backbone.", "backbone"), ("head.classifier.", "classifier"), ("head.", "head"),
                ("loss_fn.projector.", "projector"),
            )
            if name.startswith(prefix)
        )  # fmt: skip
        assert lr == pytest.approx(expected_lr[part], rel=1e-12), name
    assert ("projector" in expected_lr) == any(n.startswith("loss_fn.projector.") for n in lrs)
    for g in opt.param_groups:
        assert g["weight_decay"] == pytest.approx(1e-4)


@pytest.mark.slow
def test_rerun_skips_finished_and_resumes_unfinished_stages(mulcon_job, tmp_path):
    import shutil

    job0, _ = mulcon_job
    job = tmp_path / "job"
    shutil.copytree(job0, job)
    for p in job.rglob("*.json"):  # the copy's paths: results of a job interrupted during stage two
        p.write_text(p.read_text().replace(str(job0), str(job)))
    (job / "metrics.json").unlink()
    (job / "stages" / "stage2" / "metrics.json").unlink()
    s1 = job / "stages" / "stage1" / "metrics.json"
    before = (s1.stat().st_mtime_ns, s1.read_bytes())
    refused = run_train([*REF, *SMALL, *VIEWS, f"hydra.run.dir={job}", "ckpt_path=/some/file.ckpt"])
    assert refused.returncode != 0 and "ckpt_path=last" in refused.stderr
    proc = run_train([*REF, *SMALL, *VIEWS, f"hydra.run.dir={job}", "ckpt_path=last"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (s1.stat().st_mtime_ns, s1.read_bytes()) == before  # stage one was not run again
    logged = proc.stdout + proc.stderr + (job / "train.log").read_text()
    assert f"stage stage2 resumes from {job / 'stages' / 'stage2' / 'checkpoints' / 'last.ckpt'}" in logged
    assert "stage stage1 finished, skipped" in logged
    res = json.loads((job / "metrics.json").read_text())
    assert res["stages"]["stage1"]["test"] == pytest.approx(json.loads(s1.read_text())["test"])
    # a finished job: stored results, nothing touched
    again = run_train([*REF, *SMALL, *VIEWS, f"hydra.run.dir={job}", "ckpt_path=last"])
    assert again.returncode == 0 and "already finished" in again.stdout
    assert json.loads((job / "metrics.json").read_text()) == res
    assert not list(job.glob("metrics-*.json"))


# --------------------------------------------------------------------------- clear errors at stage two's init
def test_missing_stage1_ckpt_names_the_key(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        ["experiment=mulcon_stage2", "data=digits", "backbone=small_cnn", *SMALL, f"hydra.run.dir={run_dir}"]
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("mlcl: error: stage1_ckpt is required but not set (stage1_ckpt)")
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


def _run_stage2(tmp_path: Path, ckpt: str, extra: list[str] = ()) -> None:
    """``mlcl.train.run`` of stage two in this process; expected to raise before any training."""
    from mlcl.train import run

    run_dir = tmp_path / "s2"
    c = stage_cfg([*REF, *SMALL, *extra], "stage2", run_dir, {"stage1_ckpt": ckpt})
    with st.hydra_runtime(c) as task:
        try:
            run(task)
        finally:
            assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


def test_nonexistent_stage1_ckpt(tmp_path):
    with pytest.raises(UserError, match=r"file not found: /nope/stage1\.ckpt \(stage1_ckpt\)"):
        _run_stage2(tmp_path, "/nope/stage1.ckpt")


@pytest.mark.slow
def test_stage1_ckpt_without_ema_weights(mulcon_job, tmp_path):
    job, _ = mulcon_job
    ckpt = load_ckpt(job / "stages" / "stage1" / "checkpoints" / "best.ckpt")
    del ckpt["ema"]
    path = tmp_path / "no_ema.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="no EMA weights") as err:
        _run_stage2(tmp_path, str(path))
    msg = str(err.value)
    assert "stage1_ckpt" in msg and "init_weights=raw" in msg and "ema.decay" in msg


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "tensor", "config_key"),
    [
        (["loss.head_kwargs.embed_dim=16"], "head.label_queries: checkpoint (10, 32) vs model (10, 16)",
         "loss.head_kwargs.embed_dim (checkpoint 32, this run 16)"),
        (["backbone.width=8"], "backbone.features.0.0.weight: checkpoint (16, 1, 3, 3) vs model (8, 1, 3, 3)",
         "backbone.width (checkpoint 16, this run 8)"),
    ],
)  # fmt: skip
def test_mismatched_stage1_ckpt_lists_tensors_and_config_keys(
    mulcon_job, tmp_path, extra, tensor, config_key
):
    job, _ = mulcon_job
    with pytest.raises(ValueError, match="does not fit this model") as err:
        _run_stage2(tmp_path, str(job / "stages" / "stage1" / "checkpoints" / "best.ckpt"), extra)
    msg = str(err.value)
    assert "stage1_ckpt=" in msg and tensor in msg and config_key in msg


# --------------------------------------------------------------------------- MulSupCon's yeast protocol
def _epoch_series(run_dir: Path, column: str) -> dict[int, float]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        return {int(r["epoch"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


@pytest.mark.slow
def test_yeast_protocol_checkpoint_choices(yeast_dir, tmp_path):
    job = tmp_path / "job"
    proc = run_train(
        ["method=yeast_mulsupcon", "trainer.max_epochs=5", "data.iterations_per_epoch=4", "seed=1",
         "progress_bar=false", f"hydra.run.dir={job}"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pre, fine = job / "stages" / "pretrain", job / "stages" / "finetune"
    res = json.loads((job / "metrics.json").read_text())
    # pre-training: seed 0 whatever the job's seed; the checkpoint passed on is that of the lowest epoch
    # training loss (spec §5.2), read here from the run's own metrics.csv
    assert res["stages"]["pretrain"]["run"]["seed"] == 0 and res["run"]["seed"] == 1
    train_loss = _epoch_series(pre, "train/loss_epoch")
    handed = load_ckpt(pre / "checkpoints" / "lowest_train_loss.ckpt")
    assert handed["epoch"] == min(train_loss, key=train_loss.get)  # stored epoch index = finished epochs - 1
    assert res["run"]["init_ckpt"] == str(pre / "checkpoints" / "lowest_train_loss.ckpt")
    # fine-tuning: the selection "dev_loss" is the checkpoint of the LAST strict dev-loss improvement
    dev = _epoch_series(fine, "val/bce")
    improved = [e for e in sorted(dev) if all(dev[e] < dev[k] for k in dev if k < e)]
    assert load_ckpt(fine / "checkpoints" / "best_dev_loss.ckpt")["epoch"] == improved[-1]
    sel = res["selections"]
    assert set(sel) == {"dev_loss", "val_mAP"} and sel["dev_loss"]["checkpoint"].endswith(
        "best_dev_loss.ckpt"
    )
    # the selection's own evaluation of best.ckpt agrees with the run's Lightning test of it
    assert sel["val_mAP"]["mAP"] == pytest.approx(res["test"]["mAP"], abs=1e-3)
    assert sel["dev_loss"]["yeast.mAP"] == pytest.approx(sel["dev_loss"]["mAP"], abs=1e-3)
    assert {f"yeast.{k}" for k in ("HA", "ebF1", "miF1", "maF1", "p_at_1")} <= set(sel["dev_loss"])


# --------------------------------------------------------------------------- stages shared by a sweep's jobs
def test_shared_stage_key_ignores_the_job_but_not_the_training(tmp_path):
    from mlcl.stage_share import stage_key

    def key(ovs, run_dir):
        return stage_key(stage_cfg(["method=yeast_mulsupcon", *ovs], "pretrain", run_dir, {"seed": 0}))

    base = key(["seed=1"], tmp_path / "a")
    # another fine-tune seed (pre-training is fixed to seed 0), another job directory: the same training
    assert key(["seed=2"], tmp_path / "b") == base
    assert key(["seed=1", "ckpt_path=last"], tmp_path / "c") == base
    # anything that changes the pre-training's config: another stage
    assert key(["seed=1", "+stages.pretrain.optimizer.lr=1e-3"], tmp_path / "a") != base
    assert key(["seed=1", "data.batch_size=16"], tmp_path / "a") != base


@pytest.mark.slow
def test_sweep_trains_a_shared_stage_once(tmp_path):
    from mlcl.compare.load import find_results

    sweep = tmp_path / "sweep"
    proc = run_train(
        ["-m", "method=mulsupcon", "seed=0,1", "data=digits_quick", *SMALL[:4],
         "data.source.sizes.train=64", "trainer.max_epochs=1", "progress_bar=false", "logger=none",
         "+stages.pretrain._shared_=true", "+stages.pretrain._fixed_.seed=0",
         "+stages.pretrain.data.augment.max_shift=1", f"hydra.sweep.dir={sweep}"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = sorted((sweep / "_shared_stages").glob("mulsupcon.pretrain-*"))
    assert len([d for d in shared if d.is_dir()]) == 1, shared
    pre = next(d for d in shared if d.is_dir())
    jobs = [json.loads((sweep / j / "metrics.json").read_text()) for j in ("0", "1")]
    assert [j["run"]["seed"] for j in jobs] == [0, 1]
    for job in jobs:  # both fine-tunings start from the one pre-training
        assert job["stages"]["pretrain"]["run"]["run_dir"] == str(pre)
        assert job["run"]["init_ckpt"] == str(pre / "checkpoints" / "last.ckpt")
    assert not (sweep / "0" / "stages" / "pretrain").exists()
    assert not (sweep / "1" / "stages" / "pretrain").exists()
    # trained once: one training log in its directory, and the second job says it reused it
    pre_log = (pre / "train.log").read_text()
    assert pre_log.count("starting from scratch") == 1 and pre_log.count("epoch 1/1 ") == 1
    assert "stage pretrain finished, skipped" in (sweep / "1" / "train.log").read_text()
    assert "stage pretrain finished, skipped" not in (sweep / "0" / "train.log").read_text()
    # the shared stage is part of the jobs, not a run of the sweep
    assert sorted(p.parent.name for p in find_results(sweep)) == ["0", "1"]


def test_shared_stage_lock_excludes_a_second_holder(tmp_path):
    import fcntl

    from mlcl.stage_share import locked

    run_dir = tmp_path / "_shared_stages" / "m.pretrain-abc"
    lock = run_dir.with_name(run_dir.name + ".lock")
    with locked(run_dir):
        with open(lock, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another job of the sweep must wait
    with open(lock, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the holder is done


def test_stages_only_the_command_line_created_are_dropped():
    def dropped(ovs):
        cfg = compose(ovs)
        with st.hydra_runtime(cfg) as task:
            names = st.drop_undeclared_stages(task, ovs)
            return names, list(task.stages) if task.get("stages") else []

    # a one-stage method in a sweep with MulSupCon's stage overrides stays one-stage
    assert dropped(["method=bce", "++stages.pretrain.loss.queue_size=64"]) == (["pretrain"], [])
    assert dropped(["method=bce", "+stages.pretrain._shared_=true"]) == (["pretrain"], [])
    # overrides of a stage the method has are kept, also when they add keys
    ms = ["method=mulsupcon", "++stages.pretrain.loss.queue_size=64", "+stages.finetune.x.y=1"]
    assert dropped(ms) == ([], ["pretrain", "finetune"])
    # deleting a stage's keys (here all of them) never makes it look undeclared
    emptied = [f"~stages.pretrain.{k}" for k in ("_groups_", "loss", "optimizer", "data")]
    assert dropped(["method=mulsupcon", *emptied]) == ([], ["pretrain", "finetune"])
    # a misspelt stage never becomes an extra training stage
    assert dropped(["method=mulsupcon", "++stages.pretrian.trainer.max_epochs=1"]) == (
        ["pretrian"],
        ["pretrain", "finetune"],
    )
    # and its override reaches no stage
    shared, scoped = st.split_overrides(
        ["method=mulsupcon", "++stages.pretrian.trainer.max_epochs=1", "seed=1"],
        ["pretrain", "finetune"],
        ["pretrian"],
    )
    assert shared == ["seed=1"] and scoped == {"pretrain": [], "finetune": []}
