"""mlcl-bench loop and the time budget: planning, budget logic (fake clock), targets arithmetic, tables,
and one tiny end-to-end run (never timings)."""

from __future__ import annotations

import re

import pytest

from mlcl import bench
from mlcl.bench import loop_cli, measure, report
from mlcl.bench.budget import Budget
from mlcl.bench.loop import CASES, Timing


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_with_a_fake_clock():
    clock = FakeClock()
    b = Budget(10.0, clock)
    assert b.left() == 10.0 and b.allows(10.0) and not b.spent
    clock.now += 7.5
    assert b.elapsed() == 7.5 and b.left() == 2.5
    assert b.allows(2.5) and not b.allows(2.6)
    clock.now += 3.0
    assert b.spent and b.left() == -0.5
    unlimited = Budget(None, clock)
    clock.now += 1e9
    assert unlimited.allows(1e12) and not unlimited.spent
    with pytest.raises(ValueError):
        Budget(0.0)


def test_run_jobs_skips_what_no_longer_fits():
    clock = FakeClock()
    ran: list[str] = []

    def job(name: str, kind: str, cost: float) -> loop_cli.Job:
        def fn() -> float:
            ran.append(name)
            clock.now += cost
            return cost

        return loop_cli.Job("c", kind, name, False, fn)

    jobs = [job("a", "bare", 4.0), job("b", "bare", 4.0), job("m", "mlcl", 1.0), job("c", "bare", 4.0)]
    out = loop_cli.run_jobs(jobs, Budget(10.0, clock))
    # a (4 s) -> 6 left; b expected 4 s fits -> 2 left; m (first of its kind) runs -> 1 left;
    # c expected 4 s (the last bare job) does not fit
    assert ran == ["a", "b", "m"]
    assert [skipped for _, _, skipped in out] == [False, False, False, True]
    assert out[0][1] == 4.0 and out[3][1] is None


def test_measure_row_is_skipped_once_the_budget_is_spent(capsys):
    clock = FakeClock()
    b = Budget(1.0, clock)
    clock.now += 2.0
    s = bench.Setup(batch=8, classes=5, feature_dim=8)
    (case,) = bench.cases_for(["bce"], s)
    row = measure._measure_row(case, s, calls=2, warmup=0, memory="none", threads=1, budget=b)
    assert row.times == [] and row.error.startswith("skipped: time budget 1 s")
    text = report.main_table([row])
    assert "| bce | skipped: time budget 1 s" in text and "error" not in text


def test_busy_rows_are_not_retried_when_the_budget_is_short(monkeypatch):
    monkeypatch.setattr(measure, "background_load", lambda start: 0.9)
    monkeypatch.setattr(measure, "_MIN_WINDOW_S", 0.0)
    s = bench.Setup(batch=8, classes=5, feature_dim=8)
    (case,) = bench.cases_for(["bce"], s)
    clock = FakeClock()
    tight = Budget(1e-9, clock)  # any attempt costs more than twice what is left
    row = measure._measure_row(case, s, calls=2, warmup=0, memory="none", threads=1, retries=5, budget=tight)
    assert row.attempts == 1 and row.busy
    roomy = Budget(1e6, clock)
    row = measure._measure_row(case, s, calls=2, warmup=0, memory="none", threads=1, retries=2, budget=roomy)
    assert row.attempts == 3


def test_plan_order_interleaves_and_puts_round_one_first():
    def make(case, kind, setting, loaded):
        return lambda: None

    cases = [CASES["yeast-finetune"], CASES["yeast-pretrain"]]
    jobs = loop_cli.plan(cases, [1, 2], rounds=2, busy=2, first_step=True, make=make)
    keys = [(j.case, j.kind, j.setting, j.loaded) for j in jobs]
    round1 = [
        ("yeast-finetune", "bare", "1", False),
        ("yeast-finetune", "mlcl", "auto", False),
        ("yeast-finetune", "mlcl", "1", False),
        ("yeast-finetune", "bare", "2", False),
        ("yeast-finetune", "mlcl", "2", False),
        ("yeast-pretrain", "bare", "1", False),
        ("yeast-pretrain", "mlcl", "auto", False),
    ]
    assert keys[:7] == round1
    # then the load runs and the first step of the full cases only, then round two
    assert keys[7:10] == [
        ("yeast-finetune", "bare", "best", True),
        ("yeast-finetune", "mlcl", "auto", True),
        ("yeast-finetune", "first", "auto", False),
    ]
    assert keys[10:] == round1
    assert len(loop_cli.plan(cases, [1], rounds=1, busy=0, first_step=False, make=make)) == 5


def _t(loop, setting, steps_per_s, loaded=False, threads=None, background=0.0):
    secs = 100 / steps_per_s
    return Timing(loop, setting, threads, 100, secs, background=background, loaded=loaded, cpu_s=secs)


def _result() -> loop_cli.CaseResult:
    res = loop_cli.CaseResult(CASES["yeast-finetune"])
    res.runs = [
        _t("bare", "1", 100.0),
        _t("bare", "1", 120.0),  # the faster of two rounds is kept
        _t("bare", "2", 30.0),
        _t("mlcl", "auto", 50.0, threads=1),
        _t("mlcl", "1", 55.0),
        _t("mlcl", "2", 20.0),
        _t("mlcl", "auto", 25.0, loaded=True, threads=1, background=2.1),
    ]
    res.first_step = 7.5
    return res


def test_targets_arithmetic():
    rows = {t.split(" ")[0] + t.split(" ")[1]: (m, ok) for t, m, ok in loop_cli.targets(_result())}
    # 50 / 120 (bare at its best thread count, round two) = 0.42 < 0.5
    assert rows["mlcl(threads"] == ("0.42× (bare best: threads 1)", "**no**")
    assert rows["timeto"] == ("7.5 s", "yes")
    assert rows["threadsauto"] == ("best fixed (1) / auto = 1.10", "yes")  # 55 / 50
    assert rows["under2"] == ("50%", "yes")  # 25 / 50


def test_load_share_uses_the_idle_run_just_before():
    res = _result()
    res.runs.append(_t("mlcl", "auto", 100.0, threads=1))  # round two on a quieter machine, after the load
    rows = loop_cli.targets(res)
    assert rows[3][1] == "50%"  # 25 / 50 (the run before the load), not 25 / 100
    assert rows[0][1].startswith("0.83×")  # the best auto run (100 / 120) still counts elsewhere


def test_targets_mark_missing_and_busy_rows():
    res = _result()
    res.runs = [r for r in res.runs if not r.loaded]
    res.runs[3].background = 1.5  # the auto run was disturbed
    res.first_step, res.first_step_skipped = None, True
    rows = loop_cli.targets(res)
    assert rows[0][2] == "**no** (busy machine)"
    assert rows[1][1:] == ("skipped (time budget)", "— (not measured)")
    assert rows[3][1:] == ("—", "— (not measured)")

    pre = loop_cli.CaseResult(CASES["yeast-pretrain"], runs=[_t("mlcl", "auto", 75.0), _t("bare", "1", 80.0)])
    ((target, measured, met),) = loop_cli.targets(pre)
    assert target.startswith("≥ 60 steps/s") and measured.startswith("75.0 steps/s") and met == "yes"


def test_loop_table_rows_and_ratios():
    res = _result()
    res.runs.append(Timing("mlcl", "4", skipped=True))
    res.runs.append(Timing("bare", "4", error="RuntimeError: x|y"))
    text = loop_cli.loop_table([res])
    lines = text.splitlines()
    assert lines[0].startswith("| model | loop | threads | steps/s |")
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines[2:]]
    assert all(len(r) == 8 for r in rows)
    by = {(r[1], r[2]): r for r in rows}
    assert by[("bare", "1")][3:7] == ["120", "120", "1.00×", "0.00"]
    assert by[("bare", "1")][7] == "2"
    assert by[("mlcl", "auto → 1")][5] == "0.42×"
    assert by[("mlcl", "4")][3] == "skipped (time budget)"
    assert by[("bare", "4")][3] == "error: RuntimeError: x\\|y"
    assert by[("mlcl (+2 busy processes)", "auto → 1")][6] == "2.10"  # the artificial load is not a '!'


def test_bad_loop_options(capsys):
    with pytest.raises(SystemExit):
        bench.main(["loop", "--cases", "nope"])
    assert "unknown case(s) nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["loop", "--threads", "1,x"])
    assert "--threads must be comma-separated integers" in capsys.readouterr().err


@pytest.mark.slow
def test_loop_quick_end_to_end(capsys, tmp_path):
    out = tmp_path / "loop.md"
    argv = ["loop", "--quick", "--cases", "digits,yeast-pretrain", "--threads", "1", "--busy", "1"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert "1-minute load average while it ran" in text
    table = text[text.index("| model | loop |") : text.index("### Targets")]
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in table.strip().splitlines()[2:]]
    # what `auto` chooses depends on the machine's cores and load: only its form is fixed here
    variants = [
        (r[0].split(":")[0].split(" ")[0], r[1], re.sub(r"auto → \d+$", "auto → n", r[2])) for r in rows
    ]
    assert variants == [
        ("default", "bare", "1"),
        ("default", "mlcl", "auto → n"),
        ("default", "mlcl", "1"),
        ("default", "bare (+1 busy processes)", "best → 1"),
        ("default", "mlcl (+1 busy processes)", "auto → n"),
        ("yeast", "bare", "1"),
        ("yeast", "mlcl", "auto → n"),
    ]
    for r in rows:
        assert float(r[3]) > 0, r  # every run finished (no error, no skip)
    targets = text[text.index("### Targets") :]
    assert targets.count("| default benchmark") == 4 and "time to first step" in targets
    assert re.search(r"time to first step ≤ 10 s \(fresh process\) \| \d+\.\d s \|", targets)
