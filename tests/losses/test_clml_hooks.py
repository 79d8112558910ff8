"""CLML hands every plugin hook to its base loss: the base's state is what the base alone would hold.

Regression: CLML forwarded ``attach``, ``on_train_epoch_start`` and ``param_groups`` but not
``on_train_targets``, so ``loss=clml loss.base_loss=role`` trained ROLE with uninitialised label
estimates.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mlcl.losses.base import LOSSES, LossPlugin, get_loss_class, list_losses
from mlcl.losses.clml import CLML
from mlcl.models.module import MLCLModule

C, N = 5, 12


def _bases() -> list[str]:
    """Every registered plugin CLML accepts as its base (linear head, pooled features)."""
    return [
        n
        for n in list_losses()
        if not n.startswith("_") and n != "clml" and LOSSES[n].head == "linear" and not LOSSES[n].spatial
    ]


def _target(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _module(loss: dict) -> MLCLModule:
    torch.manual_seed(0)
    return MLCLModule(
        backbone={"name": "small_cnn", "width": 4},
        loss=loss,
        optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-3},
        num_classes=C,
        num_samples=N,
        in_chans=1,
    )


def _targets() -> Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(-1, 2, (N, C), generator=g)


def _prepare(m: MLCLModule, targets: Tensor) -> None:
    """What train.py does before fitting, then the first epoch's hook."""
    torch.manual_seed(7)  # hooks may draw random numbers (ROLE's unobserved estimates)
    m.loss_fn.on_train_targets(targets)
    m.loss_fn.on_train_epoch_start(0)


def test_every_accepted_base_is_covered():
    assert {"bce", "role", "splc", "large_loss", "asl"} <= set(_bases())


@pytest.mark.parametrize("base", _bases())
def test_base_state_equals_the_base_alone(base: str):
    targets = _targets()
    alone = _module({"_target_": _target(get_loss_class(base))})
    wrapped = _module({"_target_": _target(CLML), "base_loss": base})
    _prepare(alone, targets)
    _prepare(wrapped, targets)
    want, got = alone.loss_fn.state_dict(), wrapped.loss_fn.base.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), f"{base}: {k} differs under CLML"
    # CLML adds no state of its own: its whole state is the base's, under "base."
    assert list(wrapped.loss_fn.state_dict()) == [f"base.{k}" for k in want]
    # the optimiser gets the base's groups with the same options
    groups_alone, groups_wrapped = alone._param_groups(), wrapped._param_groups()
    assert len(groups_wrapped) == len(groups_alone)
    for ga, gw in zip(groups_alone, groups_wrapped, strict=True):
        assert {k: v for k, v in ga.items() if k != "params"} == {
            k: v for k, v in gw.items() if k != "params"
        }
        assert [p.shape for p in ga["params"]] == [p.shape for p in gw["params"]]
        assert all(torch.equal(a, b) for a, b in zip(ga["params"], gw["params"], strict=True))


def test_role_under_clml_starts_from_the_observed_labels():
    targets = _targets()
    m = _module({"_target_": _target(CLML), "base_loss": "role"})
    _prepare(m, targets)
    role = m.loss_fn.base
    assert bool(role.initialised)
    theta = role.theta.detach()
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert torch.allclose(theta[targets == 1], torch.full_like(theta[targets == 1], logit(0.995)))
    assert torch.allclose(theta[targets == 0], torch.full_like(theta[targets == 0], logit(0.005)))
    unknown = theta[targets == -1]
    assert bool((unknown.abs() <= logit(0.6) + 1e-6).all()) and unknown.unique().numel() == unknown.numel()


class _Recorder(LossPlugin):
    """Base plugin that records every hook call it receives."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.calls: list[tuple[str, tuple]] = []

    def forward(self, outputs, targets, ctx):  # pragma: no cover - not called here
        return {"loss": outputs["logits"].sum()}

    def attach(self, model):
        self.calls.append(("attach", (model,)))

    def on_train_targets(self, targets):
        self.calls.append(("on_train_targets", (targets,)))

    def on_train_epoch_start(self, epoch):
        self.calls.append(("on_train_epoch_start", (epoch,)))

    def param_groups(self):
        self.calls.append(("param_groups", ()))
        return [{"params": [], "lr_mult": 3.0, "marker": "from the base"}]


def test_every_protocol_hook_is_forwarded(monkeypatch):
    monkeypatch.setitem(LOSSES, "_hook_recorder", _Recorder)
    # the protocol's hooks, read off the base class: attach, param_groups and every on_* method
    hooks = [n for n in vars(LossPlugin) if n.startswith("on_") or n in ("attach", "param_groups")]
    assert {"attach", "on_train_targets", "on_train_epoch_start", "param_groups"} <= set(hooks)
    plugin = CLML(num_classes=C, feature_dim=8, base_loss="_hook_recorder")
    missing = [h for h in hooks if not hasattr(_Recorder, h) or vars(_Recorder).get(h) is None]
    assert not missing, f"extend _Recorder with the new hooks {missing}"
    model, targets = torch.nn.Linear(2, 2), torch.ones(3, C)
    args = {
        "attach": (model,),
        "on_train_targets": (targets,),
        "on_train_epoch_start": (4,),
        "param_groups": (),
    }
    for hook in hooks:
        result = getattr(plugin, hook)(*args[hook])
        name, got = plugin.base.calls[-1]
        assert name == hook and len(got) == len(args[hook])
        assert all(a is b for a, b in zip(got, args[hook], strict=True)), hook
        if hook == "param_groups":
            assert result == [{"params": [], "lr_mult": 3.0, "marker": "from the base"}]
    assert [c[0] for c in plugin.base.calls] == hooks
