"""Unit tests of the run record: run-directory plan, atomic checkpoints, relative checkpoint state,
appended CSV, the epoch-seeded sampler, RNG state, the skipped-step budget, the callbacks group."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mlcl import runs
from mlcl.ckpt_io import AtomicCheckpointIO, RunCheckpoint, remove_stale_tmp
from mlcl.errors import UserError
from tests.conftest import REPO, compose


# ---------------------------------------------------------------- run-directory plan
def make_run(root: Path, finished: bool = False, last: bool = True) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    (root / "metrics.csv").write_text("epoch\n0\n")
    if last:
        (root / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if finished:
        (root / "metrics.json").write_text("{}")
    return root


def test_fresh_run_in_empty_dir(tmp_path: Path):
    plan = runs.plan_run(tmp_path, None, env={})
    assert plan.run_dir == tmp_path.resolve() and not plan.resume and not plan.finished


def test_fresh_run_refused_where_another_run_wrote(tmp_path: Path):
    for name in ("metrics.json", "checkpoints", "metrics.csv", "config.yaml", "train.log"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / name).mkdir() if name == "checkpoints" else (d / name).write_text("")
        with pytest.raises(UserError, match="already holds results"):
            runs.plan_run(d, None, env={})


def test_ckpt_path_last(tmp_path: Path):
    running = make_run(tmp_path / "running")
    plan = runs.plan_run(running, "last", env={})
    assert plan.ckpt_path == running.resolve() / "checkpoints" / "last.ckpt" and not plan.finished
    done = make_run(tmp_path / "done", finished=True)
    assert runs.plan_run(done, "last", env={}).finished
    # killed before its first checkpoint: the same run starts again from scratch
    early = make_run(tmp_path / "early", last=False)
    plan = runs.plan_run(early, "LAST", env={})
    assert not plan.resume and not plan.finished and plan.run_dir == early.resolve()


def test_slurm_requeue_means_last(tmp_path: Path):
    job = make_run(tmp_path / "job")
    assert runs.plan_run(job, None, env={"SLURM_RESTART_COUNT": "1"}).resume
    with pytest.raises(UserError):  # first start of a job whose directory is taken
        runs.plan_run(job, None, env={"SLURM_RESTART_COUNT": "0"})


def test_ckpt_path_file_resumes_into_its_own_run(tmp_path: Path):
    owner = make_run(tmp_path / "a")
    ckpt = owner / "checkpoints" / "last.ckpt"
    fresh = tmp_path / "hydra_dir"
    fresh.mkdir()
    plan = runs.plan_run(fresh, str(ckpt), env={})
    assert plan.run_dir == owner.resolve() and plan.ckpt_path == ckpt.resolve()
    other = make_run(tmp_path / "b", finished=True)
    with pytest.raises(UserError, match="holds another run"):
        runs.plan_run(other, str(ckpt), env={})
    done = make_run(tmp_path / "c", finished=True)
    assert runs.plan_run(fresh, str(done / "checkpoints" / "last.ckpt"), env={}).finished
    with pytest.raises(UserError, match="does not exist"):
        runs.plan_run(fresh, str(tmp_path / "nope.ckpt"), env={})
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes(b"x")
    plan = runs.plan_run(fresh, str(loose), env={})
    assert plan.run_dir == fresh.resolve() and plan.ckpt_path == loose.resolve()


# ---------------------------------------------------------------- atomic checkpoints
KILL_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from mlcl.ckpt_io import AtomicCheckpointIO
    path = sys.argv[1]
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.zeros(3)}, path)
    def half_then_die(obj, f, *a, **k):
        f.write(b"PK\\x03\\x04 partial")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = half_then_die
    io.save_checkpoint({"w": torch.ones(3)}, path)
    """
)


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path: Path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(path)], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))  # the previous one
    stray = [p for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert len(stray) == 1 and stray[0].name.startswith(".last.ckpt.tmp-")  # same directory
    assert remove_stale_tmp(path.parent) == stray and sorted(path.parent.iterdir()) == [path]


def test_failed_save_leaves_no_partial_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "best.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(2)}, path)

    def fail(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, path)
    monkeypatch.undo()
    assert sorted(tmp_path.iterdir()) == [path]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(2))


# ---------------------------------------------------------------- relative checkpoint state
def test_checkpoint_state_is_relative_and_reresolved(tmp_path: Path):
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    cb = RunCheckpoint(dirpath=old, filename="best", monitor="val/mAP", mode="max", save_last=True)
    cb.best_model_path, cb.last_model_path = str(old / "best.ckpt"), str(old / "last.ckpt")
    cb.kth_best_model_path = str(old / "best.ckpt")
    cb.best_k_models = {str(old / "best.ckpt"): torch.tensor(40.0)}
    cb.best_model_score = torch.tensor(40.0)
    state = cb.state_dict()
    assert state["best_model_path"] == "best.ckpt" and list(state["best_k_models"]) == ["best.ckpt"]
    assert str(tmp_path) not in repr(state)
    new.mkdir(parents=True)
    for name in ("best.ckpt", "last.ckpt"):
        (new / name).write_bytes(b"x")
    moved = RunCheckpoint(dirpath=new, filename="best", monitor="val/mAP", mode="max", save_last=True)
    moved.load_state_dict(state)
    assert moved.best_model_path == str(new.resolve() / "best.ckpt")
    assert moved.last_model_path == str(new.resolve() / "last.ckpt")
    assert list(moved.best_k_models) == [str(new.resolve() / "best.ckpt")]
    assert float(moved.best_model_score) == 40.0
    # a state written with absolute paths (older runs) is re-based onto the new directory too
    legacy = {**state, "dirpath": str(old), "best_model_path": str(old / "best.ckpt")}
    legacy["best_k_models"] = {str(old / "best.ckpt"): torch.tensor(40.0)}
    again = RunCheckpoint(dirpath=new, filename="best", monitor="val/mAP", mode="max")
    again.load_state_dict(legacy)
    assert again.best_model_path == str(new.resolve() / "best.ckpt")


# ---------------------------------------------------------------- metrics.csv appended
def test_csv_logger_appends_to_existing_metrics(tmp_path: Path):
    from mlcl.runlog import AppendingCSVLogger

    first = AppendingCSVLogger(save_dir=tmp_path, name="", version="")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_metrics({"train/loss": 0.5}, step=1)
    first.save()
    second = AppendingCSVLogger(save_dir=tmp_path, name="", version="")
    second.log_metrics({"train/loss": 0.25, "val/mAP": 50.0}, step=2)  # a new column
    second.save()
    with (tmp_path / "metrics.csv").open(newline="") as f:
        rows = [{k: v for k, v in r.items() if v} for r in csv.DictReader(f)]
    assert rows == [
        {"step": "0", "train/loss": "1.0"},
        {"step": "1", "train/loss": "0.5"},
        {"step": "2", "train/loss": "0.25", "val/mAP": "50.0"},
    ]


# ---------------------------------------------------------------- data order and RNG state
def test_shuffle_depends_on_seed_and_epoch_only():
    from mlcl.rng import EpochShuffleSampler

    data = list(range(50))

    def order(seed: int, epoch: int, global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)  # the global RNG must not matter
        s = EpochShuffleSampler(data, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 3, 1) == order(0, 3, 2)
    assert sorted(order(0, 3, 1)) == data
    assert order(0, 3, 1) != order(0, 4, 1) and order(0, 3, 1) != order(1, 3, 1)
    # without set_epoch each pass is the next epoch
    s = EpochShuffleSampler(data, seed=0)
    assert [list(s), list(s)] == [order(0, 0, 5), order(0, 1, 5)]
    # a fixed number of iterations per epoch: concatenated permutations
    long = list(EpochShuffleSampler(data, seed=0, num_samples=120))
    assert len(long) == 120 and sorted(long[:50]) == data and sorted(long[50:100]) == data


def test_datamodule_train_loader_uses_the_epoch_sampler():
    from mlcl.rng import EpochShuffleSampler

    cfg = compose(["data.source.sizes={train:64,val:16,test:16}"])
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, missing={"mode": "none"}, num_views=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert (
        isinstance(loader.sampler, EpochShuffleSampler)
        and loader.generator is loader.sampler.loader_generator
    )
    batches = [b["index"] for b in loader]
    torch.manual_seed(123)
    loader.sampler.set_epoch(0)
    assert all(torch.equal(a, b["index"]) for a, b in zip(batches, loader))


def test_rng_state_roundtrip_and_epoch_reseed():
    from mlcl.rng import RNGState

    cb = RNGState(seed=7)
    ckpt: dict = {}
    cb.on_save_checkpoint(None, None, ckpt)
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(5)  # move on
    cb.on_load_checkpoint(None, None, ckpt)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws

    def epoch_draws(epoch: int, rank: int = 0) -> tuple:
        cb.on_train_epoch_start(SimpleNamespace(current_epoch=epoch, global_rank=rank), None)
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    first = epoch_draws(2)
    torch.rand(7)
    assert epoch_draws(2) == first and epoch_draws(3) != first and epoch_draws(2, rank=1) != first


# ---------------------------------------------------------------- skipped-step budget
def test_skip_budget_stops_a_diverged_run():
    from mlcl.callbacks import SkipBudget

    module = SimpleNamespace(skipped_steps=0)
    budget = SkipBudget(max_fraction=0.25, min_steps=8)
    budget.on_train_start(None, module)
    for step in range(8):  # 2 of 8 skipped: exactly the budget, allowed
        module.skipped_steps += step in (3, 5)
        budget.on_train_batch_end(None, module)
    budget.on_train_epoch_end(None, module)
    assert (budget.seen, budget.skipped) == (8, 2)
    resumed = SkipBudget(max_fraction=0.25, min_steps=8)
    resumed.load_state_dict(budget.state_dict())
    fresh_module = SimpleNamespace(skipped_steps=0)  # a resumed module counts from 0 again
    resumed.on_train_start(None, fresh_module)
    fresh_module.skipped_steps = 1
    with pytest.raises(UserError, match="3 of 9 training steps") as err:
        resumed.on_train_batch_end(None, fresh_module)
    assert "model.max_skipped_fraction" in str(err.value)


def test_skip_budget_checks_at_epoch_end_before_min_steps():
    from mlcl.callbacks import SkipBudget

    module = SimpleNamespace(skipped_steps=0)
    budget = SkipBudget(max_fraction=0.1, min_steps=50)
    budget.on_train_start(None, module)
    for _ in range(4):
        module.skipped_steps += 1
        budget.on_train_batch_end(None, module)  # under min_steps: no decision yet
    with pytest.raises(UserError):
        budget.on_train_epoch_end(None, module)


# ---------------------------------------------------------------- callbacks config group
def _callbacks(overrides: list[str], **kw) -> dict[str, object]:
    from mlcl.callbacks import build_callbacks

    cfg = compose(overrides)
    return {type(c).__name__: c for c in build_callbacks(cfg, Path("/run"), **kw)}


def test_callbacks_group_defaults_and_overrides():
    cbs = _callbacks([])
    assert set(cbs) == {"RunCheckpoint", "LearningRateMonitor", "RichProgressBar"}
    ckpt = cbs["RunCheckpoint"]
    assert ckpt.dirpath == "/run/checkpoints" and ckpt.monitor == "val/mAP" and ckpt.save_last
    assert ckpt.save_top_k == 1 and ckpt.filename == "best"
    assert _callbacks(["callbacks.model_checkpoint.save_top_k=3"])["RunCheckpoint"].save_top_k == 3
    assert "RichProgressBar" not in _callbacks(["~callbacks.progress_bar"])
    assert "RichProgressBar" not in _callbacks(["progress_bar=false"])  # the old key still works
    assert "LearningRateMonitor" not in _callbacks([], with_logger=False)
    assert "RunCheckpoint" not in _callbacks([], debug=True)
    ema = _callbacks(["ema.decay=0.9", "ema.evaluate=raw"])["EMA"]
    assert (ema.decay, ema.evaluate) == (0.9, "raw")
    stop = _callbacks(["callbacks=early_stop", "monitor=val/OF1"])["EarlyStopping"]
    assert stop.monitor == "val/OF1" and stop.patience == 10
    extra = _callbacks(["+callbacks.timer={_target_:lightning.pytorch.callbacks.Timer}"])
    assert "Timer" in extra


def test_debug_configs_compose():
    for name, key, value in (("fdr", "fast_dev_run", True), ("overfit", "overfit_batches", 3)):
        cfg = compose([f"debug={name}"])
        assert cfg.trainer[key] == value and cfg.debug_run and cfg.task_name == "debug"
        assert cfg.callbacks.model_checkpoint is None and cfg.logger is None
    assert compose(["debug=profile"]).trainer.profiler == "simple"


def test_other_ddp_ranks_follow_rank_zero(tmp_path: Path):
    taken_dir = make_run(tmp_path / "run", last=False)  # rank 0 already started writing here
    for env in (
        {"LOCAL_RANK": "1"},
        {"RANK": "3"},
        {"NODE_RANK": "1", "LOCAL_RANK": "0"},
        {"SLURM_PROCID": "2"},
    ):
        assert runs.plan_run(taken_dir, None, env=env).run_dir == taken_dir.resolve()
    with pytest.raises(UserError):
        runs.plan_run(taken_dir, None, env={"LOCAL_RANK": "0", "SLURM_PROCID": "0"})


@pytest.mark.parametrize("on_train_epoch_end", [False, True])
def test_last_ckpt_holds_the_final_state_when_the_monitor_stops_improving(tmp_path: Path, on_train_epoch_end):
    from tests import looptools

    dm = looptools.datamodule()  # 24 training mosaics, batch 8: 3 steps per epoch
    model = looptools.module(dm)
    # "epoch" is always among the monitored candidates: with mode=min only epoch 0 is ever the best
    cb = RunCheckpoint(
        dirpath=tmp_path, filename="best", monitor="epoch", mode="min", save_last=True,
        save_on_train_epoch_end=on_train_epoch_end,
    )  # fmt: skip
    trainer = looptools.trainer(3, callbacks=[cb], enable_checkpointing=True)
    trainer.fit(model, dm)
    best = torch.load(tmp_path / "best.ckpt", weights_only=False)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert best["global_step"] == 3 and last["global_step"] == 9 == trainer.global_step
    for key, value in model.state_dict().items():  # the weights training ended with
        assert torch.equal(last["state_dict"][key], value), key
