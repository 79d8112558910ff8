"""The wheel carries every config and works without the repository: built from a copy of the source,
installed (``--no-deps``) into a venv that borrows the dev venv's packages, run from a temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CONF, REPO

pytestmark = pytest.mark.slow


def _sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    # a copy, so the build writes nothing into the checkout (build/, *.egg-info)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(src),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
    ]
    _sh(cmd, src)
    (whl,) = out.glob("mlcl-*.whl")
    return whl


def test_wheel_carries_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"mlcl/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert expected - names == set()
    assert {"mlcl/conf/train.yaml", "mlcl/conf/eval.yaml"} <= names
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert groups <= {n.split("/")[2] for n in names if n.startswith("mlcl/conf/") and n.count("/") >= 3}


def test_installed_wheel_trains_and_evaluates_from_anywhere(wheel, tmp_path):
    venv = tmp_path / "venv"
    _sh([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    # borrow the dev venv's packages (a venv's --system-site-packages reaches the base interpreter only);
    # a plain path line: the dev venv's own .pth files (its editable mlcl) are not processed
    purelib = _sh([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
    (Path(purelib.stdout.strip()) / "dev_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], tmp_path
    )
    work = tmp_path / "anywhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLCL_ROOT")}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    # the wheel, not the editable checkout, is what the venv imports
    where = _sh([str(py), "-c", "import mlcl; print(mlcl.__file__)"], work, env).stdout.strip()
    assert where.startswith(str(venv)), where
    helped = _sh([str(venv / "bin" / "mlcl-train"), "--help"], work, env).stdout
    assert "loss: an, asl, bce" in helped and "data: arrays" in helped, helped[:2000]
    run = work / "run"
    tiny = [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "data.source.sizes.train=64",
        "data.source.sizes.val=32",
        "data.source.sizes.test=32",
        "progress_bar=false",
        f"hydra.run.dir={run}",
    ]
    _sh([str(venv / "bin" / "mlcl-train"), *tiny], work, env)
    assert (run / "metrics.json").is_file()
    ckpt = run / "checkpoints" / "last.ckpt"
    evaluated = _sh(
        [
            str(venv / "bin" / "mlcl-eval"),
            f"ckpt_path={ckpt}",
            "progress_bar=false",
            f"hydra.run.dir={work}/eval",
        ],
        work,
        env,
    )
    assert (work / "eval" / "eval_metrics.json").is_file(), evaluated.stdout
