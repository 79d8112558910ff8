"""Kill-and-resume end to end: a training process SIGKILLed at a random point after its first checkpoint
and resumed must finish with exactly the metrics of an uninterrupted run (CPU, deterministic).

Also: a requeued SLURM job (same command, ``SLURM_RESTART_COUNT=1``) resumes by itself; a moved run
directory resumes from its own files; a refused re-run changes no byte of the existing run; a
finished run re-launched with ``ckpt_path=last`` is skipped; failures leave their traceback in
``train.log``; debug runs write no ``metrics.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# 256 training mosaics / batch 64 = 4 steps per epoch, 12 steps; checkpoints at steps 4, 8, 12
TINY = [
    "data.source.sizes={train:256,val:64,test:64}",
    "data.batch_size=64",  # explicit: the kill points below assume 4 steps per epoch
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "progress_bar=false",
    "print_config=false",
]
# augmentations draw from the global RNG: resume must restore it, not only the weights
BCE = [*TINY, "loss=bce", "data.augment.max_shift=1", "data.augment.noise_std=0.1", "tags=[resume,ci]"]
STATEFUL = [*TINY, "loss=mulsupcon", "loss.queue_size=64"]  # queue + momentum key encoder + dropout
STEPS_PER_EPOCH, TOTAL_STEPS = 4, 12


def train(
    args: list[str], env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    for key in [k for k in full_env if k.startswith("SLURM_") and k not in (env or {})]:
        del full_env[key]
    proc = subprocess.run(
        [sys.executable, "-m", "mlcl.train", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mlcl.train {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc


def kill_point(rng: random.Random) -> tuple[str, int]:
    """A random point after the first checkpoint: a training batch of epoch 2 or 3, or a validation."""
    during = rng.choice(["batch", "batch", "validation"])
    low = STEPS_PER_EPOCH if during == "batch" else 2 * STEPS_PER_EPOCH
    high = TOTAL_STEPS - 1 if during == "batch" else TOTAL_STEPS
    return during, rng.randint(low, high)


def train_killed(args: list[str], rng: random.Random) -> tuple[str, int]:
    during, step = kill_point(rng)
    killer = f"+callbacks.killer={{_target_:tests.run.killer.SigkillAt,step:{step},during:{during}}}"
    proc = train([*args, killer], check=False)
    assert proc.returncode == -9, (
        f"not killed at {during} step {step}: rc={proc.returncode}\n{proc.stderr[-2000:]}"
    )
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")))
    # a kill before the first checkpoint would test a fresh start, not a resume
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), f"no checkpoint before {during} step {step}"
    return during, step


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_results(ref: Path, resumed: Path, where: str) -> None:
    a, b = results(ref), results(resumed)
    assert b["run"]["resumed"] is True, where
    assert a["test"] == b["test"], f"test metrics differ after a kill at {where}"
    assert a["val"] == b["val"] and a["best_val"] == b["best_val"], where
    # and the final weights themselves (last.ckpt is rewritten every epoch, improved or not)
    last_a = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=False)
    last_b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert last_a["global_step"] == last_b["global_step"] == TOTAL_STEPS, where
    for k, v in last_a["state_dict"].items():
        assert torch.equal(v, last_b["state_dict"][k]), f"{k} differs after a kill at {where}"


def csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file without their empty cells (the header may have grown on resume)."""
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (and the set of directories), by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


@pytest.fixture(scope="module")
def rng() -> random.Random:
    seed = int(os.environ.get("MLCL_KILL_SEED", random.SystemRandom().randrange(2**31)))
    print(f"kill points drawn with MLCL_KILL_SEED={seed}")
    return random.Random(seed)


@pytest.fixture(scope="module")
def bce_reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("bce") / "uninterrupted"
    train([*BCE, f"hydra.run.dir={run_dir}"])
    return run_dir


def test_bce_killed_and_resumed_with_ckpt_path_last(bce_reference: Path, tmp_path: Path, rng):
    run_dir = tmp_path / "killed"
    cmd = [*BCE, f"hydra.run.dir={run_dir}"]
    during, step = train_killed(cmd, rng)
    rows_before = csv_rows(run_dir / "metrics.csv")
    log_before = (run_dir / "train.log").read_text()
    assert rows_before and log_before
    train([*cmd, "ckpt_path=last"])
    assert_same_results(bce_reference, run_dir, f"{during} step {step}")
    # metrics.csv and train.log were appended to, not truncated
    rows_after = csv_rows(run_dir / "metrics.csv")
    assert rows_after[: len(rows_before)] == rows_before
    assert {r["epoch"] for r in rows_after if "val/mAP" in r} == {"0", "1", "2"}
    log_after = (run_dir / "train.log").read_text()
    assert log_after.startswith(log_before) and "resuming from" in log_after[len(log_before) :]
    res = results(run_dir)
    assert res["tags"] == ["resume", "ci"] and res["best_ckpt"] == "checkpoints/best.ckpt"
    assert "ckpt_path=last" not in res["overrides"]
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))


def test_slurm_requeue_resumes_the_same_command(bce_reference: Path, tmp_path: Path, rng):
    run_dir = tmp_path / "job"
    cmd = [*BCE, f"hydra.run.dir={run_dir}"]
    during, step = train_killed(cmd, rng)
    # a stray temporary file of a save the kill interrupted: removed when the job restarts
    stray = run_dir / "checkpoints" / ".last.ckpt.tmp-99999"
    stray.write_bytes(b"partial")
    train(cmd, env={"SLURM_RESTART_COUNT": "1"})  # the requeued job: the very same command line
    assert_same_results(bce_reference, run_dir, f"{during} step {step} (requeue)")
    assert not stray.exists()


def test_stateful_loss_resumes_exactly_from_a_moved_run(tmp_path: Path, rng):
    ref = tmp_path / "ref"
    train([*STATEFUL, f"hydra.run.dir={ref}"])
    killed = tmp_path / "killed"
    during, step = train_killed([*STATEFUL, f"hydra.run.dir={killed}"], rng)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(killed, moved)  # the original location no longer exists
    scratch = tmp_path / "scratch"  # the directory this command would otherwise have used
    scratch.mkdir()
    train([*STATEFUL, f"hydra.run.dir={scratch}", f"ckpt_path={moved / 'checkpoints' / 'last.ckpt'}"])
    assert_same_results(ref, moved, f"{during} step {step} (mulsupcon)")
    assert not scratch.exists() and not killed.exists()
    log = (moved / "train.log").read_text()
    assert f"checkpoint path at {moved / 'checkpoints' / 'best.ckpt'}" in log  # tested its own best
    # the queue and the key encoder were restored, not rebuilt: identical to the uninterrupted run
    a = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(moved / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("loss_fn.queue_keys") for k in a) and any("key_backbone" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_refused_rerun_touches_no_byte(bce_reference: Path):
    before = tree_digest(bce_reference)
    # a different command (its .hydra/overrides.yaml would differ if anything rewrote it)
    proc = train([*BCE, f"hydra.run.dir={bce_reference}", "seed=1"], check=False)
    assert proc.returncode != 0 and "already holds results" in proc.stderr
    assert tree_digest(bce_reference) == before
    # resuming a finished run is a no-op that reports its results
    proc = train([*BCE, f"hydra.run.dir={bce_reference}", "ckpt_path=last"])
    assert "already finished" in proc.stdout + proc.stderr
    assert tree_digest(bce_reference) == before


def test_resuming_into_another_run_is_refused(bce_reference: Path, tmp_path: Path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.csv").write_text("epoch,step\n0,1\n")
    before, before_ref = tree_digest(other), tree_digest(bce_reference)
    ckpt = bce_reference / "checkpoints" / "last.ckpt"
    proc = train([*BCE, f"hydra.run.dir={other}", f"ckpt_path={ckpt}"], check=False)
    assert proc.returncode != 0 and "holds another run" in proc.stderr
    assert tree_digest(other) == before and tree_digest(bce_reference) == before_ref


def test_failure_traceback_goes_to_train_log(tmp_path: Path):
    boom = "+callbacks.boom={_target_:tests.run.killer.RaiseAt,step:2,message:boom-7f3a}"
    proc = train([*TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}", boom], check=False)
    assert proc.returncode != 0
    log = (tmp_path / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "RuntimeError: boom-7f3a" in log
    assert "resolved config:" in log and "GPU available" in log  # config and Lightning's messages
    assert not (tmp_path / "metrics.json").exists()


def test_user_error_mid_run_is_one_paragraph_and_its_traceback_goes_to_train_log(tmp_path: Path):
    boom = "+callbacks.boom={_target_:tests.run.killer.RaiseAt,step:2,message:bad-row-9c1e,user:true}"
    proc = train([*TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}", boom], check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout  # the console shows the paragraph only
    assert "mlcl: error: bad-row-9c1e (data.path); fix the file" in proc.stderr
    log = (tmp_path / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "bad-row-9c1e" in log


def test_debug_runs_write_no_results(tmp_path: Path):
    for i, extra in enumerate((["debug=overfit", "trainer.max_epochs=1"], ["+trainer.fast_dev_run=true"])):
        run_dir = tmp_path / str(i)
        train([*TINY, f"hydra.run.dir={run_dir}", *extra])
        assert not (run_dir / "metrics.json").exists(), extra
        assert not list(run_dir.rglob("*.ckpt")), extra
        assert "mAP" in json.loads((run_dir / "debug_metrics.json").read_text())["test"], extra
