"""Thread policy: the arithmetic of ``trainer.threads=auto``, cgroup quota parsing, config handling."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mlcl import threads
from mlcl.errors import UserError


@pytest.mark.parametrize(
    ("cores", "ranks", "workers", "busy", "expected"),
    [
        (2, 1, 0, 0.0, 2),  # idle 2-core machine, one process: both cores
        (2, 2, 0, 0.0, 1),  # 2 cores / 2 DDP ranks
        (16, 2, 3, 0.0, 2),  # 16 cores / (2 ranks x (1 main + 3 workers)) = 16 / 8
        (16, 2, 3, 8.0, 1),  # half the machine busy elsewhere: 8 free / 8 processes
        (2, 1, 0, 0.65, 1),  # the "idle" machine at load 0.65: 1.35 free cores -> 1
        (2, 1, 0, 1.9, 1),  # floor of 1 even when nothing is free
        (1, 4, 2, 0.0, 1),  # more processes than cores: floor of 1
        (64, 1, 0, 0.4, 64),  # 63.6 free cores round to 64
        (3, 2, 0, 0.0, 1),  # 3 // 2: never more threads than cores in total
    ],
)
def test_auto_threads_arithmetic(cores, ranks, workers, busy, expected):
    assert threads.auto_threads(cores, ranks, workers, busy) == expected
    n = threads.auto_threads(cores, ranks, workers, busy)
    procs = ranks * (1 + workers)
    # independent check: the shares fit in the free cores unless the floor of 1 applies
    assert n * procs <= max(round(cores - busy), procs)


def test_cgroup_v2_and_v1_quota_parsing(tmp_path):
    assert threads.parse_cpu_max("200000 100000\n") == 2.0
    assert threads.parse_cpu_max("150000 100000") == 1.5
    assert threads.parse_cpu_max("max 100000") is None
    assert threads.parse_cfs("-1\n", "100000\n") is None
    assert threads.parse_cfs("50000", "100000") == 0.5

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("300000 100000\n")
    assert threads.cgroup_quota(v2) == 3.0
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_quota(v1) == 1.0
    assert threads.cgroup_quota(tmp_path / "missing") is None
    # a quota caps the affinity, never raises it
    assert threads.cores_available(affinity=8, quota=1.5) == 1.5
    assert threads.cores_available(affinity=2, quota=4.0) == 2.0


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ({"accelerator": "cpu", "devices": 1}, 1),
        ({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, 2),
        ({"accelerator": "cpu", "devices": "2"}, 2),
        ({"accelerator": "gpu", "devices": [0, 1, 3]}, 3),
        ({"accelerator": "gpu", "devices": "0,1"}, 2),
        ({"accelerator": "cpu", "devices": "auto"}, 1),
    ],
)
def test_ranks_per_node(trainer, expected):
    assert threads.ranks_per_node(OmegaConf.create(trainer), env={}) == expected


def test_launcher_local_world_size_wins():
    assert threads.ranks_per_node({"devices": 1}, env={"LOCAL_WORLD_SIZE": "4"}) == 4


@pytest.mark.parametrize("bad", ["many", 0, -2, 1.5, True])
def test_bad_setting_is_a_user_error(bad):
    with pytest.raises(UserError, match="trainer.threads must be 'auto' or a positive integer"):
        threads.parse_setting(bad)


def test_policy_pops_the_key_and_applies_the_count(monkeypatch):
    before = torch.get_num_threads()
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.ENV_KEY):
        monkeypatch.setenv(key, "7")
    cfg = OmegaConf.create({"trainer": {"devices": 1, "threads": 1}, "data": {"num_workers": 0}})
    OmegaConf.set_struct(cfg, True)
    try:
        assert threads.apply_thread_policy(cfg) == 1
        assert "threads" not in cfg.trainer  # Lightning's Trainer must not see it
        assert torch.get_num_threads() == 1
        assert [threads.os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")] == ["1", "1"]
    finally:
        torch.set_num_threads(before)


def test_auto_policy_uses_the_machine(monkeypatch):
    monkeypatch.setattr(threads, "USER_OMP", "")
    monkeypatch.setattr(threads, "cores_available", lambda: 16.0)
    monkeypatch.setattr(threads, "other_busy_cores", lambda: 0.0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    n, why = threads.decide({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, workers=3)
    assert n == 2 and "8 processes on this node" in why
    # a DDP rank > 0 takes rank 0's decision instead of sampling the machine again
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(threads.ENV_KEY, "5")
    assert threads.decide({"devices": 2}, workers=3)[0] == 5


def test_auto_respects_the_user_s_omp_and_ignores_load_when_deterministic(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(threads, "cores_available", lambda: 2.0)
    monkeypatch.setattr(threads, "other_busy_cores", lambda: 1.0)  # one core busy elsewhere
    monkeypatch.setattr(threads, "USER_OMP", "")
    assert threads.decide({"devices": 1}, workers=0)[0] == 1  # load-aware: 2 cores - 1 busy
    assert threads.decide({"devices": 1, "deterministic": True}, workers=0)[0] == 2  # load ignored
    monkeypatch.setattr(threads, "USER_OMP", "3")
    n, why = threads.decide({"devices": 1}, workers=0)
    assert n == 3 and "OMP_NUM_THREADS=3" in why


def test_default_config_is_auto():
    from tests.conftest import compose

    cfg = compose([])
    assert cfg.trainer.threads == "auto"
    cfg = compose(["trainer=ddp"])
    assert cfg.trainer.threads == "auto"
