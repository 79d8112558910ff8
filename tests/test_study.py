"""mlcl-study: study files, the multirun commands, the paired table (against scipy) and a tiny real study
(2 methods x 1 condition x 2 seeds) whose re-run skips every finished job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from mlcl import study as sy
from mlcl.errors import UserError
from tests.conftest import REPO, compose

TINY = {
    "description": "two losses, tiny",
    "baseline": "bce",
    "metrics": ["test.mAP"],
    "columns": "missing_rate",
    "overrides": [
        "missing=uniform",
        "trainer.max_epochs=1",
        "data.source.sizes.train=96",
        "data.source.sizes.val=64",
        "data.source.sizes.test=64",
        "backbone.width=8",
        "progress_bar=false",
        "logger=none",
    ],
    "grid": {"missing.rate": [0.5], "seed": [0, 1]},
    "methods": ["bce", "asl"],
}


def write_run(d: Path, method: str, rate: float, seed: int, mAP: float, **extra) -> None:
    d.mkdir(parents=True, exist_ok=True)
    res = {
        "run": {"method": method, "loss": method, "missing_rate": rate, "seed": seed},
        "test": {"mAP": mAP},
    }
    (d / "metrics.json").write_text(json.dumps({**res, **extra}))


# --------------------------------------------------------------------------- the report's tables
def test_report_table_is_compare_s_paired_table_and_ignores_stage_runs(tmp_path):
    """The study table is mlcl.compare's: paired over seeds (as scipy), stage runs not counted."""
    rng = np.random.default_rng(0)
    base, gain = rng.normal(50, 2, 4), rng.normal(3.0, 0.3, 4)
    for s in range(4):
        write_run(tmp_path / f"bce_{s}", "bce", 0.5, s, base[s])
        job = tmp_path / f"mc_{s}"
        write_run(job, "mulcon", 0.5, s, base[s] + gain[s])
        write_run(job / "stages" / "stage1", "bce", 0.5, s, 0.0)  # a stage run inside the job
    from mlcl import compare

    text = sy.method_table(compare.load_runs(tmp_path), ["test.mAP"], "missing_rate", "bce")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    assert set(rows) == {"bce", "mulcon"}
    t = stats.ttest_rel(base + gain, base)
    ci = t.confidence_interval(0.95)
    assert f"{np.mean(base):.2f} ± {np.std(base, ddof=1):.2f} (4)" in rows["bce"]  # stage runs left out
    assert f"{np.mean(gain):+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]" in rows["mulcon"]
    assert "▲" in rows["mulcon"] and rows["mulcon"].split("|")[2].strip().startswith("**")


# --------------------------------------------------------------------------- study files and commands
def test_commands_group_methods_and_fix_the_job_dirs(tmp_path):
    study = sy.load_study("default_quick")
    cmds = sy.commands(study, tmp_path, ["hydra/launcher=local"])
    methods = [c[4].removeprefix("method=").split(",") for c in cmds]
    assert sorted(m for ms in methods for m in ms) == sorted(study["methods"])
    for cmd, ms in zip(cmds, methods):
        assert cmd[1:4] == ["-m", "mlcl.train", "-m"]
        for m in ms:  # methods share a multirun only when they share their overrides
            assert all(o in cmd for o in study["methods"][m])
        assert "ckpt_path=last" in cmd and "hydra/launcher=local" in cmd
        assert f"hydra.sweep.dir={tmp_path / 'runs'}" in cmd
        assert "hydra.sweep.subdir=${hydra.job.override_dirname}" in cmd
        excl = next(c for c in cmd if c.startswith("hydra.job.config.override_dirname.exclude_keys="))
        kept = {"method", *study["grid"]}
        excluded = set(excl.split("=", 1)[1].strip("[]").split(","))
        assert not (kept & excluded) and "ckpt_path" in excluded and "trainer.max_epochs" in excluded
    assert len(cmds) == 3  # mulcon and mulsupcon have their own overrides


@pytest.mark.parametrize("name", sy.available())
def test_shipped_studies_compose(name, tmp_path):
    from mlcl import stages as st

    assert set(sy.available()) >= {"default_quick", "yeast_mulsupcon", "missing_labels"}
    study = sy.load_study(name)
    assert study["baseline"] in study["methods"]
    for cmd in sy.commands(study, tmp_path):
        job = [
            a.split("=")[0] + "=" + a.split("=", 1)[1].split(",")[0]
            for a in cmd[4:]
            if not a.startswith("hydra.")
        ]
        for method in cmd[4].removeprefix("method=").split(","):
            ovs = [f"method={method}", *job[1:]]
            cfg = compose(ovs)
            with st.hydra_runtime(cfg) as task:
                names = [s.name for s in st.method_stages(task)] if task.get("stages") else []
            shared, scoped = st.split_overrides(ovs, names)
            with st.hydra_runtime(cfg) as task:
                for stage in st.method_stages(task) if names else []:
                    st.compose_stage(stage, shared, scoped[stage.name], tmp_path / stage.name)


def test_yeast_study_follows_the_protocol():
    study = sy.load_study("yeast_mulsupcon")
    assert study["methods"] == {"yeast_bce": [], "yeast_mulsupcon": []} and study["baseline"] == "yeast_bce"
    assert study["grid"] == {"seed": [0, 1, 2]}
    assert "selections.dev_loss.mAP" in study["metrics"] and "selections.val_mAP.mAP" in study["metrics"]


def test_bad_study_names_the_file(tmp_path):
    with pytest.raises(UserError, match="no study 'nope'.*default_quick"):
        sy.load_study("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "baseline": "clml"}))
    with pytest.raises(UserError, match="baseline 'clml'"):
        sy.load_study(str(bad))


# --------------------------------------------------------------------------- a tiny real study
def run_study(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "mlcl.study", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_tiny_study_writes_report_and_rerun_skips_finished_jobs(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "study"
    proc = run_study([str(spec), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in (out / "runs").glob("*/metrics.json"))
    assert jobs == [f"method={m},missing.rate=0.5,seed={s}" for m in ("asl", "bce") for s in (0, 1)]
    report = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    maps = {}
    for m in ("bce", "asl"):  # the report's means are the runs' own numbers
        paths = [out / "runs" / f"method={m},missing.rate=0.5,seed={s}" / "metrics.json" for s in (0, 1)]
        maps[m] = np.array([json.loads(p.read_text())["test"]["mAP"] for p in paths])
        assert f"{np.mean(maps[m]):.2f}" in rows[m] and f"{np.std(maps[m], ddof=1):.2f} (2)" in rows[m]
    assert f"{np.mean(maps['asl'] - maps['bce']):+.2f} [" in rows["asl"]  # the paired difference
    assert "python -m mlcl.train -m method=bce,asl missing.rate=0.5 seed=0,1" in report
    assert "- torch: " in report and "wall time" in report
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    again = run_study([str(spec), "--out", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished") == 4
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert set(after) == set(before)  # no new files
    for p, t in before.items():
        if ".hydra" not in p.parts and (p.name in ("metrics.json", "config.yaml") or p.suffix == ".ckpt"):
            assert after[p] == t, p


def test_report_reads_selections_and_skips_lines_over_a_categorical_condition(tmp_path):
    sel = {"bce": [40.0, 42.0, 41.0], "ms": [45.0, 44.5, 46.5]}
    for method, values in sel.items():
        for seed, v in enumerate(values):
            write_run(
                tmp_path / "runs" / f"{method}_{seed}", method, 0.0, seed, v - 1.0,
                selections={"dev_loss": {"mAP": v, "checkpoint": "/x/best_dev_loss.ckpt"}},
            )  # fmt: skip
            res = json.loads((tmp_path / "runs" / f"{method}_{seed}" / "metrics.json").read_text())
            res["run"]["data"] = "yeast"
            (tmp_path / "runs" / f"{method}_{seed}" / "metrics.json").write_text(json.dumps(res))
    study = {
        **sy.load_study("yeast_mulsupcon"),
        "methods": {"bce": [], "ms": []},
        "baseline": "bce",
        "metrics": ["selections.dev_loss.mAP", "selections.nope.mAP"],
    }
    report = sy.write_report(study, tmp_path, [], 1.0, [0]).read_text()
    table = report.split("## selections.dev_loss.mAP", 1)[1].split("##", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for method, values in sel.items():  # the selection's numbers, not test.mAP (1 lower)
        assert f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (3)" in rows[method]
    assert "No finished job records `selections.nope.mAP`." in report
    assert not list(tmp_path.glob("*_vs_data.png"))  # no line over the single, non-numeric condition


@pytest.mark.slow
def test_study_whose_jobs_all_fail_says_so_in_one_paragraph(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "grid": {"seed": [0]}}))
    out = tmp_path / "study"
    proc = run_study([str(spec), "--out", str(out), "trainer.max_epochs=one"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mlcl: error: no finished job to report on") and "exited with [" in last
    assert not (out / "report.md").exists()


def test_default_study_dir_is_under_the_project_root_not_the_cwd(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    (project / ".mlcl-root").write_text("")
    monkeypatch.delenv("MLCL_ROOT", raising=False)
    monkeypatch.chdir(project / "notebooks")  # where mlcl-train would also write to project/outputs
    sy.run_study("default_quick", dry_run=True)
    printed = capsys.readouterr().out
    assert f"hydra.sweep.dir={project / 'outputs' / 'studies' / 'default_quick' / 'runs'}" in printed
