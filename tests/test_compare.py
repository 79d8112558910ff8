"""mlcl-compare on constructed run directories (metrics.json + config.yaml) with known statistics.

Expected numbers are computed here by hand (sums, the t statistic, the exact Wilcoxon distribution by
enumerating sign patterns), never by the code under test.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import pytest
import yaml
from scipy import stats as sps

from mlcl import compare
from mlcl.compare.stats import paired, summarize
from mlcl.compare.tables import STYLES, build_table, cell_text, render


def fake_run(root: Path, name: str, *, metrics: dict, per_class: dict | None = None, **settings) -> Path:
    """A finished run: config.yaml (resolved, nested) and metrics.json."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "loss_name": settings.get("loss", "bce"),
        "data_name": "digits",
        "method_name": None,
        "tag": None,
        "seed": settings.get("seed", 0),
        "backbone": {"name": "small_cnn", "pretrained": False},
        "loss": {"_target_": f"mlcl.losses.{settings.get('loss', 'bce')}", **settings.get("loss_kw", {})},
        "missing": {"mode": "uniform", "rate": settings.get("rate", 0.0)},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": settings.get("lr", 0.001)},
        "data": {"seed": settings.get("seed", 0), "root": f"/data/{name}"},
        "paths": {"output_dir": str(d)},
        "tags": ["x"],
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    payload = {"test": metrics, "val": {"mAP": metrics.get("mAP", 0) - 1}, "chance_mAP": 20.0, "run": {}}
    if per_class:
        payload["per_class"] = {"AP": per_class, "positives": {k: 3 for k in per_class}}
    (d / "metrics.json").write_text(json.dumps(payload))
    return d


# seven seeds, differences asl - bce all distinct in magnitude (no ties for the exact Wilcoxon test)
BCE = [70.0, 72.0, 71.0, 69.0, 73.0, 70.5, 71.5]
DIFF = [1.0, 2.5, -0.5, 3.0, 1.5, 4.0, 2.0]


@pytest.fixture
def seeds_sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for s, (b, d) in enumerate(zip(BCE, DIFF)):
        fake_run(root, f"bce_{s}", loss="bce", seed=s, metrics={"mAP": b, "OF1": b / 2})
        fake_run(root, f"asl_{s}", loss="asl", seed=s, metrics={"mAP": b + d, "OF1": b / 2})
    return root


def exact_wilcoxon_p(d: list[float]) -> float:
    """Two-sided exact signed-rank p-value by enumerating all 2^n sign patterns (no ties, no zeros)."""
    ranks = {abs(v): r + 1 for r, v in enumerate(sorted(d, key=abs))}
    w_plus = sum(ranks[abs(v)] for v in d if v > 0)
    n = len(d)
    total = n * (n + 1) / 2
    w = min(w_plus, total - w_plus)
    count = 0
    for signs in itertools.product((0, 1), repeat=n):
        s = sum(r for r, on in zip(range(1, n + 1), signs) if on)
        if min(s, total - s) <= w:
            count += 1
    return count / 2**n


def test_paired_statistics_by_hand(seeds_sweep: Path):
    df = compare.load_runs(seeds_sweep)
    table = build_table(df, ["test.mAP"], ["loss"], baseline=("loss", "bce"))
    asl = next(r for r in table.rows if r[0].text == "asl")
    res = asl[2].paired
    n = len(DIFF)
    mean = sum(DIFF) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in DIFF) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    p_t = 2 * sps.t.sf(abs(t), n - 1)
    half = sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert res.n == n
    assert res.diff == pytest.approx(mean)
    assert (res.ci_low, res.ci_high) == pytest.approx((mean - half, mean + half))
    assert res.p_t == pytest.approx(p_t, rel=1e-9)
    assert res.p_wilcoxon == pytest.approx(exact_wilcoxon_p(DIFF), rel=1e-9)
    # significantly better at alpha 0.05: marked, and the best cell of the column is bold
    assert p_t < 0.05 and asl[1].mark == 1 and asl[1].bold
    bce = next(r for r in table.rows if r[0].text == "bce")
    assert bce[1].is_baseline and cell_text(bce[2], STYLES["markdown"]) == "baseline"
    text = cell_text(asl[2], STYLES["markdown"])
    assert text == f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def test_pairs_follow_the_seed_not_the_order():
    import pandas as pd

    x = pd.Series([10.0, 20.0, 31.0], index=[2, 0, 1])
    b = pd.Series([19.0, 30.0, 9.0, 99.0], index=[0, 1, 2, 3])  # seed 3 has no partner
    res = paired(x, b)
    assert res.n == 3 and res.diff == pytest.approx((1 + 1 + 1) / 3)
    assert res.p_t is None  # identical differences: the t-test is undefined, not "p = 0"
    five = paired(pd.Series([1.0, 3.0, 2.0, 7.0, 4.0]), pd.Series([0.0] * 5))
    assert five.p_t is not None and five.p_wilcoxon is None  # Wilcoxon only from 6 pairs on


def test_fewer_than_two_pairs_is_na_and_single_run_has_no_pm(tmp_path: Path):
    fake_run(tmp_path, "b0", loss="bce", seed=0, metrics={"mAP": 50.0})
    fake_run(tmp_path, "a0", loss="asl", seed=0, metrics={"mAP": 55.0})
    assert summarize(__import__("pandas").Series([55.0])).std is None
    df = compare.load_runs(tmp_path)
    md = render(build_table(df, ["test.mAP"], ["loss"], baseline=("loss", "bce")), "markdown")
    asl_line = next(line for line in md.splitlines() if line.startswith("| asl"))
    assert asl_line == "| asl | **55.00 (1)** | +5.00 [n/a] | n/a |"
    assert "±" not in md


def test_pivot_layout_rows_losses_columns_rates(tmp_path: Path):
    vals = {("bce", 0.0): [80, 82], ("bce", 0.5): [70, 74], ("asl", 0.0): [81, 81], ("asl", 0.5): [76, 78]}
    for (loss, rate), maps in vals.items():
        for seed, m in enumerate(maps):
            fake_run(tmp_path, f"{loss}{rate}_{seed}", loss=loss, rate=rate, seed=seed, metrics={"mAP": m})
    df = compare.load_runs(tmp_path)
    assert compare.default_group_keys(df) == ["loss", "missing_rate"]
    table = build_table(df, ["test.mAP"], ["loss", "missing_rate"], columns="missing_rate")
    md = render(table, "markdown").splitlines()
    assert md[0] == "| loss | missing_rate=0 | missing_rate=0.5 |"
    rows = {line.split(" | ")[0]: line for line in md[2:]}
    std05 = math.sqrt(((70 - 72) ** 2 + (74 - 72) ** 2) / 1)
    assert rows["| bce"] == f"| bce | **81.00 ± 1.41 (2)** | 72.00 ± {std05:.2f} (2) |"
    assert rows["| asl"] == "| asl | **81.00 ± 0.00 (2)** | **77.00 ± 1.41 (2)** |"


def test_latex_table_with_baseline(seeds_sweep: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    argv = [str(seeds_sweep), "--baseline", "loss=bce", "--format", "latex", "--metrics", "test.mAP,test.OF1"]
    assert compare.main([*argv, "--out", str(out)]) == 0
    tex = capsys.readouterr().out.strip().splitlines()
    assert tex[0] == r"\begin{tabular}{lrrrrrr}" and tex[1] == r"\toprule" and tex[3] == r"\midrule"
    assert tex[-2:] == [r"\bottomrule", r"\end{tabular}"]
    assert tex[2] == r"loss & test.mAP & $\Delta$ [95\% CI] & p & test.OF1 & $\Delta$ [95\% CI] & p \\"
    asl = next(line for line in tex if line.startswith("asl"))
    cells = [c.strip() for c in asl.removesuffix(r"\\").split("&")]
    n = len(DIFF)
    mean_asl = sum(b + d for b, d in zip(BCE, DIFF)) / n
    assert cells[1].startswith(rf"\textbf{{{mean_asl:.2f} $\pm$") and cells[1].endswith(r"$^{\uparrow}$")
    assert cells[3].startswith("0.0") and "(W 0.0" in cells[3]
    assert cells[5] == "+0.00 [+0.00, +0.00]" and cells[6] == "n/a"  # OF1 is identical: no test
    written = sorted(p.name for p in out.iterdir())
    assert written == ["table_test.mAP+test.OF1_by_loss_vs_loss=bce.tex"]


def test_different_settings_are_never_merged(tmp_path: Path, capsys):
    # an lr sweep that used seed 0 throughout: two settings, one run each, not "mean ± std, 2 seeds"
    fake_run(tmp_path, "0", lr=0.01, seed=0, metrics={"mAP": 60.0})
    fake_run(tmp_path, "1", lr=0.0001, seed=0, metrics={"mAP": 40.0})
    assert compare.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| optimizer.lr | test.mAP |"
    assert out[2:] == ["| 0.01 | **60.00 (1)** |", "| 0.0001 | 40.00 (1) |"]
    # grouping by loss only would average both lrs: the row is flagged, not silently merged
    assert compare.main([str(tmp_path), "--group-by", "loss"]) == 0
    cap = capsys.readouterr()
    assert "differs in: optimizer.lr" in cap.out and "warning" in cap.err


def test_loss_hyperparameters_and_noise_keys(tmp_path: Path):
    for seed in (0, 1):
        for g in (2, 4):
            fake_run(
                tmp_path, f"g{g}_{seed}", loss="asl", seed=seed, loss_kw={"gamma_neg": g}, metrics={"mAP": g}
            )
    df = compare.load_runs(tmp_path)
    # paths.output_dir, data.root and data.seed (= seed) vary too but are not settings
    assert compare.default_group_keys(df) == ["loss.gamma_neg"]


def test_nested_stage_results_are_not_counted(tmp_path: Path):
    job = fake_run(tmp_path, "job", seed=0, metrics={"mAP": 50.0})
    fake_run(job / "stages", "stage1", seed=0, metrics={"mAP": 10.0})
    df = compare.load_runs(tmp_path)
    assert list(df["test.mAP"]) == [50.0]


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_outputs_named_by_metric_and_replaced_on_rerun(seeds_sweep: Path, capsys):
    runs_before = digest(seeds_sweep)
    argv = [str(seeds_sweep), "--columns", "loss", "--plot", "seed"]
    assert compare.main(argv) == 0
    first = sorted(p.name for p in (seeds_sweep / "compare").iterdir())
    assert first == ["plot_test.mAP_vs_seed_by_loss.png", "table_test.mAP_all_x_loss.md"]
    assert compare.main(argv) == 0 and compare.main([str(seeds_sweep), "--metrics", "test.OF1"]) == 0
    again = sorted(p.name for p in (seeds_sweep / "compare").iterdir())
    assert again == sorted([*first, "table_test.OF1_by_loss.md"])
    after = {k: v for k, v in digest(seeds_sweep).items() if not k.startswith("compare")}
    assert after == runs_before  # run results untouched
    capsys.readouterr()


def test_per_class_table_means_over_runs(tmp_path: Path, capsys):
    fake_run(tmp_path, "b0", loss="bce", seed=0, metrics={"mAP": 1}, per_class={"cat": 10.0, "dog": 30.0})
    fake_run(tmp_path, "b1", loss="bce", seed=1, metrics={"mAP": 1}, per_class={"cat": 20.0, "dog": 50.0})
    fake_run(tmp_path, "a0", loss="asl", seed=0, metrics={"mAP": 1}, per_class={"cat": 90.0, "dog": 0.0})
    from mlcl.compare.plots import per_class_table

    table = per_class_table(compare.load_runs(tmp_path), ["loss"])
    assert table.loc["bce"].tolist() == [15.0, 40.0] and table.loc["asl"].tolist() == [90.0, 0.0]
    assert list(table.columns) == ["cat", "dog"]
    assert compare.main([str(tmp_path), "--per-class"]) == 0
    assert (tmp_path / "compare" / "per_class_AP_by_loss.png").stat().st_size > 1000
    capsys.readouterr()


def test_per_class_columns_of_class_indices_are_in_numeric_order(tmp_path: Path):
    ap = {str(c): float(c) for c in sorted(range(12), key=str)}  # as metrics.json stores them
    fake_run(tmp_path, "b0", loss="bce", seed=0, metrics={"mAP": 1}, per_class=ap)
    from mlcl.compare.plots import per_class_table

    table = per_class_table(compare.load_runs(tmp_path), ["loss"])
    assert list(table.columns) == [str(c) for c in range(12)]  # not 0, 1, 10, 11, 2, ...
    assert table.loc["bce"].tolist() == [float(c) for c in range(12)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--group-by", "lr"],
            "--group-by lr: no such config key in these runs (did you mean optimizer.lr?)",
        ),
        (["--plot", "loss"], "--plot loss: the x axis must be numeric, but loss takes the values asl, bce"),
        (
            ["--baseline", "loss=focal"],
            "--baseline loss=focal: no run has loss=focal; values present: asl, bce",
        ),
        (["--baseline", "bce"], "--baseline 'bce' must look like key=value"),
        (["--metrics", "test.nope"], "--metrics test.nope: not in these runs' metrics.json; available: "),
        (["--columns", "nope"], "--columns nope: no such config key"),
    ],
)
def test_bad_arguments_one_line_exit_2(seeds_sweep: Path, capsys, argv: list[str], message: str):
    assert compare.main([str(seeds_sweep), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlcl-compare: error: {message}") and err.count("\n") == 1
    assert "Traceback" not in err
    assert not (seeds_sweep / "compare").exists()  # nothing written on a bad call


def test_no_runs_is_an_error(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert compare.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("mlcl-compare: error: no metrics.json below")


def test_direction_of_each_metric():
    from mlcl.compare.stats import higher_is_better

    for metric in ("test.mAP", "test.CF1", "representation.probe_mAP", "representation.retrieval_wAP@10"):
        assert higher_is_better(metric), metric
    for metric in ("test.bce", "train.loss", "representation.alignment", "representation.label_uniformity"):
        assert not higher_is_better(metric), metric


def test_default_grouping_with_keys_some_runs_lack(tmp_path):
    """Multi-stage methods add config keys the others lack: runs are still grouped by what they set."""
    import json

    import yaml

    from mlcl.compare import default_group_keys, load_runs

    for i, (method, extra) in enumerate(
        [("bce", {}), ("bce", {}), ("mulcon", {"init_modules": "backbone,head"})]
    ):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "metrics.json").write_text(
            json.dumps({"run": {"method": method, "seed": i}, "test": {"mAP": 50.0}})
        )
        (d / "config.yaml").write_text(yaml.safe_dump({"method_name": method, "seed": i, "lr": 0.1, **extra}))
    df = load_runs(tmp_path)
    keys = default_group_keys(df)
    groups = df.groupby(df[keys].map(str).agg("|".join, axis=1)).size().sort_values().tolist()
    assert groups == [1, 2]  # bce's two seeds together, mulcon apart
