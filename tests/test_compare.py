"""mlcl-compare: grouping over seeds, mean ± std, markdown/CSV, plots, no overwriting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlcl import compare


def fake_run(root: Path, name: str, loss: str, rate: float, seed: int, mAP: float) -> None:
    d = root / name
    d.mkdir(parents=True)
    payload = {
        "run": {
            "loss": loss,
            "backbone": "small_cnn",
            "data": "digits",
            "seed": seed,
            "missing_mode": "uniform",
            "missing_rate": rate,
            "experiment": None,
        },
        "test": {"mAP": mAP, "OF1": mAP / 2},
        "val": {"mAP": mAP - 1},
    }
    (d / "metrics.json").write_text(json.dumps(payload))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    vals = {
        ("bce", 0.0): [80.0, 82.0],
        ("bce", 0.5): [70.0, 74.0],
        ("clml", 0.0): [81.0, 81.0],
        ("clml", 0.5): [76.0, 78.0],
    }
    i = 0
    for (loss, rate), maps in vals.items():
        for seed, m in enumerate(maps):
            fake_run(tmp_path, str(i), loss, rate, seed, m)
            i += 1
    return tmp_path


def test_leaderboard_mean_std_over_seeds(sweep: Path):
    board = compare.leaderboard(compare.load_runs(sweep))
    assert list(board.columns) == ["loss", "missing_rate", "mean", "std", "n"]
    top = board.iloc[0]
    assert (top["loss"], top["missing_rate"], top["mean"], int(top["n"])) == ("bce", 0.0, 81.0, 2)
    row = board[(board.loss == "bce") & (board.missing_rate == 0.5)].iloc[0]
    assert row["mean"] == pytest.approx(72.0)
    assert row["std"] == pytest.approx(2**0.5 * 2)  # sample std of (70, 74)


def test_cli_writes_files_without_overwriting(sweep: Path, capsys):
    assert compare.main([str(sweep), "--plot", "missing_rate"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | bce | 0.0 | 81.00 ± 1.41 | 2 |" in out
    assert (sweep / "leaderboard.md").is_file() and (sweep / "leaderboard.csv").is_file()
    assert (sweep / "test_mAP_vs_missing_rate.png").stat().st_size > 1000
    assert compare.main([str(sweep), "--format", "csv", "--metric", "test.OF1"]) == 0
    assert (sweep / "leaderboard-1.md").is_file()  # the first one is kept


def test_errors_are_explained(tmp_path: Path, sweep: Path, capsys):
    assert compare.main([str(tmp_path / "empty")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
    assert compare.main([str(sweep), "--metric", "test.nope"]) == 2
    assert "available: test.OF1, test.mAP" in capsys.readouterr().err
