"""Where every registered loss plugin sends gradients in a real training step of the module.

For each plugin (iterated over the registry, so a new plugin is covered without editing this file),
built from its shipped YAML on a tiny small_cnn:

* the total loss reaches every backbone and head parameter, and every plugin parameter the optimiser
  trains; each logged loss term on its own reaches the backbone (a term computed on detached
  features would not); only counts (terms named ``num_*``) may be constants;
* parameters that must not learn (MulSupCon's momentum key encoder, a frozen backbone) get no
  gradient and are not handed to the optimiser.
"""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf
from tests.conftest import CONF
from torch import Tensor, nn

from mlcl.losses.base import get_loss_class, list_losses
from mlcl.models.module import MLCLModule

PLUGINS = [n for n in list_losses() if not n.startswith("_")]
C, B, N = 5, 8, 16

# gradients that are zero by construction, not by a bug: attention scores q.(W x + b) change by the
# same q.b for every key, which softmax ignores, so the key projection's bias gets an exact zero
STRUCTURALLY_ZERO = ("fc_k.bias",)


def loss_config(name: str) -> dict:
    path = CONF / "loss" / f"{name}.yaml"
    if path.is_file():
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    cls = get_loss_class(name)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}"}


def build(name: str, **kw) -> MLCLModule:
    torch.manual_seed(0)
    return MLCLModule(
        backbone={"name": "small_cnn", "width": 4},
        loss=loss_config(name),
        optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-3},
        num_classes=C,
        num_samples=N,
        num_views=get_loss_class(name).num_views,
        in_chans=1,
        **kw,
    )


def step(m: MLCLModule) -> tuple[Tensor, dict[str, Tensor]]:
    """One ``training_step`` on a fixed batch: the total loss and every term the plugin returned."""
    g = torch.Generator().manual_seed(1)
    v = m.num_views
    x = torch.rand((B, v, 1, 16, 16) if v > 1 else (B, 1, 16, 16), generator=g)
    y = (torch.rand(B, C, generator=g) < 0.4).long()
    y[:, 0] = 1  # every sample shares a label: contrastive losses have positives
    y[0, 1], y[1, 2] = -1, -1
    terms: dict[str, Tensor] = {}
    hook = m.loss_fn.register_forward_hook(lambda mod, args, out: terms.update(out))
    m.train()
    loss = m.training_step({"input": x, "target": y, "index": torch.arange(2, 2 + B)}, 0)
    hook.remove()
    assert loss is not None and torch.isfinite(loss)
    return loss, terms


def grads(out: Tensor, params: dict[str, nn.Parameter]) -> dict[str, Tensor | None]:
    got = torch.autograd.grad(out, list(params.values()), retain_graph=True, allow_unused=True)
    return dict(zip(params, got, strict=True))


def reached(g: Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


def optimised(m: MLCLModule) -> set[int]:
    return {id(p) for group in m._param_groups() for p in group["params"]}


@pytest.mark.parametrize("name", PLUGINS)
def test_every_trained_parameter_gets_a_gradient(name: str):
    m = build(name)
    loss, terms = step(m)
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    total = grads(loss, trainable)
    missed = [
        n
        for n, g in total.items()
        if not reached(g) and not (n.startswith("head.") and n.endswith(STRUCTURALLY_ZERO))
    ]
    assert not missed, f"{name}: no gradient reaches {missed}"
    assert {n for n in trainable if n.startswith(("backbone.", "head."))} >= {
        n for n, _ in m.named_parameters() if n.startswith(("backbone.", "head."))
    }
    # the optimiser gets exactly the parameters that learn
    assert optimised(m) == {id(p) for p in trainable.values()}

    backbone = {n: p for n, p in m.named_parameters() if n.startswith("backbone.")}
    # logged counts are named num_* (num_corrected, CLML's base_num_rejected); the rest are loss terms
    loss_terms = [k for k in terms if k != "loss" and not re.search(r"(^|_)num_", k)]
    for key in loss_terms:
        assert terms[key].requires_grad, f"{name}: the {key!r} term is detached from the graph"
        assert any(reached(g) for g in grads(terms[key], backbone).values()), (
            f"{name}: the {key!r} term passes no gradient to the backbone"
        )


@pytest.mark.parametrize("name", PLUGINS)
def test_frozen_backbone_gets_no_gradient(name: str):
    m = build(name, freeze_backbone=True)
    loss, _ = step(m)
    loss.backward()
    for n, p in m.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, n
    for n, p in m.head.named_parameters():
        assert p.grad is not None and (n.endswith(STRUCTURALLY_ZERO) or bool(p.grad.abs().sum() > 0)), n
    assert not optimised(m) & {id(p) for p in m.backbone.parameters()}


def test_mulsupcon_key_encoder_gets_no_gradient():
    m = build("mulsupcon")
    key = {n: p for n, p in m.loss_fn.named_parameters() if n.startswith(("key_backbone.", "key_projector."))}
    # one key tensor per online backbone and projector tensor
    online = [n for n, _ in m.backbone.named_parameters()] + [
        n for n, _ in m.loss_fn.projector.named_parameters()
    ]
    assert len(key) == len(online)
    loss, _ = step(m)
    loss.backward()
    for n, p in key.items():
        assert not p.requires_grad and p.grad is None, n
    assert not optimised(m) & {id(p) for p in key.values()}


def test_every_registered_plugin_is_checked():
    # the checks above are parametrised over the registry; a plugin that never registered is missed
    for name in ("bce", "supcon", "mulsupcon", "mulcon", "kmcl", "clml", "role"):
        assert name in PLUGINS
