"""Embedding extraction, pictures and the train / eval hooks of the representation diagnostics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tests.conftest import CONF
from tests.test_train import run_cli

from mlcl.diagnostics import embedding_grid, extract, representation_metrics, tsne_png
from mlcl.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def loss_cfg(name: str, **over) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "loss" / f"{name}.yaml"), resolve=True)
    cfg.update(over)
    return cfg


def module_for(loss: dict, num_classes: int = 5):
    from mlcl.models.module import MLCLModule

    torch.manual_seed(0)
    return MLCLModule(
        backbone={"name": "small_cnn", "width": 8},
        loss=loss,
        optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-3},
        num_classes=num_classes,
        num_samples=16,
        in_chans=1,
    )


def batches(n: int = 12, b: int = 5) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 24, 24, generator=g)
    y = (torch.rand(n, 5, generator=g) < 0.4).long()
    return [{"input": x[i : i + b], "target": y[i : i + b]} for i in range(0, n, b)]


@pytest.mark.parametrize(
    ("loss", "feature_key", "label_key"),
    [
        (loss_cfg("bce"), "features", None),
        (loss_cfg("kmcl"), "features", "mu"),
        (
            loss_cfg("mulcon", proj_hidden=16, head_kwargs={"embed_dim": 16, "num_pixel_blocks": 1}),
            None,  # the label-attention head has no sample features: pooled backbone features
            "embeddings",
        ),
    ],
    ids=["linear", "kernel", "label_attention"],
)
def test_extract_reads_the_head_outputs(loss, feature_key, label_key):
    module = module_for(loss)
    module.train()
    data = batches()
    emb = extract(module, data)
    assert module.training  # mode restored
    module.eval()
    with torch.no_grad():
        x = torch.cat([b["input"] for b in data])
        out = module(x)
        want = out[feature_key] if feature_key else module.encode(x)
    torch.testing.assert_close(emb.features, want.float())
    torch.testing.assert_close(emb.labels, torch.cat([b["target"] for b in data]))
    if label_key is None:
        assert emb.label_level is None
    else:
        torch.testing.assert_close(emb.label_level, out[label_key].float())
        assert emb.label_level.shape[:2] == (12, 5)
    metrics = representation_metrics(emb, emb, k=3)
    assert {"alignment", "uniformity", "retrieval_wAP", "retrieval_wAP@3", "probe_mAP"} <= metrics.keys()
    assert ("label_alignment" in metrics) == (label_key is not None)


@pytest.mark.slow
def test_tsne_png_and_grid(tmp_path: Path):
    from matplotlib.image import imread

    g = torch.Generator().manual_seed(0)
    y = (torch.rand(60, 3, generator=g) < 0.5).long()
    z = y.float() * 4 + torch.randn(60, 3, generator=g)
    a = tsne_png(z, y, tmp_path / "a.png", color_by="label_count", max_points=30)
    b = tsne_png(z, y, tmp_path / "b.png", color_by=1, class_names=["x", "y", "z"], max_points=30)
    for p in (a, b):
        assert p.read_bytes()[:8] == PNG_MAGIC
    grid = embedding_grid({"bce": a, "kmcl": b, "mulcon": a}, tmp_path / "grid" / "all.png")
    img = imread(str(grid))
    # three panels side by side: about three times as wide as high
    assert img.shape[1] > 2.5 * img.shape[0]
    two_rows = imread(str(embedding_grid({"a": a, "b": b, "c": a}, tmp_path / "rows.png", columns=2)))
    assert 0.7 < two_rows.shape[0] / two_rows.shape[1] < 1.4
    with pytest.raises(ValueError):
        embedding_grid({}, tmp_path / "none.png")


def test_color_by_must_name_a_class():
    from mlcl.diagnostics.run import _color_by

    assert _color_by("label_count", 4) == "label_count"
    assert _color_by("3", 4) == 3
    for bad in ("4", "red", -1):
        with pytest.raises(UserError, match="diagnostics.color_by"):
            _color_by(bad, 4)


def test_log_sends_numbers_to_every_logger_and_the_picture_to_wandb(tmp_path: Path):
    from unittest import mock

    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from mlcl.diagnostics.run import _log

    csv, wandb = (
        mock.create_autospec(CSVLogger, instance=True),
        mock.create_autospec(WandbLogger, instance=True),
    )
    png = tmp_path / "embeddings.png"
    _log([csv, wandb], {"alignment": 0.5, "val.uniformity": -1.0}, {"test": png})
    for lg in (csv, wandb):
        lg.log_metrics.assert_called_once_with(
            {"representation/alignment": 0.5, "representation/val.uniformity": -1.0}
        )
        lg.save.assert_called_once()
    wandb.log_image.assert_called_once_with(key="representation/embeddings_test", images=[str(png)])
    assert not hasattr(csv, "log_image")


@pytest.mark.parametrize("labels", ["full", "observed"])
def test_run_diagnostics_probe_rows_labels_and_split_names(labels, tmp_path: Path):
    from unittest import mock

    from hydra.utils import instantiate
    from tests.conftest import compose

    from mlcl.diagnostics import run as run_mod
    from mlcl.diagnostics.plot import subsample

    cfg = compose(
        [
            "data.source.sizes.train=80",
            "data.source.sizes.val=24",
            "data.source.sizes.test=30",
            "diagnostics=embeddings",
        ]
        + [f"diagnostics.probe_labels={labels}", "diagnostics.probe_max_train=50", "diagnostics.max_points=0"]
        + ["diagnostics.splits=[val,test]"]
    )
    dm = instantiate(cfg.data, missing={"mode": "uniform", "rate": 0.5, "seed": 0}, num_views=1)
    dm.setup("fit")
    module = module_for(loss_cfg("bce"), num_classes=dm.num_classes)
    seen = []

    def record(train_z, train_y, test_z, test_y, reg):
        seen.append((train_z.shape[0], train_y.clone(), test_y.clone(), reg))
        return 12.5

    with mock.patch.object(run_mod, "linear_probe_map", side_effect=record):
        out = run_mod.run_diagnostics(cfg, module, dm, tmp_path)
    keep = subsample(80, 50, 0)
    full = dm.splits["train"].source.targets.long()
    want = full[keep] if labels == "full" else dm.train_targets[keep]
    assert (labels == "observed") == bool((want == -1).any())  # the mask really differs
    assert [s[0] for s in seen] == [50, 50]
    torch.testing.assert_close(seen[0][1], want)
    torch.testing.assert_close(seen[0][2], dm.splits["val"].targets)
    torch.testing.assert_close(seen[1][2], dm.splits["test"].targets)
    assert seen[0][3] == pytest.approx(1e-3)
    assert out["probe_mAP"] == 12.5 and out["val.probe_mAP"] == 12.5
    assert {"alignment", "val.alignment", "retrieval_wAP@10", "val.retrieval_wAP@10"} <= out.keys()
    assert not list(tmp_path.glob("*.png"))


TINY = [
    "data.source.sizes.train=192",
    "data.source.sizes.val=64",
    "data.source.sizes.test=96",
    "trainer.max_epochs=1",
    "progress_bar=false",
]


@pytest.mark.slow
def test_train_and_eval_store_representation(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_cli(
        "mlcl.train",
        [
            *TINY,
            "diagnostics=embeddings",
            "diagnostics.color_by=2",
            "ema.decay=0.5",
            f"hydra.run.dir={run_dir}",
        ],
    )
    res = json.loads((run_dir / "metrics.json").read_text())
    rep = res["representation"]
    keys = {"alignment", "uniformity", "retrieval_wAP", "retrieval_wAP@10", "retrieval_nDCG@10", "probe_mAP"}
    assert keys == set(rep)
    assert all(math.isfinite(v) for v in rep.values())
    assert (run_dir / "embeddings.png").read_bytes()[:8] == PNG_MAGIC
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"representation/{k}" for k in keys} <= set(header)
    # mlcl-eval on the best checkpoint embeds the same test rows with the same (EMA) weights
    out = tmp_path / "eval"
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    run_cli(
        "mlcl.eval",
        [f"ckpt_path={ckpt}", "diagnostics=embeddings", f"hydra.run.dir={out}", "progress_bar=false"],
    )
    again = json.loads((out / "eval_metrics.json").read_text())["representation"]
    assert again.keys() == rep.keys()
    np.testing.assert_allclose([again[k] for k in keys], [rep[k] for k in keys], rtol=1e-4, atol=1e-6)
    assert (out / "embeddings.png").is_file()


def test_off_by_default_and_composable():
    from tests.conftest import compose

    assert compose([]).diagnostics.enabled is False
    assert compose(["ckpt_path=x"], "eval").diagnostics.enabled is False
    on = compose(["diagnostics=embeddings"])
    assert on.diagnostics.enabled is True and list(on.diagnostics.splits) == ["test"]
