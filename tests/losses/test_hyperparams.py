"""Declared hyper-parameters of the representation-learning plugins against their YAML and pure functions.

Each plugin declares its hyper-parameters once (``hyperparams``); the constructor takes them as keywords.
These tests compare that single declaration with two independent sources of the same defaults: the
shipped ``conf/loss/<name>.yaml`` and the keyword defaults of the pure loss function (read with
``inspect.signature``), and check that a plugin built without keywords really uses them.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mlcl.config.params import ConfigError
from mlcl.losses.clml import CLML, clml_loss
from mlcl.losses.contrastive import MulSupCon, SupCon, mulsupcon_loss, supcon_loss
from mlcl.losses.kmcl import KMCL, kmcl_loss
from mlcl.losses.mulcon import MulCon, mulcon_loss

CONF = Path(__file__).resolve().parents[2] / "src" / "mlcl" / "conf" / "loss"

#: registry name -> (plugin, pure function, keywords of the function that are not hyper-parameters)
CASES = {
    "kmcl": (KMCL, kmcl_loss, set()),
    "supcon": (SupCon, supcon_loss, set()),
    "mulsupcon": (MulSupCon, mulsupcon_loss, set()),
    "clml": (CLML, clml_loss, {"method"}),  # the slow reference path, chosen in tests only
    "mulcon": (MulCon, mulcon_loss, set()),
}
#: arguments every plugin takes besides its hyper-parameters (may appear in the YAML)
BASE_KEYS = {"_target_", "gather", "head_kwargs"}


def _function_defaults(fn) -> dict:
    """Keyword-only arguments of ``fn`` that have a default."""
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_declared_defaults_equal_yaml(name):
    plugin_cls = CASES[name][0]
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    defaults = plugin_cls.hyperparam_defaults()
    assert set(cfg) - BASE_KEYS == set(defaults)
    for key, default in defaults.items():
        assert cfg[key] == default, key


@pytest.mark.parametrize("name", sorted(CASES))
def test_declared_defaults_equal_pure_function(name):
    plugin_cls, fn, not_hyper = CASES[name]
    fn_defaults = _function_defaults(fn)
    declared = plugin_cls.hyperparam_defaults()
    # every tunable keyword of the maths is a declared hyper-parameter with the same default
    assert set(fn_defaults) - not_hyper <= set(declared)
    for key in set(fn_defaults) - not_hyper:
        assert declared[key] == fn_defaults[key], key
    # and a plugin built without keywords really uses it
    plugin = plugin_cls(num_classes=3, feature_dim=8)
    for key in set(fn_defaults) - not_hyper:
        value = getattr(plugin, key)
        assert value == fn_defaults[key] and type(value) is type(fn_defaults[key]), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_yaml_values_reach_the_plugin(name):
    plugin_cls = CASES[name][0]
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    plain = OmegaConf.to_container(cfg, resolve=True)
    plugin = plugin_cls(
        num_classes=3, feature_dim=8, **{k: v for k, v in plain.items() if k not in {"_target_"}}
    )
    for key in plugin_cls.hyperparams:
        assert getattr(plugin, key) == plain[key], key
    assert plugin.gather is plain["gather"]


@pytest.mark.parametrize(
    "name, key, bad",
    [
        ("kmcl", "temperature", 0.0),
        ("kmcl", "impl", "sparse"),
        ("supcon", "positive_rule", "all"),
        ("mulsupcon", "queue_size", -1),
        ("clml", "lambda_", -1.0),
        ("mulcon", "denominator_size", 1.5),
    ],
)
def test_constructor_checks_the_declaration(name, key, bad):
    with pytest.raises(ConfigError, match=rf"loss\.{key}"):
        CASES[name][0](num_classes=3, feature_dim=8, **{key: bad})
    with pytest.raises(TypeError, match="no_such_key"):
        CASES[name][0](num_classes=3, feature_dim=8, no_such_key=1)
