"""mlcl-bench loss table: table structure, automatic rows for new plugins, option errors (never timings)."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pytest
import torch

from mlcl import bench
from mlcl.bench import measure, report
from mlcl.losses.base import LOSSES, LossContext, LossPlugin, list_losses, register_loss

# tiny inputs: every spec case and plugin in well under a second
TINY = [
    "--batch-size", "8", "--num-classes", "5", "--feature-dim", "16", "--kmcl-aniso-dim", "8",
    "--kmcl-iso-dim", "16", "--clml-dim", "16", "--mulcon-dim", "8", "--supcon-dim", "8",
    "--mulsupcon-dim", "8", "--queue", "8", "--calls", "2", "--warmup", "1", "--threads", "1",
    "--retries", "0", "--no-diagnostics",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_load_window(monkeypatch):
    """No padding of short rows to estimate the background load (keeps the tests fast)."""
    monkeypatch.setattr(measure, "_MIN_WINDOW_S", 0.0)


def _table(text: str, title: str | None = None) -> list[list[str]]:
    """Data rows (cells) of the first markdown table after ``title`` (or of the first table)."""
    if title is not None:
        text = text[text.index(title) :]
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| loss |"))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]])
    return rows


def _header(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("| loss |"))
    return [c.strip() for c in line.split("|")[1:-1]]


@pytest.fixture
def registered():
    """Register throw-away plugins; removed from the registry afterwards."""
    added: list[str] = []

    def add(name: str, cls: type[LossPlugin]) -> type[LossPlugin]:
        register_loss(name)(cls)
        added.append(name)
        return cls

    yield add
    for name in added:
        LOSSES.pop(name, None)


class _Recording(LossPlugin):
    """Sum of squared logits; records what the bench hands it."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def forward(self, outputs, targets, ctx: LossContext):
        type(self).seen.append(
            {"rows": outputs["logits"].shape[0], "targets": tuple(targets.shape), "views": ctx.num_views}
        )
        loss = outputs["logits"].square().sum()
        return {"loss": loss}


def test_every_registered_loss_gets_a_row(capsys):
    assert bench.main([*TINY, "--no-memory", "--no-scaling"]) == 0
    out = capsys.readouterr().out
    assert _header(out) == [
        "loss",
        "inputs",
        "median (ms)",
        "min (ms)",
        "IQR (ms)",
        "other load",
        "extra peak (MiB)",
        "reference (spec)",
        "speed-up",
        "target",
        "met",
    ]
    rows = _table(out)
    labels = [r[0] for r in rows]
    for name in list_losses():
        assert any(label.split(" ")[0] == name for label in labels), name
    assert "kmcl (anisotropic D=8)" in labels and "kmcl (isotropic D=16)" in labels
    assert len(rows) == len(list_losses()) + 1  # KMCL has two rows
    for r in rows:
        assert len(r) == 11
        assert not r[1].startswith("error"), r
        assert 0 < float(r[3]) <= float(r[2])  # min <= median
        assert r[6] == "—"  # --no-memory
    by_label = dict(zip(labels, rows))
    # a reference exists but B=8 is not the spec's setting: no speed-up, no verdict
    assert by_label["asl"][7].startswith("0.280–0.320 ms")
    assert by_label["asl"][8] == "— (other shape)" and by_label["asl"][10] == "—"
    assert by_label["bce"][7:] == ["—", "—", "—", "—"]
    assert "threads 1" in out and "machine:" in out


def test_new_plugin_gets_a_row_with_views(capsys, registered):
    class TwoView(_Recording):
        num_views = 2

    _Recording.seen.clear()
    registered("zz_bench_dummy", _Recording)
    registered("zz_bench_twoview", TwoView)
    assert (
        bench.main([*TINY, "--no-memory", "--no-scaling", "--losses", "zz_bench_dummy,zz_bench_twoview"]) == 0
    )
    rows = _table(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["zz_bench_dummy", "zz_bench_twoview"]
    assert rows[0][1].startswith("plugin on `linear` head of [8,16]")
    assert "2×8 rows" in rows[1][1]
    views = {(s["rows"], s["targets"], s["views"]) for s in _Recording.seen}
    assert views == {(8, (8, 5), 1), (16, (16, 5), 2)}


def test_broken_plugin_row_says_why_and_others_still_run(capsys, registered):
    class Broken(LossPlugin):
        def forward(self, outputs, targets, ctx):
            raise RuntimeError("deliberately broken")

    registered("zz_bench_broken", Broken)
    assert bench.main([*TINY, "--no-memory", "--no-scaling", "--losses", "zz_bench_broken,bce"]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows[0][0] == "zz_bench_broken" and "RuntimeError: deliberately broken" in rows[0][1]
    assert rows[1][0] == "bce" and float(rows[1][2]) > 0


def test_scaling_table_rows(capsys):
    args = [*TINY, "--no-memory", "--losses", "mulcon,supcon,asl", "--scaling-batches", "4,8"]
    assert bench.main([*args, "--scaling-calls", "1", "--scaling-warmup", "0"]) == 0
    out = capsys.readouterr().out
    rows = _table(out, "### Scaling")
    assert [(r[0].split(" ")[0], r[1]) for r in rows] == [
        ("mulcon", "4"),
        ("mulcon", "8"),
        ("supcon", "4"),
        ("supcon", "8"),
    ]
    assert rows[0][5] == "1.0×"
    assert "[8,5,8]" in rows[1][2]
    assert all(len(r) == 12 for r in rows)
    assert rows[0][8:] == ["—", "—", "—", "—"]  # no reference figure at B=4
    # B=8 is the main table's batch: its rows are reused, not measured again
    main_rows = {r[0]: r for r in _table(out)}
    assert rows[1][3] == main_rows[rows[1][0]][2] and rows[3][3] == main_rows[rows[3][0]][2]


def test_memory_subprocess_and_in_process_fallback(capsys, registered):
    registered("zz_bench_dummy", _Recording)  # unknown to the subprocess: measured here instead
    args = [*TINY, "--no-scaling", "--losses", "asl,zz_bench_dummy"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert float(rows[0][6]) >= 0  # asl: fresh subprocess
    assert rows[1][6].endswith("~") and float(rows[1][6][:-1]) >= 0
    assert "zz_bench_dummy (B=8) memory: in-process" in out


def test_out_file_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "bench.md"
    args = [*TINY, "--no-memory", "--no-scaling", "--losses", "bce", "--out", str(out)]
    assert bench.main(args) == 0
    assert bench.main(args) == 0
    assert out.is_file() and (tmp_path / "bench-1.md").is_file()
    assert _table(out.read_text())[0][0] == "bce"
    assert "wrote" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--losses", "nope"], "unknown loss(es) nope; registered losses: "),
        (["--batch-size", "0"], "expected a positive integer"),
        (["--batch-size", "1"], "--batch-size must be >= 2"),
        (["--scaling-batches", "64,x"], "comma-separated integers"),
        (["--positives", "0"], "--positives must be in (0, num_classes=80]"),
        (["--dtype", "int8"], "invalid choice"),
        (["--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
        (["train", "--losses", "nope"], "unknown loss(es) nope"),
        (["train", "--head-kwargs", "mulcon={bad"], "invalid JSON"),
        (["train", "--head-kwargs", "nope={}"], "--head-kwargs for unknown loss(es) nope"),
        (["train", "--backbone", "not_a_model_xyz"], "is not a timm model name"),
    ],
)
def test_bad_options_give_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_coco_targets_density_and_determinism():
    y = bench.coco_targets(4096, 80, 2.9, seed=3)
    assert y.dtype == torch.int64 and set(y.unique().tolist()) == {0, 1}
    assert int(y.sum(1).min()) == 1
    # Bernoulli(2.9/80) per entry plus one forced positive in the e^-2.9 ≈ 5.5 % empty rows
    expected = 2.9 + (1 - 2.9 / 80) ** 80
    assert abs(float(y.sum(1).float().mean()) - expected) < 0.1
    assert torch.equal(y, bench.coco_targets(4096, 80, 2.9, seed=3))
    assert not torch.equal(y, bench.coco_targets(4096, 80, 2.9, seed=4))


def test_scaling_rows_use_the_reference_at_their_batch_size():
    (case,) = bench.cases_for(["mulcon"], bench.Setup())
    at256 = bench.Row(case, bench.Setup(batch=256), times=[10.0] * 5)
    ref, speed, target, met = report._speedup(at256, scaling=True)
    assert ref.startswith("110 ms, +71 MiB (mulcon.md §16)")
    assert (speed, target, met) == ("11.0×", "≥ 10×", "yes")  # 110 / 10
    assert (
        report._speedup(bench.Row(case, bench.Setup(batch=256), times=[12.0] * 5), scaling=True)[3]
        == "**no**"
    )
    at64 = bench.Row(case, bench.Setup(batch=64), times=[2.7] * 5)
    assert report._speedup(at64, scaling=True)[:2] == ("27.0–27.6 ms, +15.3 MiB (mulcon.md §16)", "10.0×")
    assert report._speedup(bench.Row(case, bench.Setup(batch=1024), times=[1.0]), scaling=True) == ("—",) * 4


def test_speedup_and_target_verdicts():
    case = bench.Case("kmcl/anisotropic", "kmcl", "kmcl (anisotropic D=128)", lambda s: None)
    typical = bench.Setup()
    fast = bench.Row(case, typical, times=[100.0] * 20, mib=50.0)
    ref, speed, target, met = report._speedup(fast)
    assert ref.startswith("3173–3411 ms, +1.66 GB")
    assert (speed, target, met) == ("31.7×", "≥ 5×, ≤ 400 MiB", "yes")  # 3173 / 100
    assert report._speedup(bench.Row(case, typical, times=[100.0] * 20, mib=500.0))[3] == "**no**"
    assert report._speedup(bench.Row(case, typical, times=[1000.0] * 20, mib=50.0))[1:] == (
        "3.2×",
        "≥ 5×, ≤ 400 MiB",
        "**no**",
    )
    unmeasured = report._speedup(bench.Row(case, typical, times=[100.0] * 20))
    assert unmeasured[3] == "yes (memory not measured)"
    busy = report._speedup(bench.Row(case, typical, times=[100.0] * 20, mib=50.0, background=1.0))
    assert busy[3] == "yes (busy machine)"
    other = bench.Setup(batch=32)
    assert report._speedup(bench.Row(case, other, times=[100.0] * 20))[1] == "— (other shape)"
    gpu = bench.Setup(device="cuda")
    assert report._speedup(bench.Row(case, gpu, times=[100.0] * 20))[3] == "— (CPU target)"


def test_train_subcommand_smoke(capsys):
    argv = ["train", "--losses", "bce,supcon", "--batch-size", "2", "--steps", "1", "--warmup", "0"]
    assert bench.main([*argv, "--image-size", "32", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert [(r[0], r[1]) for r in rows] == [("bce", "1"), ("bce (baseline)", "2"), ("supcon", "2")]
    for r in rows:
        assert not r[3].startswith("error"), r
        assert float(r[3]) > 0 and float(r[4]) > 0
    assert rows[0][6:8] == ["0", "0 %"]
    assert all(len(r) == 9 for r in rows)
    assert re.fullmatch(r"[+-]\d+", rows[2][6])


def test_busy_rows_are_retried_and_marked(monkeypatch):
    loads = iter([0.9, 0.7, 0.5])  # other processes keep the CPU busy on every attempt
    monkeypatch.setattr(measure, "background_load", lambda start: next(loads))
    s = bench.Setup(batch=8, classes=5, feature_dim=8)
    (case,) = bench.cases_for(["bce"], s)
    row = measure._measure_row(case, s, calls=2, warmup=0, memory="none", threads=1, retries=2)
    assert row.attempts == 3 and row.busy and len(row.times) == 2
    assert row.background in (0.9, 0.7, 0.5)
    assert report._fmt_load(row).endswith(" !")

    quiet = iter([0.9, 0.05])  # the second attempt is quiet: it is kept and no third one is made
    monkeypatch.setattr(measure, "background_load", lambda start: next(quiet))
    row = measure._measure_row(case, s, calls=2, warmup=0, memory="none", threads=1, retries=2)
    assert (row.attempts, row.background, row.busy) == (2, 0.05, False)
    assert report._fmt_load(row) == "0.05"


def test_train_rows_left_when_the_budget_is_spent_are_marked(capsys):
    argv = ["train", "--losses", "bce,supcon", "--batch-size", "2", "--steps", "1", "--warmup", "0"]
    assert bench.main([*argv, "--image-size", "32", "--threads", "1", "--budget-s", "0.001"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert [r[0] for r in rows] == ["bce", "bce (baseline)", "supcon"]
    assert all(r[3].startswith("error: skipped: time budget 0 s") for r in rows), rows
    assert "(budget 0 s)" in out


def test_diagnostics_table_rows_and_budget(monkeypatch):
    from mlcl.bench.budget import Budget
    from mlcl.bench.cli import diagnostics_table
    from mlcl.diagnostics import bench as dbench

    fake = [{"name": "alignment + uniformity", "rows": 10, "shape": "[10, 4]", "seconds": 1.234}]
    monkeypatch.setattr(dbench, "bench_rows", lambda device: fake)
    text = diagnostics_table("cpu", Budget(None))
    assert "| alignment + uniformity | [10, 4] | 1.23 |" in text
    ticks = iter([0.0])  # started at 0, every later reading at 299 s of a 300 s budget
    spent = diagnostics_table("cpu", Budget(300.0, clock=lambda: next(ticks, 299.0)))
    assert "skipped" in spent and "alignment" not in spent
