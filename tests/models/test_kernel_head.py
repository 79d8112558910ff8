"""Tests of mlcl.models.heads.KernelHead and the reference checkpoint mapping (spec kmcl.md §3, §12.2)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mlcl.models.heads import HEADS, KernelHead
from mlcl.models.heads.kernel import convert_reference_state_dict

F_IN, C, D = 20, 5, 8


def test_signature_and_registry():
    sig = inspect.signature(KernelHead.__init__)
    assert list(sig.parameters)[1:4] == ["in_features", "num_classes", "embed_dim"]
    assert sig.parameters["embed_dim"].default == 128
    expected = dict(loss_case="anisotropic", var_mode="per_class", var_offset=1e-7 + 1 + 1, init="reference")
    for name, default in expected.items():
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert sig.parameters[name].default == default
    assert sig.parameters["var_offset"].default == 2.0000001000000003
    assert HEADS["kernel"] is KernelHead


@pytest.mark.parametrize(
    "loss_case, var_mode, embed_dim, keys_shapes",
    [
        (
            "anisotropic",
            "per_class",
            D,
            {"proj": (D, F_IN), "pi": (C, D), "mean": (C * D, D), "var": (C * D, D)},
        ),
        (
            "anisotropic",
            "shared_dim",
            D,
            {"proj": (D, F_IN), "pi": (C, D), "mean": (C * D, D), "var": (D, D)},
        ),
        (
            "anisotropic",
            "shared_scalar",
            D,
            {"proj": (D, F_IN), "pi": (C, D), "mean": (C * D, D), "var": (1, D)},
        ),
        ("isotropic", "per_class", None, {"pi": (C, F_IN), "mean": (C, F_IN), "var": (C, F_IN)}),
        ("isotropic", "shared_scalar", None, {"pi": (C, F_IN), "mean": (C, F_IN), "var": (1, F_IN)}),
        ("isotropic", "per_class", D, {"proj": (D, F_IN), "pi": (C, D), "mean": (C, D), "var": (C, D)}),
    ],
)
def test_parameters_and_output_shapes(loss_case, var_mode, embed_dim, keys_shapes):
    head = KernelHead(F_IN, C, embed_dim, loss_case=loss_case, var_mode=var_mode)
    dim = F_IN if embed_dim is None else embed_dim
    assert head.out_features == dim
    state = head.state_dict()
    expected = {f"{m}.{p}" for m in keys_shapes for p in ("weight", "bias")}
    assert set(state) == expected
    assert list(head.buffers()) == []
    for m, shape in keys_shapes.items():
        assert tuple(state[f"{m}.weight"].shape) == shape
        assert tuple(state[f"{m}.bias"].shape) == (shape[0],)
    for batch in (3, 1):
        out = head(torch.randn(batch, F_IN))
        assert set(out) == {"features", "logits", "mu", "var"}
        kernel_shape = (batch, C, dim) if loss_case == "anisotropic" else (batch, C)
        assert out["features"].shape == (batch, dim)
        assert out["logits"].shape == (batch, C)
        assert out["mu"].shape == kernel_shape and out["var"].shape == kernel_shape
        assert (out["var"] > 1).all()


def test_forward_layout_matches_reference_formulas():
    torch.manual_seed(0)
    head = KernelHead(F_IN, C, D, init="default")
    x = torch.randn(4, F_IN)
    out = head(x)
    e = x @ head.proj.weight.T + head.proj.bias
    assert torch.allclose(out["features"], e, atol=1e-6)
    assert torch.allclose(out["logits"], e @ head.pi.weight.T + head.pi.bias, atol=1e-6)
    raw_mean = e @ head.mean.weight.T + head.mean.bias
    raw_var = F.elu(e @ head.var.weight.T + head.var.bias) + (1e-7 + 1 + 1)
    # output unit k = d * C + c holds dim d of class c
    for b in range(4):
        for c in range(C):
            for d in range(D):
                assert torch.isclose(out["mu"][b, c, d], raw_mean[b, d * C + c], atol=1e-6)
                assert torch.isclose(out["var"][b, c, d], raw_var[b, d * C + c], atol=1e-6)


def test_shared_variance_modes_broadcast():
    torch.manual_seed(1)
    x = torch.randn(3, F_IN)
    head = KernelHead(F_IN, C, D, var_mode="shared_dim", init="default")
    out = head(x)
    v = F.elu(head.var(out["features"])) + head.var_offset  # [B, D]
    assert torch.equal(out["var"], v[:, None, :].expand(3, C, D))
    head = KernelHead(F_IN, C, D, var_mode="shared_scalar", init="default")
    out = head(x)
    v = F.elu(head.var(out["features"])) + head.var_offset  # [B, 1]
    assert torch.equal(out["var"], v[:, :, None].expand(3, C, D))
    head = KernelHead(F_IN, C, None, loss_case="isotropic", var_mode="shared_scalar", init="default")
    out = head(x)
    assert torch.equal(out["var"], (F.elu(head.var(x)) + head.var_offset).expand(3, C))


def test_reference_init():
    torch.manual_seed(2)
    head = KernelHead(F_IN, C, D)
    assert head.mean.weight.min() >= 0 and head.mean.weight.max() <= 0.1
    assert head.mean.weight.std() > 0.01  # uniform, not constant
    assert torch.all(head.mean.bias == 0)
    assert torch.all(head.var.weight == 1) and torch.all(head.var.bias == 0)
    bound_proj, bound_pi = 1 / F_IN**0.5, 1 / D**0.5
    assert head.proj.weight.abs().max() <= bound_proj and head.proj.bias.abs().max() <= bound_proj
    assert head.pi.weight.abs().max() <= bound_pi and head.pi.bias.abs().max() <= bound_pi
    x = torch.randn(4, F_IN)
    out = head(x)
    # at init sigma² = 2 + ELU(sum_d e_d) for every class and dim of a sample
    expected = F.elu(out["features"].sum(1)) + (1e-7 + 1 + 1)
    assert torch.allclose(out["var"], expected[:, None, None].expand(4, C, D), atol=1e-6)
    default = KernelHead(F_IN, C, D, init="default")
    assert not torch.all(default.var.weight == 1)
    assert default.mean.weight.min() < 0


def test_invalid_arguments():
    with pytest.raises(ValueError):
        KernelHead(F_IN, C, None, loss_case="isotropic", var_mode="shared_dim")
    with pytest.raises(ValueError):
        KernelHead(F_IN, C, D, var_mode="MKS")
    with pytest.raises(ValueError):
        KernelHead(F_IN, C, D, init="xavier")
    with pytest.raises(ValueError):
        KernelHead(F_IN, C, D, loss_case="diagonal")


def test_strict_state_dict_round_trip():
    torch.manual_seed(3)
    a = KernelHead(F_IN, C, D, init="default")
    b = KernelHead(F_IN, C, D)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, F_IN)
    for k, v in a(x).items():
        assert torch.equal(v, b(x)[k])
    with pytest.raises(RuntimeError):
        KernelHead(F_IN, C, None).load_state_dict(a.state_dict(), strict=True)


def test_reference_checkpoint_mapping():
    torch.manual_seed(4)
    downsampler = nn.Conv1d(F_IN, D, 1)
    ref = KernelHead(F_IN, C, D, init="default")  # stands in for the reference `kmm` weights
    state = {"module.encoder.body.conv.weight": torch.randn(3, 3)}
    state["downsampler.weight"] = downsampler.weight.detach().clone()
    state["downsampler.bias"] = downsampler.bias.detach().clone()
    for name in ("pi", "mean", "var"):
        for p in ("weight", "bias"):
            state[f"kmm.{name}.{p}"] = ref.state_dict()[f"{name}.{p}"].clone()
    head_state, backbone_state = convert_reference_state_dict(state)
    assert set(backbone_state) == {"body.conv.weight"}
    assert head_state["proj.weight"].shape == (D, F_IN)
    head = KernelHead(F_IN, C, D)
    head.load_state_dict(head_state, strict=True)
    x = torch.randn(3, F_IN)
    # the reference projection: Conv1d over a length-1 sequence of the pooled vector
    e = downsampler(x[:, :, None])[:, :, 0]
    out = head(x)
    assert torch.allclose(out["features"], e, atol=1e-6)
    ref.proj.load_state_dict({"weight": head_state["proj.weight"], "bias": head_state["proj.bias"]})
    ref_out = ref(x)
    for k in ("logits", "mu", "var"):
        assert torch.allclose(out[k], ref_out[k], atol=1e-6)
    with pytest.raises(KeyError):
        convert_reference_state_dict({"classifier.weight": torch.zeros(1)})


def test_head_outputs_feed_the_loss():
    from mlcl.losses.kmcl import kmcl_loss

    torch.manual_seed(5)
    for kwargs in (dict(), dict(loss_case="isotropic", embed_dim=None), dict(var_mode="shared_dim")):
        embed = kwargs.pop("embed_dim", D)
        head = KernelHead(F_IN, C, embed, **kwargs)
        out = head(torch.randn(6, F_IN))
        targets = (torch.rand(6, C) < 0.5).long()
        loss = kmcl_loss(
            out["features"], out["logits"], out["mu"], out["var"], targets, loss_case=head.loss_case
        )["loss"]
        loss.backward()
        for name, p in head.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
