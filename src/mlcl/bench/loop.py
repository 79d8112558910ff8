"""``mlcl-bench loop`` engine: mlcl's whole training loop against a bare PyTorch loop on the same model.

The mlcl side is ``mlcl.train.run`` itself, composed from the real configs (default callbacks, CSV
logging, progress bar, validation, checkpointing), with one extra callback that clocks the training
steps. The bare side builds the same module, optimiser (parameter groups included) and loss plugin and
runs forward / loss / backward / step on batches indexed straight out of the training tensors, without
Lightning. Both run in this process; the caller interleaves them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch

from mlcl.bench.measure import background_load
from mlcl.threads import cpu_snapshot

FIRST_STEP_MARK = "MLCL_BENCH_FIRST_STEP"


@dataclass(frozen=True)
class LoopCase:
    """One model of the loop bench: its config overrides and the length of one timed run."""

    key: str
    label: str
    overrides: tuple[str, ...]
    epochs: int
    #: training batches per epoch in a timed run (None: the config's epoch)
    batches: int | None = None
    needs_yeast: bool = False
    #: thread sweep, background-load run and time to first step (else: the default setting only)
    full: bool = True


CASES: dict[str, LoopCase] = {
    "yeast-finetune": LoopCase(
        "yeast-finetune",
        "yeast fine-tune MLP 103-256-512-256, B=32",
        ("experiment=mulsupcon_finetune", "pretrain_ckpt=null"),
        epochs=4,
        needs_yeast=True,
    ),
    "digits": LoopCase("digits", "default benchmark: small CNN, data=digits", (), epochs=1),
    "yeast-pretrain": LoopCase(
        "yeast-pretrain",
        "yeast MulSupCon pre-training, B=64 x 2 views",
        ("experiment=mulsupcon_pretrain",),
        epochs=1,
        batches=300,
        needs_yeast=True,
        full=False,
    ),
}


@dataclass
class Timing:
    """One timed run: ``steps`` training steps in ``seconds`` (first step to the end of training)."""

    loop: str  # "bare" | "mlcl"
    setting: str  # the thread setting asked for: "1", "2", "auto"
    threads: int | None = None  # what torch ran with
    steps: int = 0
    seconds: float = math.nan
    #: cores used by other processes while it ran (the artificial load included)
    background: float | None = None
    loaded: bool = False
    error: str | None = None
    #: CPU seconds this process used over the same steps (all its threads)
    cpu_s: float = math.nan
    skipped: bool = False

    @property
    def steps_per_s(self) -> float | None:
        if self.error or not self.steps or not self.seconds > 0:
            return None
        return self.steps / self.seconds

    @property
    def steps_per_cpu_s(self) -> float | None:
        """Steps per CPU-second: what one free core would give a one-thread run, load or not."""
        if self.error or not self.steps or not self.cpu_s > 0:
            return None
        return self.steps / self.cpu_s


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------------------------- config
def conf_dir() -> Path:
    import mlcl

    return Path(mlcl.__file__).resolve().parent / "conf"


def compose(overrides: Sequence[str]) -> Any:
    """The ``train`` config (with its ``hydra`` node) as ``python -m mlcl.train`` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@contextlib.contextmanager
def hydra_job(cfg: Any, run_dir: Path) -> Iterator[Any]:
    """Make ``cfg`` the current Hydra job writing into ``run_dir`` (as ``hydra.main`` does) and yield the
    task config; the previous Hydra state comes back afterwards."""
    from omegaconf import open_dict, read_write

    from mlcl.stages import hydra_runtime

    cfg = copy.deepcopy(cfg)
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(run_dir.resolve())
    with hydra_runtime(cfg) as task:
        yield task


def run_overrides(case: LoopCase, quick: bool) -> list[str]:
    """Overrides of one timed mlcl run of ``case`` (shorter epochs in ``quick`` mode, no test pass)."""
    ovs = [*case.overrides, f"trainer.max_epochs={1 if quick else case.epochs}", "test=false"]
    batches = 3 if quick else case.batches
    if batches:
        ovs.append(f"trainer.limit_train_batches={batches}")
    if quick:
        ovs.append("trainer.limit_val_batches=1")
    return ovs


def write_synthetic_yeast(folder: Path, seed: int = 0) -> Path:
    """Random data shaped like the yeast files (1200/300/917 rows, 103 features, 14 labels) in ``folder``."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    for split, rows in (("train", 1200), ("val", 300), ("test", 917)):
        x = rng.standard_normal((rows, 103)).astype(np.float32)
        y = (rng.random((rows, 14)) < 0.3).astype(np.int64)
        y[np.arange(rows), rng.integers(0, 14, rows)] = 1
        with h5py.File(folder / f"yeast_official_{split}.hdf5", "w") as f:
            f["feature"], f["target"] = x, y
    return folder


def yeast_present(cfg: Any) -> bool:
    from omegaconf import OmegaConf

    path = OmegaConf.select(cfg, "data.source.train_path", default=None)
    return bool(path) and Path(str(path)).is_file()


# ------------------------------------------------------------------------------------------ mlcl loop
class StepClock(L.Callback):
    """Clocks the training steps of a fit; asks the trainer to stop once ``max_s`` seconds have passed."""

    last: ClassVar[StepClock | None] = None
    max_s: ClassVar[float] = math.inf

    def __init__(self) -> None:
        StepClock.last = self
        self.steps, self.threads = 0, None
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.cpu_first = self.cpu_end = math.nan

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.threads = torch.get_num_threads()

    def on_train_batch_start(self, *_: Any) -> None:
        if self.t_first is None:
            self.t_first, self.cpu_first = time.perf_counter(), _cpu()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self.steps += 1
        if time.perf_counter() - (self.t_first or 0.0) > self.max_s:
            trainer.should_stop = True

    def on_train_end(self, *_: Any) -> None:
        self.t_end, self.cpu_end = time.perf_counter(), _cpu()


class FirstStepMarker(L.Callback):
    """Prints a marker after the first training step and ends the process (time-to-first-step runs)."""

    def on_train_batch_end(self, *_: Any) -> None:
        print(FIRST_STEP_MARK, flush=True)
        os._exit(0)


def _quiet() -> contextlib.ExitStack:
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def run_mlcl(overrides: Sequence[str], setting: str, workdir: Path, max_s: float = math.inf) -> Timing:
    """One ``mlcl.train.run`` with ``trainer.threads=setting``; steps/s from the first step to the end
    of training (validation and checkpoint writes included)."""
    from mlcl import train

    timing = Timing("mlcl", setting)
    run_dir = Path(tempfile.mkdtemp(prefix="mlcl-", dir=workdir))
    clock = "+callbacks.bench_clock={_target_:mlcl.bench.loop.StepClock}"
    try:
        cfg = compose([*overrides, f"trainer.threads={setting}", clock])
        StepClock.last, StepClock.max_s = None, max_s
        with _quiet(), hydra_job(cfg, run_dir) as task:
            start = cpu_snapshot()
            train.run(task)
            timing.background = background_load(start)
        sc = StepClock.last
        assert sc is not None and sc.t_first is not None and sc.t_end is not None, "no training step ran"
        timing.threads, timing.steps, timing.seconds = sc.threads, sc.steps, sc.t_end - sc.t_first
        timing.cpu_s = sc.cpu_end - sc.cpu_first
    except Exception as err:  # the table says why; the other rows still run
        timing.error = f"{type(err).__name__}: {err}".replace("\n", " ")[:200]
    finally:
        StepClock.max_s = math.inf
    return timing


# ------------------------------------------------------------------------------------------ bare loop
@dataclass
class BareSetup:
    """What the bare loop needs, built once per case outside any timer."""

    cfg: Any
    dm: Any
    inputs: torch.Tensor  # [N, ...] the training split's inputs, before any augmentation
    steps_per_epoch: int
    epochs: int


def bare_setup(overrides: Sequence[str], workdir: Path) -> BareSetup:
    """Compose the case, build its datamodule and stack the training inputs into one tensor."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mlcl import train

    cfg = compose(overrides)
    with hydra_job(cfg, Path(tempfile.mkdtemp(prefix="bare-", dir=workdir))) as task:
        task = OmegaConf.create(OmegaConf.to_container(task, resolve=True))
    dm = instantiate(
        task.data, missing=OmegaConf.to_container(task.missing, resolve=True), num_views=train.num_views(task)
    )
    dm.setup("fit")
    split = dm.splits["train"]
    inputs = torch.stack([split.source[i] for i in range(len(split))])
    steps = len(dm.train_dataloader())
    limit = task.trainer.get("limit_train_batches")
    if isinstance(limit, int) and limit > 0:
        steps = min(steps, limit)
    return BareSetup(task, dm, inputs, steps, int(task.trainer.max_epochs))


def _optimizer(cfg: Any, module: Any) -> torch.optim.Optimizer:
    """The configured optimiser over the module's parameter groups (learning-rate multipliers applied)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    opt_cfg = OmegaConf.to_container(cfg.optimizer, resolve=True)
    cls = get_class(opt_cfg.pop("_target_"))
    lr = float(opt_cfg.pop("lr"))
    groups = []
    for g in module._param_groups():
        g = dict(g)
        g["lr"] = lr * g.pop("lr_mult")
        g.pop("name", None)
        groups.append(g)
    return cls(groups, lr=lr, **opt_cfg)


def run_bare(bs: BareSetup, threads: int, max_s: float = math.inf) -> Timing:
    """The bare PyTorch loop: same module, optimiser, loss and batch size, no Lightning."""
    from mlcl import train
    from mlcl.losses.base import LossContext

    timing = Timing("bare", str(threads), threads=threads)
    try:
        torch.set_num_threads(threads)
        torch.manual_seed(int(bs.cfg.seed))
        module = train.build_module(bs.cfg, bs.dm)
        module.loss_fn.on_train_targets(bs.dm.train_targets)
        module.train()
        opt = _optimizer(bs.cfg, module)
        split = bs.dm.splits["train"]
        targets, tf, views = split.targets, split.transform, split.num_views
        n, b = bs.inputs.shape[0], bs.dm.batch_size
        gen = torch.Generator().manual_seed(int(bs.cfg.seed))
        step = 0
        start = cpu_snapshot()
        t0, cpu0 = time.perf_counter(), _cpu()
        for epoch in range(bs.epochs):
            module.loss_fn.on_train_epoch_start(epoch)
            need = bs.steps_per_epoch * b
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-need // n))])
            for i in range(bs.steps_per_epoch):
                idx = order[i * b : (i + 1) * b]
                x = bs.inputs[idx]
                if views > 1:  # the split's augmentation, applied to the whole batch per view
                    x = torch.stack([tf(x) if tf else x for _ in range(views)], dim=1)
                elif tf is not None:
                    x = tf(x)
                xv, yv, iv, v = module._views({"input": x, "target": targets[idx], "index": idx})
                ctx = LossContext(indices=iv, epoch=epoch, step=step, num_views=v, training=True, inputs=xv)
                loss = module.loss_fn(module(xv), yv, ctx)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if time.perf_counter() - t0 > max_s:
                    break
            if time.perf_counter() - t0 > max_s:
                break
        timing.seconds, timing.cpu_s = time.perf_counter() - t0, _cpu() - cpu0
        timing.steps = step
        timing.background = background_load(start)
    except Exception as err:
        timing.error = f"{type(err).__name__}: {err}".replace("\n", " ")[:200]
    return timing


# ------------------------------------------------------------------------------------- first step
def time_to_first_step(overrides: Sequence[str], workdir: Path, timeout: float = 120.0) -> float | None:
    """Seconds from starting ``python -m mlcl.train <overrides>`` to the end of its first training step
    (imports, config composition, data, model): a fresh interpreter, default thread policy."""
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    run_dir = Path(tempfile.mkdtemp(prefix="first-", dir=workdir))
    cmd = [
        sys.executable,
        "-m",
        "mlcl.train",
        *overrides,
        f"hydra.run.dir={run_dir}",
        "progress_bar=false",
        "+callbacks.bench_first={_target_:mlcl.bench.loop.FirstStepMarker}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    took = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == FIRST_STEP_MARK:
                took = time.perf_counter() - t0
                break
            if time.perf_counter() - t0 > timeout:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return took
