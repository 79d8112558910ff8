"""``load_init_weights`` is strict in both directions and all-or-nothing.

Checkpoints are written by hand here (a state dict plus an EMA copy), so each test controls exactly
which tensors the file has, lacks or adds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mlcl.checkpoints import load_init_weights
from mlcl.models.module import MLCLModule

ROLE = {"_target_": "mlcl.losses.classification.ROLE"}


def build(seed: int, num_classes: int = 5) -> MLCLModule:
    torch.manual_seed(seed)
    return MLCLModule(
        backbone={"name": "small_cnn", "width": 4},
        loss=ROLE,  # a plugin with its own tensor (theta), which init weights must leave alone
        optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-3},
        num_classes=num_classes,
        num_samples=6,
        in_chans=1,
    )


def snapshot(m: MLCLModule) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def write(tmp_path: Path, state: dict[str, Tensor], ema: dict[str, Tensor] | None = None) -> Path:
    path = tmp_path / "init.ckpt"
    ckpt = {"state_dict": state, "hyper_parameters": {"num_classes": 5}}
    if ema is not None:
        ckpt["ema"] = ema
    torch.save(ckpt, path)
    return path


def model_keys(m: MLCLModule, prefixes: tuple[str, ...] = ("backbone.", "head.")) -> list[str]:
    return [k for k in m.state_dict() if k.startswith(prefixes)]


def test_exact_checkpoint_loads_backbone_and_head_only(tmp_path):
    src, dst = build(0), build(1)
    raw = snapshot(src)
    ema = {k: v + 1.0 if v.dtype.is_floating_point else v for k, v in raw.items()}
    path = write(tmp_path, raw, ema)
    before = snapshot(dst)
    for weights, expected in (("raw", raw), ("ema", ema)):
        loaded = load_init_weights(dst, path, weights=weights)
        assert loaded == model_keys(dst)
        after = dst.state_dict()
        for k, v in after.items():
            if k.startswith(("backbone.", "head.")):
                assert torch.equal(v, expected[k]), (weights, k)
            else:  # the plugin's state (ROLE's theta) stays fresh
                assert torch.equal(v, before[k]), (weights, k)
    assert not torch.equal(raw["loss_fn.theta"], before["loss_fn.theta"])


@pytest.mark.parametrize("extra", ["head.extra.weight", "backbone.features.9.0.weight"])
def test_checkpoint_tensor_the_model_lacks_is_an_error(tmp_path, extra):
    src, dst = build(0), build(1)
    state = snapshot(src)
    state[extra] = torch.zeros(3, 3)
    before = snapshot(dst)
    with pytest.raises(ValueError, match="1 tensors the model does not have: " + re.escape(extra)):
        load_init_weights(dst, write(tmp_path, state), weights="raw")
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing was loaded


@pytest.mark.parametrize("drop", ["head.fc.bias", "backbone.features.0.1.running_mean"])
def test_model_tensor_missing_from_the_checkpoint_is_an_error(tmp_path, drop):
    src, dst = build(0), build(1)
    state = snapshot(src)
    del state[drop]
    before = snapshot(dst)
    with pytest.raises(ValueError, match="1 tensors missing from the checkpoint: " + re.escape(drop)):
        load_init_weights(dst, write(tmp_path, state), weights="raw")
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    path = write(tmp_path, snapshot(build(0, num_classes=7)))
    dst = build(1, num_classes=5)
    with pytest.raises(ValueError, match=r"head\.fc\.weight: checkpoint \(7, 16\) vs model \(5, 16\)"):
        load_init_weights(dst, path, weights="raw")


def test_prefixes_limit_both_directions(tmp_path):
    src, dst = build(0), build(1)
    state = {k: v for k, v in snapshot(src).items() if not k.startswith("head.fc.")}
    state["head.unrelated"] = torch.ones(2)  # outside the loaded prefix: neither missing nor extra
    before = snapshot(dst)
    loaded = load_init_weights(dst, write(tmp_path, state), weights="raw", prefixes=["backbone"])
    assert loaded == model_keys(dst, ("backbone.",))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k] if k.startswith("backbone.") else before[k]), k
    state["backbone.unrelated"] = torch.ones(2)
    with pytest.raises(ValueError, match="does not have: backbone.unrelated"):
        load_init_weights(dst, write(tmp_path, state), weights="raw", prefixes=["backbone"])


def test_ema_requested_but_absent_names_the_key(tmp_path):
    path = write(tmp_path, snapshot(build(0)))
    with pytest.raises(ValueError, match="stage1_ckpt=.*no EMA weights"):
        load_init_weights(build(1), path, weights="ema", key="stage1_ckpt")


# --------------------------------------------------------------------------- mlcl-eval's whole-model load
def test_full_state_load_is_exact_and_strict_both_ways():
    from mlcl.checkpoints import load_full_state
    from mlcl.errors import UserError

    src = snapshot(build(1))
    dst = build(2)
    load_full_state(dst, src)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src[k]), k
    short = {k: v for k, v in src.items() if k != "head.fc.weight"}
    with pytest.raises(UserError, match=r"missing from it: head\.fc\.weight"):
        load_full_state(build(3), short)
    extra = {**src, "head.extra.weight": torch.zeros(2)}
    with pytest.raises(UserError, match=r"does not have: head\.extra\.weight"):
        load_full_state(build(3), extra)
