"""MulCon two-stage training as configuration: experiments, stage-two initialisation, the pipeline CLI.

Runs on a small slice of the embedded digits on CPU. One real pipeline run (``python -m
mlcl.mulcon_pipeline``, stages as ``python -m mlcl.train`` subprocesses) is shared by most tests; the
expected learning rates and loaded tensors are written down from spec mulcon.md §8/§17.5, not read
off the code under test.
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

from mlcl import mulcon_pipeline as mp
from mlcl.errors import UserError
from tests.conftest import REPO

SMALL = [
    "data=digits",
    "backbone=small_cnn",
    "backbone.width=16",
    "trainer=cpu",
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
VIEWS = ["stage2.data.augment.max_shift=1"]  # the two views differ by a random shift


def run_cli(args: list[str], module: str = "mlcl.mulcon_pipeline") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("mulcon") / "pipe"
    proc = run_cli(["--out", str(out), *SMALL, *VIEWS])
    if proc.returncode != 0:
        raise AssertionError(f"pipeline failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return out, proc


def stage_task(overrides: list[str], run_dir: Path):
    """Composed task config of ``overrides`` (+ Hydra runtime, as ``python -m mlcl.train`` has it)."""
    return mp.hydra_runtime(mp.compose(overrides), run_dir)


def build(task):
    """Datamodule + MLCLModule exactly as ``mlcl.train.run`` builds them (no training)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mlcl.train import build_module, num_views

    dm = instantiate(
        task.data, missing=OmegaConf.to_container(task.missing, resolve=True), num_views=num_views(task)
    )
    dm.setup("fit")
    return build_module(task, dm)


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- the pipeline, end to end
def test_pipeline_runs_both_stages_and_prints_test_map(pipeline_run):
    out, proc = pipeline_run
    printed = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"MulCon (stage[12]) test mAP = ([\d.]+)", proc.stdout)
    }
    assert set(printed) == {"stage1", "stage2"}
    summary = json.loads((out / "pipeline.json").read_text())
    for stage in ("stage1", "stage2"):
        res = json.loads((out / stage / "metrics.json").read_text())
        assert printed[stage] == pytest.approx(res["test"]["mAP"], abs=0.006)
        assert summary[stage]["test"]["mAP"] == pytest.approx(res["test"]["mAP"])
        assert summary[stage]["run_dir"] == str(out / stage)
        # a real Hydra run of the train entry point
        overrides = yaml.safe_load((out / stage / ".hydra" / "overrides.yaml").read_text())
        assert f"experiment=mulcon_{stage}" in overrides
        assert 0.0 <= res["test"]["mAP"] <= 100.0
    # stage one validated once, so its best-by-val checkpoint exists and is the one handed over
    assert summary["stage1_ckpt"] == str(out / "stage1" / "checkpoints" / "best.ckpt")
    assert summary["stage1_ckpt_reason"].startswith("best val/mAP = ")
    assert f"initialised from {summary['stage1_ckpt']}" in proc.stdout


def test_stage_configs_follow_the_spec_and_cli_wins(pipeline_run):
    out, _ = pipeline_run
    s1 = yaml.safe_load((out / "stage1" / "config.yaml").read_text())
    s2 = yaml.safe_load((out / "stage2" / "config.yaml").read_text())
    ckpt = str(out / "stage1" / "checkpoints" / "best.ckpt")
    for cfg in (s1, s2):  # the experiments pick resnet101 and 448 px; the command line wins
        assert cfg["backbone"]["name"] == "small_cnn" and cfg["data_name"] == "digits"
    assert s1["loss"]["con_weight"] == 0.0 and s1["data"]["num_views"] in (None, 1)  # null: the loss's 1
    assert s1["optimizer"]["_target_"] == "torch.optim.AdamW" and s1["optimizer"]["lr"] == pytest.approx(2e-4)
    assert s1["init_ckpt"] is None and s1["data"]["augment"]["max_shift"] == 0
    assert s2["stage1_ckpt"] == ckpt and s2["init_ckpt"] == ckpt
    assert s2["init_weights"] == "ema" and s2["init_modules"] == ["backbone", "head"]
    assert s2["loss"]["con_weight"] == 0.5 and s2["data"]["num_views"] == 2
    assert s2["data"]["augment"]["max_shift"] == 1
    assert s2["optimizer"]["_target_"] == "torch.optim.SGD" and s2["optimizer"]["momentum"] == 0.9
    assert s2["scheduler"]["name"] == "step" and s2["ema"]["decay"] == 0.9
    # the train entry point itself did the loading (its Hydra job log)
    logged = (out / "stage2" / "train.log").read_text()
    assert f"from stage1_ckpt={ckpt} [ema weights]" in logged
    # no projector in stage one; a projector (and contrastive term) in stage two
    sd1 = load_ckpt(out / "stage1" / "checkpoints" / "last.ckpt")["state_dict"]
    sd2 = load_ckpt(out / "stage2" / "checkpoints" / "last.ckpt")["state_dict"]
    assert not any(k.startswith("loss_fn.") for k in sd1)
    assert {"loss_fn.projector.fc1.weight", "loss_fn.projector.fc2.weight"} <= set(sd2)


def test_stage2_initialisation_is_the_stage1_ema_weights(pipeline_run, tmp_path):
    out, _ = pipeline_run
    from mlcl.checkpoints import load_init_weights

    ckpt_path = out / "stage1" / "checkpoints" / "best.ckpt"
    ckpt = load_ckpt(ckpt_path)
    ovs = mp.stage_overrides("stage2", mp.split_overrides(SMALL), tmp_path / "s2", str(ckpt_path))
    with stage_task(ovs, tmp_path / "s2") as task:
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
    for k, v in module.loss_fn.projector.state_dict().items():  # the projector stays fresh
        assert torch.equal(v, fresh_projector[k])
    assert not any(k.startswith("loss_fn.") for k in ckpt["ema"])


# --------------------------------------------------------------------------- parameter groups
def _group_lrs(module) -> tuple[dict[str, float], list[dict]]:
    opt = module.configure_optimizers()
    names = {id(p): n for n, p in module.named_parameters()}
    lrs: dict[str, float] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert names[id(p)] not in lrs, "a parameter in two groups"
            lrs[names[id(p)]] = g["lr"]
    return lrs, opt.param_groups


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_parameter_groups_follow_the_reference_multipliers(stage, tmp_path):
    # spec §8: stage one AdamW lr 2e-4, backbone x0.1, whole head x1; stage two SGD lr 0.01, backbone and
    # head x0.1, classifier and projector x1; weight decay 1e-4 everywhere
    expected_lr = {
        "stage1": {"backbone": 2e-5, "head": 2e-4, "classifier": 2e-4},
        "stage2": {"backbone": 1e-3, "head": 1e-3, "classifier": 1e-2, "projector": 1e-2},
    }[stage]
    ovs = mp.stage_overrides(stage, mp.split_overrides([*SMALL, "scheduler=none"]), tmp_path, "unused.ckpt")
    with stage_task(ovs, tmp_path) as task:
        module = build(task)
    lrs, groups = _group_lrs(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(lrs) == trainable
    for name, lr in lrs.items():
        if name.startswith("backbone."):
            part = "backbone"
        elif name.startswith("head.classifier."):
            part = "classifier"
        elif name.startswith("head."):
            part = "head"
        else:
            assert name.startswith("loss_fn.projector.")
            part = "projector"
        assert lr == pytest.approx(expected_lr[part], rel=1e-12), name
    assert ("projector" in expected_lr) == any(n.startswith("loss_fn.projector.") for n in lrs)
    for g in groups:
        assert g["weight_decay"] == pytest.approx(1e-4)
        if stage == "stage2":
            assert g["momentum"] == 0.9 and not g["nesterov"]


# --------------------------------------------------------------------------- clear errors
def test_missing_stage1_ckpt_names_the_key(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        ["experiment=mulcon_stage2", *SMALL, f"hydra.run.dir={run_dir}"],
        module="mlcl.train",
    )
    assert proc.returncode != 0
    assert "mlcl: error: stage1_ckpt is required" in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


def _run_stage2(tmp_path: Path, ckpt: str, extra: list[str] = ()) -> Path:
    """``mlcl.train.run`` of stage two in this process; expected to raise before any training."""
    from mlcl.train import run

    run_dir = tmp_path / "s2"
    ovs = mp.stage_overrides("stage2", mp.split_overrides([*SMALL, *extra]), run_dir, ckpt)
    with stage_task(ovs, run_dir) as task:
        try:
            run(task)
        finally:
            assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()
    return run_dir


def test_nonexistent_stage1_ckpt(tmp_path):
    with pytest.raises(UserError, match=r"/nope/stage1\.ckpt \(stage1_ckpt\)"):
        _run_stage2(tmp_path, "/nope/stage1.ckpt")


def test_stage1_ckpt_without_ema_weights(pipeline_run, tmp_path):
    out, _ = pipeline_run
    ckpt = load_ckpt(out / "stage1" / "checkpoints" / "best.ckpt")
    del ckpt["ema"]
    path = tmp_path / "no_ema.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="no EMA weights") as err:
        _run_stage2(tmp_path, str(path))
    msg = str(err.value)
    assert "stage1_ckpt" in msg and "init_weights=raw" in msg and "ema.decay" in msg


@pytest.mark.parametrize(
    ("extra", "tensor", "config_key"),
    [
        (["loss.head_kwargs.embed_dim=16"], "head.label_queries: checkpoint (10, 32) vs model (10, 16)",
         "loss.head_kwargs.embed_dim (checkpoint 32, this run 16)"),
        (["loss.head_kwargs.num_pixel_blocks=2"], "head.pixel_blocks.1.fc_q.weight",
         "loss.head_kwargs.num_pixel_blocks (checkpoint 1, this run 2)"),
        (["backbone.width=8"], "backbone.features.0.0.weight: checkpoint (16, 1, 3, 3) vs model (8, 1, 3, 3)",
         "backbone.width (checkpoint 16, this run 8)"),
    ],
)  # fmt: skip
def test_mismatched_stage1_ckpt_lists_tensors_and_config_keys(
    pipeline_run, tmp_path, extra, tensor, config_key
):
    out, _ = pipeline_run
    with pytest.raises(ValueError, match="does not fit this model") as err:
        _run_stage2(tmp_path, str(out / "stage1" / "checkpoints" / "best.ckpt"), extra)
    msg = str(err.value)
    assert "stage1_ckpt=" in msg and tensor in msg and config_key in msg


def test_stage1_ckpt_with_other_classes(pipeline_run, tmp_path):
    out, _ = pipeline_run
    ckpt = load_ckpt(out / "stage1" / "checkpoints" / "best.ckpt")
    for sd in (ckpt["ema"], ckpt["state_dict"]):  # as if stage one had 9 classes
        for k in ("head.label_queries", "head.classifier.weight", "head.classifier.bias"):
            sd[k] = sd[k][:9].clone()
    ckpt["hyper_parameters"]["num_classes"] = 9
    path = tmp_path / "nine.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="does not fit this model") as err:
        _run_stage2(tmp_path, str(path))
    msg = str(err.value)
    assert "head.classifier.weight: checkpoint (9, 32) vs model (10, 32)" in msg
    assert "num_classes" in msg and "checkpoint 9, this run 10" in msg


# --------------------------------------------------------------------------- pipeline checks (no training)
def test_pipeline_never_overwrites_existing_runs(pipeline_run):
    out, _ = pipeline_run
    before = {p: p.read_bytes() for p in out.rglob("*.json")}
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        mp.run_pipeline([*SMALL], out, in_process=True)
    assert {p: p.read_bytes() for p in out.rglob("*.json")} == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([*SMALL, "stage1.loss.head_kwargs.embed_dim=16"], "head_kwargs.embed_dim (stage1 16, stage2 32)"),
        ([*SMALL, "stage2.backbone.width=8"], "backbone.width (stage1 16, stage2 8)"),
        ([*SMALL, "stage2.loss.head_kwargs.nope=1"], "stage2: Could not override 'loss.head_kwargs.nope'"),
        ([*SMALL, "stage1.ema.decay=null"], "ema.decay is null"),
        (["data=coco", "backbone=small_cnn"], "stage1 needs a value for data.root"),
    ],
)
def test_pipeline_checks_both_configs_before_training(tmp_path, overrides, message):
    with pytest.raises(mp.PipelineError) as err:
        mp.run_pipeline(overrides, tmp_path / "out", in_process=True)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_split_overrides():
    groups = mp.split_overrides(["a=1", "stage1.b=2", "+stage2.c.d=3", "~stage2.e", "stage3.f=4"])
    assert groups == {"shared": ["a=1", "stage3.f=4"], "stage1": ["b=2"], "stage2": ["+c.d=3", "~e"]}
    for bad in ("stage1_ckpt=x.ckpt", "stage2.init_ckpt=x", "experiment=mulcon_stage2", "hydra.run.dir=/x"):
        with pytest.raises(mp.PipelineError, match="the pipeline sets"):
            mp.split_overrides([bad])
    with pytest.raises(mp.PipelineError, match="multirun"):
        mp.split_overrides(["-m", "seed=0,1"])


def test_select_stage1_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(b"x")
    best = ckpts / "best.ckpt"
    best.write_bytes(b"x")
    path, reason = mp.select_stage1_checkpoint(tmp_path, {"best_ckpt": str(best), "best_val": 41.234})
    assert path == best and reason == "best val/mAP = 41.23"
    # no validation score (e.g. no val loop): the last checkpoint, said so
    path, reason = mp.select_stage1_checkpoint(tmp_path, {"best_ckpt": None, "best_val": None})
    assert path == ckpts / "last.ckpt" and "last" in reason
    (ckpts / "last.ckpt").unlink()
    best.unlink()
    with pytest.raises(mp.PipelineError, match="without a checkpoint"):
        mp.select_stage1_checkpoint(tmp_path, {"best_ckpt": str(best)})


def test_hydra_value_quotes_paths():
    assert mp.hydra_value("/a/b-c_d.ckpt") == "/a/b-c_d.ckpt"
    assert mp.hydra_value("/a b/c=d.ckpt") == "'/a b/c=d.ckpt'"
    with pytest.raises(mp.PipelineError):
        mp.hydra_value("/a/${x}.ckpt")
    cfg = mp.compose(["experiment=mulcon_stage2", f"stage1_ckpt={mp.hydra_value('/a b/c=d.ckpt')}"])
    assert cfg.stage1_ckpt == "/a b/c=d.ckpt"


def test_dry_run_prints_commands_and_creates_nothing(tmp_path, capsys):
    assert mp.main(["--out", str(tmp_path / "out"), *SMALL, "--dry-run", "stage2.trainer.max_epochs=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    s1 = next(line for line in lines if line.startswith("stage 1:"))
    s2 = next(line for line in lines if line.startswith("stage 2:"))
    assert "experiment=mulcon_stage1" in s1 and "trainer.max_epochs=3" not in s1
    assert "experiment=mulcon_stage2" in s2 and s2.endswith(f"hydra.run.dir={tmp_path / 'out' / 'stage2'}")
    assert "trainer.max_epochs=3" in s2 and "stage1_ckpt=" in s2
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line(tmp_path, capsys):
    assert mp.main(["--out", str(tmp_path), *SMALL, "stage1.loss.head_kwargs.embed_dim=16"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlcl-mulcon: error:") and "loss.head_kwargs.embed_dim" in err


# --------------------------------------------------------------------------- in-process mode
def test_in_process_pipeline(tmp_path, capsys):
    from hydra.core.hydra_config import HydraConfig

    tiny = [*SMALL, *VIEWS, "trainer.limit_train_batches=2"]
    summary = mp.run_pipeline(tiny, tmp_path / "pipe", in_process=True)
    assert not HydraConfig.initialized()  # the Hydra state is restored for whatever runs next
    printed = capsys.readouterr().out
    for stage in ("stage1", "stage2"):
        res = json.loads((tmp_path / "pipe" / stage / "metrics.json").read_text())
        assert summary[stage]["test"]["mAP"] == pytest.approx(res["test"]["mAP"])
        assert f"MulCon {stage} test mAP = {res['test']['mAP']:.2f}" in printed
    s2 = yaml.safe_load((tmp_path / "pipe" / "stage2" / "config.yaml").read_text())
    assert (
        s2["init_ckpt"]
        == summary["stage1_ckpt"]
        == str(tmp_path / "pipe" / "stage1" / "checkpoints" / "best.ckpt")
    )


def test_failed_or_interrupted_stage_stops_the_pipeline(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, fake_run.status)

    monkeypatch.setattr(mp.subprocess, "run", fake_run)
    fake_run.status = 3
    with pytest.raises(mp.PipelineError, match=r"stage1 failed \(exit status 3"):
        mp._run_subprocess("stage1", ["experiment=mulcon_stage1"], tmp_path)
    # Lightning ends a SIGTERM'd run with status 0 and no metrics.json: not a finished stage
    fake_run.status = 0
    with pytest.raises(mp.PipelineError, match="ended without writing .*metrics.json"):
        mp._run_subprocess("stage1", ["experiment=mulcon_stage1"], tmp_path)
    assert calls[0][:3] == [sys.executable, "-m", "mlcl.train"] and calls[0][3] == "experiment=mulcon_stage1"
    (tmp_path / "metrics.json").write_text(json.dumps({"test": {"mAP": 50.0}}))
    assert mp._run_subprocess("stage1", [], tmp_path)["test"]["mAP"] == 50.0
