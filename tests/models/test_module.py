"""The LightningModule: view handling, loss-plugin wiring, optimiser groups, non-finite losses."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mlcl.losses.base import LOSSES, LossContext, LossPlugin, get_loss_class, list_losses, register_loss
from mlcl.models.module import MLCLModule, masked_bce

OPT = {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 1e-4}


def make_module(loss: dict, **kw) -> MLCLModule:
    args = dict(
        backbone={"name": "small_cnn", "width": 8},
        loss=loss,
        optimizer=OPT,
        num_classes=10,
        num_samples=32,
        in_chans=1,
    )
    args.update(kw)
    return MLCLModule(**args)


def batch(b: int = 4, views: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (b, 1, 24, 24) if views == 1 else (b, views, 1, 24, 24)
    return {
        "input": torch.rand(shape, generator=g),
        "target": torch.randint(-1, 2, (b, 10), generator=g),
        "index": torch.arange(b),
    }


class _Recorder(LossPlugin):
    """Records what the module hands to a plugin."""

    def forward(self, outputs, targets, ctx):
        self.seen = (outputs, targets, ctx)
        return {
            "loss": outputs["logits"].float().sum() * 0 + outputs["logits"].float().mean(),
            "extra": torch.tensor(1.0),
        }


class _NaN(LossPlugin):
    def forward(self, outputs, targets, ctx):
        return {"loss": outputs["logits"].sum() * float("nan")}


for _name, _cls in (("_test_recorder", _Recorder), ("_test_nan", _NaN)):
    if _name not in LOSSES:
        register_loss(_name)(_cls)


def test_views_are_flattened_view_major():
    m = make_module({"_target_": f"{__name__}._Recorder"}, num_views=2)
    b = batch(3, views=2)
    m.training_step(b, 0)
    outputs, targets, ctx = m.loss_fn.seen
    assert outputs["logits"].shape == (6, 10)
    assert ctx.num_views == 2
    assert torch.equal(targets, b["target"].repeat(2, 1))
    assert torch.equal(ctx.indices, torch.tensor([0, 1, 2, 0, 1, 2]))
    # row i of view 1 is sample i's second view
    assert torch.equal(ctx.inputs[4], b["input"][1, 1])


def test_nonfinite_loss_raises_with_advice_or_skips():
    m = make_module({"_target_": f"{__name__}._NaN"})
    with pytest.raises(FloatingPointError, match="non-finite loss.*optimizer.lr"):
        m.training_step(batch(), 0)
    m = make_module({"_target_": f"{__name__}._NaN"}, on_nonfinite="skip")
    assert m.training_step(batch(), 0) is None and m.skipped_steps == 1


def test_bad_loss_target_is_explained():
    with pytest.raises(TypeError, match="not a mlcl.losses.base.LossPlugin"):
        make_module({"_target_": "torch.nn.Linear"})


def test_param_groups_lr_mult_and_no_decay():
    m = make_module(
        {"_target_": "mlcl.losses.classification.BCE"},
        no_decay_1d=True,
        lr_mults={"backbone": 0.1, "head": 0.5, "head.fc": 2.0},
    )
    groups = m._param_groups()
    expect = {
        id(p): (0.1 if n.startswith("backbone.") else 2.0, p.ndim <= 1) for n, p in m.named_parameters()
    }
    got = {id(p): (g["lr_mult"], g.get("weight_decay") == 0.0) for g in groups for p in g["params"]}
    assert got == expect  # every parameter exactly once, longest prefix wins, 1-D ones without decay


def test_masked_bce_ignores_unknown():
    logits = torch.tensor([[0.3, -1.2, 2.0]])
    targets = torch.tensor([[1, -1, 0]])
    sp = torch.nn.functional.softplus
    expected = (sp(-logits[0, 0]) + sp(logits[0, 2])) / 2  # -log σ(x) and -log(1-σ(x))
    assert torch.allclose(masked_bce(logits, targets), expected)


def test_registry_lists_and_rejects():
    names = list_losses()
    for n in ("bce", "focal", "asl", "kmcl", "clml", "mulcon", "supcon", "mulsupcon", "role"):
        assert n in names
    with pytest.raises(KeyError, match="valid losses: .*bce"):
        get_loss_class("nope")


def test_loss_context_defaults():
    ctx = LossContext(indices=torch.arange(3))
    assert ctx.epoch == 0 and ctx.num_views == 1 and ctx.training
