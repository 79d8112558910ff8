"""SupCon / MulSupCon: pure functions against float64 loop references written from spec 3.1/3.2,
hand-computed values, edge cases, bf16; plugins: projection, joint loss, MoCo queue and momentum."""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlcl.losses.base import LossContext
from mlcl.losses.contrastive import MulSupCon, SupCon, mulsupcon_loss, supcon_loss

DT = torch.float64


# ------------------------------------------------------------------------------ loop references
def label_set(targets, b):
    return {c for c in range(targets.shape[1]) if int(targets[b, c]) == 1}


def ref_supcon(features, targets, temperature, base_temperature, contrast_mode, positive_rule):
    """Spec 3.1 literally: view-major contrast list, one anchor at a time."""
    B, V, _ = features.shape
    items = [(v, b) for v in range(V) for b in range(B)]  # view-major order
    vec = [features[b, v] for v, b in items]

    def is_pos(b1, b2):
        if targets is None:
            return b1 == b2
        if targets.ndim == 1:
            return int(targets[b1]) == int(targets[b2])
        s1, s2 = label_set(targets, b1), label_set(targets, b2)
        return s1 == s2 if positive_rule == "exact" else len(s1 & s2) > 0

    anchors = range(len(items)) if contrast_mode == "all" else range(B)
    total = 0.0
    for i in anchors:
        others = [j for j in range(len(items)) if j != i]
        s = {j: torch.dot(vec[i], vec[j]) / temperature for j in others}
        log_z = torch.log(sum(torch.exp(s[j]) for j in others))
        pos = [j for j in others if is_pos(items[i][1], items[j][1])]
        if pos:
            total = total - (temperature / base_temperature) * sum(s[j] - log_z for j in pos) / len(pos)
    return total / len(anchors)


def ref_mulsupcon(q, qt, k, kt, temperature, weighting):
    """Spec 3.2 literally: one row per (query, positive label)."""
    B, C = qt.shape
    K = k.shape[0]
    rows = [(i, c) for i in range(B) for c in range(C) if int(qt[i, c]) == 1]
    total = 0.0
    for i, c in rows:
        s = [torch.dot(q[i], k[j]) / temperature for j in range(K)]
        log_z = torch.log(sum(torch.exp(x) for x in s))
        pos = [j for j in range(K) if int(kt[j, c]) == 1]
        if not pos:
            continue
        ell = -sum(s[j] - log_z for j in pos) / len(pos)
        w = 1.0 / len(rows) if weighting == "mean" else 1.0 / (len(label_set(qt, i)) * B)
        total = total + w * ell
    return torch.as_tensor(total, dtype=DT) if not torch.is_tensor(total) else total


def unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=DT), dim=-1)


def pooled_targets(n, c, gen, pool=4, p=0.4, unknown=0.3):
    """Targets drawn from a few label-set prototypes (so exact matches occur), incl. empty sets and -1."""
    protos = (torch.rand(pool, c, generator=gen) < p).long()
    protos[0] = 0  # an empty label set
    t = protos[torch.randint(0, pool, (n,), generator=gen)]
    hide = torch.rand(n, c, generator=gen) < unknown
    return torch.where(hide & (t == 0), torch.full_like(t, -1), t)


# ------------------------------------------------------------------------------ SupCon function
SUPCON_CASES = [
    ("none", "all", "exact", 2),
    ("none", "one", "exact", 3),
    ("ids", "all", "exact", 2),
    ("ids", "one", "exact", 2),
    ("multi", "all", "exact", 2),
    ("multi", "all", "any", 2),
    ("multi", "one", "exact", 3),
    ("multi", "one", "any", 2),
    ("multi", "all", "exact", 1),
]


@pytest.mark.parametrize("kind,mode,rule,views", SUPCON_CASES)
def test_supcon_matches_loop_reference(kind, mode, rule, views):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{mode}{rule}{views}".encode()))
    B, C, D = 7, 5, 4
    f = unit(B, views, D, gen=gen).requires_grad_()
    if kind == "none":
        t = None
    elif kind == "ids":
        t = torch.randint(0, 3, (B,), generator=gen)
    else:
        t = pooled_targets(B, C, gen)
    kw = dict(temperature=0.3, base_temperature=0.2, contrast_mode=mode, positive_rule=rule)
    got = supcon_loss(f, t, **kw)["loss"]
    (g_got,) = torch.autograd.grad(got, f)
    ref = ref_supcon(f, t, **kw)
    (g_ref,) = torch.autograd.grad(ref, f)
    assert got.dtype == DT and got.shape == ()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)


def test_supcon_hand_computed_simclr():
    # sample 0: both views e1, sample 1: both views e2, τ = τ_b = 1.
    # anchor e1: candidates e1 (s=1), e2, e2 (s=0): log Z = log(e + 2); positive = its other view
    # -> ℓ = -(1 - log(e + 2)) = log(e + 2) - 1; all four anchors are symmetric.
    e1, e2 = torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    f = torch.stack([torch.stack([e1, e1]), torch.stack([e2, e2])])
    out = supcon_loss(f, None, temperature=1.0, base_temperature=1.0)["loss"]
    assert out.item() == pytest.approx(math.log(math.e + 2) - 1, rel=1e-12)
    # same with τ/τ_b = 0.5/1: s = 2 for equal vectors -> ℓ = 0.5 · (log(e² + 2) − 2)
    out = supcon_loss(f, None, temperature=0.5, base_temperature=1.0)["loss"]
    assert out.item() == pytest.approx(0.5 * (math.log(math.e**2 + 2) - 2), rel=1e-12)


def test_supcon_target_forms_agree():
    gen = torch.Generator().manual_seed(1)
    f = unit(6, 2, 3, gen=gen)
    ids = torch.tensor([0, 2, 0, 1, 2, 2])
    onehot = F.one_hot(ids, 3)
    a = supcon_loss(f, ids)["loss"]
    b = supcon_loss(f, onehot)["loss"]
    c = supcon_loss(f, onehot, positive_rule="any")["loss"]
    d = supcon_loss(f, onehot.double())["loss"]  # floating targets with the same values
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=0)
    torch.testing.assert_close(a, d, rtol=1e-12, atol=0)
    # all-distinct class ids = SimCLR
    torch.testing.assert_close(
        supcon_loss(f, torch.arange(6))["loss"], supcon_loss(f, None)["loss"], rtol=1e-12, atol=0
    )


def test_supcon_unknown_is_not_positive():
    gen = torch.Generator().manual_seed(2)
    f = unit(5, 2, 3, gen=gen)
    t = pooled_targets(5, 4, gen)
    t[1, 1] = t[1, 3] = t[4, 0] = -1
    for rule in ("exact", "any"):
        torch.testing.assert_close(
            supcon_loss(f, t, positive_rule=rule)["loss"],
            supcon_loss(f, t.clamp(min=0), positive_rule=rule)["loss"],
            rtol=0,
            atol=0,
        )


def test_supcon_empty_labels():
    gen = torch.Generator().manual_seed(3)
    f = unit(4, 2, 3, gen=gen)
    empty = torch.zeros(4, 3, dtype=torch.long)
    # "exact": empty sets are identical -> every sample is positive with every other (incl. own view)
    # "any": no anchor has a positive -> every ℓ_i = 0 and the mean is exactly 0
    torch.testing.assert_close(
        supcon_loss(f, empty)["loss"], supcon_loss(f, torch.zeros(4, dtype=torch.long))["loss"]
    )
    assert supcon_loss(f, empty, positive_rule="any")["loss"].item() == 0.0
    # one empty sample among labelled ones: its ℓ is 0 but it counts in the mean (A = 2B anchors)
    t = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1]])
    full = supcon_loss(f, t, positive_rule="any")["loss"]
    torch.testing.assert_close(full, ref_supcon(f, t, 0.07, 0.07, "all", "any"), rtol=1e-10, atol=0)


def test_supcon_pure_and_single_vector():
    gen = torch.Generator().manual_seed(4)
    f = unit(3, 2, 4, gen=gen)
    t = torch.tensor([[1, 0], [1, 0], [0, 1]])
    f0, t0 = f.clone(), t.clone()
    supcon_loss(f, t)
    assert torch.equal(f, f0) and torch.equal(t, t0)
    one = unit(1, 1, 4, gen=gen).requires_grad_()
    out = supcon_loss(one)["loss"]
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(one.grad).all()


def test_supcon_bad_arguments():
    f = torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match="contrast_mode"):
        supcon_loss(f, contrast_mode="two")
    with pytest.raises(ValueError, match="positive_rule"):
        supcon_loss(f, torch.ones(2, 3), positive_rule="all")
    with pytest.raises(ValueError, match=r"\[B, V, D\]"):
        supcon_loss(torch.randn(2, 3))


@pytest.mark.parametrize("mode", ["all", "one"])
def test_supcon_bf16_finite_and_close(mode):
    gen = torch.Generator().manual_seed(5)
    f64 = unit(16, 2, 8, gen=gen)
    t = pooled_targets(16, 6, gen)
    f = f64.to(torch.bfloat16).requires_grad_()
    out = supcon_loss(f, t, contrast_mode=mode)["loss"]
    out.backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out)
    assert torch.isfinite(f.grad).all()
    ref = supcon_loss(f.detach().double(), t, contrast_mode=mode)["loss"]
    assert out.double().item() == pytest.approx(ref.item(), rel=2e-2)


def test_supcon_float32_close_to_float64_and_gradcheck():
    gen = torch.Generator().manual_seed(6)
    f = unit(5, 2, 3, gen=gen)
    t = pooled_targets(5, 4, gen)
    torch.testing.assert_close(
        supcon_loss(f.float(), t)["loss"].double(), supcon_loss(f, t)["loss"], rtol=1e-5, atol=0
    )
    fg = f.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, t, temperature=0.5)["loss"], (fg,))


# ------------------------------------------------------------------------------ MulSupCon function
@pytest.mark.parametrize("weighting", ["mean", "per_sample"])
@pytest.mark.parametrize("key_grad", [True, False])
def test_mulsupcon_matches_loop_reference(weighting, key_grad):
    gen = torch.Generator().manual_seed(10 + (weighting == "mean") + 2 * key_grad)
    B, K, C, D = 6, 10, 5, 4
    q = unit(B, D, gen=gen).requires_grad_()
    k = unit(K, D, gen=gen).requires_grad_(key_grad)
    qt = pooled_targets(B, C, gen)
    kt = pooled_targets(K, C, gen)
    kt[:, 4] = torch.where(kt[:, 4] == 1, torch.zeros_like(kt[:, 4]), kt[:, 4])  # label 4: no key has it
    qt[0, 4] = 1  # ... but a query does -> a row with P_r = ∅ (contributes 0, counts in R)
    qt[1] = torch.tensor([0, -1, 0, 0, -1])  # a label-less query
    qt[2, :3] = torch.tensor([1, -1, 1])
    kw = dict(temperature=0.2, weighting=weighting)
    got = mulsupcon_loss(q, qt, k, kt, **kw)["loss"]
    ref = ref_mulsupcon(q, qt, k, kt, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    inputs = (q, k) if key_grad else (q,)
    g_got = torch.autograd.grad(got, inputs)
    g_ref = torch.autograd.grad(ref, inputs)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_mulsupcon_hand_computed():
    # one query e1 with label {0}; keys e1 (labels {0}) and e2 (labels {1}); τ = 1.
    # row (0, 0): softmax over scores (1, 0): log p(key 0) = 1 − log(e + 1) -> ℓ = log(e + 1) − 1
    q = torch.tensor([[1.0, 0.0]], dtype=DT)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    out = mulsupcon_loss(q, torch.tensor([[1, 0]]), k, torch.tensor([[1, 0], [0, 1]]), temperature=1.0)
    assert out["loss"].item() == pytest.approx(math.log(math.e + 1) - 1, rel=1e-12)
    # query labels {0, 1}: row (0, 1) has positive key 1: ℓ = −(0 − log(e + 1)) = log(e + 1)
    # mean over R = 2 rows: (2 log(e + 1) − 1) / 2; per_sample: same (|Y| = 2, B = 1)
    for w in ("mean", "per_sample"):
        out = mulsupcon_loss(
            q, torch.tensor([[1, 1]]), k, torch.tensor([[1, 0], [0, 1]]), temperature=1.0, weighting=w
        )
        assert out["loss"].item() == pytest.approx((2 * math.log(math.e + 1) - 1) / 2, rel=1e-12)


def test_mulsupcon_per_sample_counts_labelless_queries():
    # two identical queries/keys, the second query label-less: mean -> ℓ, per_sample -> ℓ / 2
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DT)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    kt = torch.tensor([[1, 0], [0, 1]])
    qt = torch.tensor([[1, 0], [0, 0]])
    mean = mulsupcon_loss(q, qt, k, kt, temperature=1.0)["loss"]
    per = mulsupcon_loss(q, qt, k, kt, temperature=1.0, weighting="per_sample")["loss"]
    assert mean.item() == pytest.approx(math.log(math.e + 1) - 1, rel=1e-12)
    assert per.item() == pytest.approx(mean.item() / 2, rel=1e-12)


def test_mulsupcon_no_rows_and_unknowns():
    gen = torch.Generator().manual_seed(20)
    q = unit(3, 4, gen=gen).requires_grad_()
    k = unit(5, 4, gen=gen)
    kt = pooled_targets(5, 3, gen)
    out = mulsupcon_loss(q, torch.full((3, 3), -1), k, kt)["loss"]
    out.backward()
    assert out.item() == 0.0 and torch.equal(q.grad, torch.zeros_like(q))
    qt = pooled_targets(3, 3, gen)
    qt[0, 0] = 1
    torch.testing.assert_close(
        mulsupcon_loss(q, qt, k, kt)["loss"], mulsupcon_loss(q, qt.clamp(min=0), k, kt.clamp(min=0))["loss"]
    )
    torch.testing.assert_close(  # floating targets
        mulsupcon_loss(q, qt, k, kt)["loss"], mulsupcon_loss(q, qt.double(), k, kt.float())["loss"]
    )


def test_mulsupcon_pure_bad_args_and_bf16():
    gen = torch.Generator().manual_seed(21)
    q, k = unit(8, 6, gen=gen), unit(24, 6, gen=gen)
    qt, kt = pooled_targets(8, 5, gen), pooled_targets(24, 5, gen)
    qt[:, 0] = 1
    kt[:3, 0] = 1
    copies = [x.clone() for x in (q, qt, k, kt)]
    mulsupcon_loss(q, qt, k, kt)
    assert all(torch.equal(a, b) for a, b in zip(copies, (q, qt, k, kt)))
    with pytest.raises(ValueError, match="weighting"):
        mulsupcon_loss(q, qt, k, kt, weighting="sum")
    qb = q.to(torch.bfloat16).requires_grad_()
    kb = k.to(torch.bfloat16).requires_grad_()
    out = mulsupcon_loss(qb, qt, kb, kt)["loss"]
    out.backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out)
    assert torch.isfinite(qb.grad).all() and torch.isfinite(kb.grad).all()
    ref = mulsupcon_loss(qb.detach().double(), qt, kb.detach().double(), kt)["loss"]
    assert out.double().item() == pytest.approx(ref.item(), rel=2e-2)


def test_mulsupcon_gradcheck():
    gen = torch.Generator().manual_seed(22)
    q = unit(3, 3, gen=gen).requires_grad_()
    k = unit(5, 3, gen=gen).requires_grad_()
    qt, kt = pooled_targets(3, 4, gen), pooled_targets(5, 4, gen)
    qt[:, 1] = 1
    assert torch.autograd.gradcheck(lambda a, b: mulsupcon_loss(a, qt, b, kt)["loss"], (q, k))


# ------------------------------------------------------------------------------ plugins
def ctx(n_rows, views, training=True, inputs=None):
    return LossContext(indices=torch.arange(n_rows), num_views=views, training=training, inputs=inputs)


def test_supcon_plugin_projection_and_joint_loss():
    torch.manual_seed(0)
    B, V, F_, C = 6, 2, 8, 4
    plugin = SupCon(num_classes=C, feature_dim=F_, proj_dims=[16, 5], cls_weight=0.3, con_weight=2.0)
    assert [type(m) for m in plugin.projector] == [nn.Linear, nn.ReLU, nn.Linear]
    feats = torch.randn(V * B, F_)
    logits = torch.randn(V * B, C)
    y = pooled_targets(B, C, torch.Generator().manual_seed(1))
    y_rows = y.repeat(V, 1)  # the module repeats targets per view
    z = plugin.project(feats)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(V * B))
    out = plugin({"features": feats, "logits": logits}, y_rows, ctx(V * B, V))

    # independent composition: rows v*B + b are view v of sample b
    stacked = torch.stack([torch.stack([z[v * B + b] for v in range(V)]) for b in range(B)])
    con = supcon_loss(stacked, y)["loss"]
    bce = F.binary_cross_entropy_with_logits(logits[:B], (y == 1).float())
    torch.testing.assert_close(out["loss_con"], 2.0 * con)
    torch.testing.assert_close(out["loss_cls"], 0.3 * bce)
    torch.testing.assert_close(out["loss"], 0.3 * bce + 2.0 * con)

    plugin_all = SupCon(num_classes=C, feature_dim=F_, proj_dims=[16, 5], classify_views="all")
    out = plugin_all({"features": feats, "logits": logits}, y, ctx(V * B, V))  # [B, C] targets too
    torch.testing.assert_close(
        out["loss_cls"], F.binary_cross_entropy_with_logits(logits, (y_rows == 1).float())
    )


def test_supcon_plugin_pretraining_simclr_and_bn_head():
    torch.manual_seed(1)
    B, V, F_, C = 5, 2, 8, 3
    plugin = SupCon(
        num_classes=C,
        feature_dim=F_,
        proj_dims=[8, 8, 4],
        proj_norm="bn",
        cls_weight=0.0,
        positive_rule="simclr",
        temperature=0.5,
    )
    assert sum(isinstance(m, nn.BatchNorm1d) for m in plugin.projector) == 2
    feats, logits = torch.randn(V * B, F_), torch.randn(V * B, C)
    y = torch.randint(0, 2, (V * B, C))
    out = plugin({"features": feats, "logits": logits}, y, ctx(V * B, V))
    z = plugin.project(feats)
    con = supcon_loss(torch.stack([z[:B], z[B:]], dim=1), None, temperature=0.5)["loss"]
    torch.testing.assert_close(out["loss"], con)
    assert out["loss_cls"].item() == 0.0
    out["loss"].backward()
    assert all(p.grad is not None for p in plugin.projector.parameters())

    with pytest.raises(ValueError, match="data.num_views"):
        plugin({"features": feats[:B], "logits": logits[:B]}, y[:B], ctx(B, 1))
    # validation with one view: classification only, no error
    plugin.eval()
    out = plugin({"features": feats[:B], "logits": logits[:B]}, y[:B], ctx(B, 1, training=False))
    assert out["loss_con"].item() == 0.0
    # label-defined positives work with a single view
    single = SupCon(num_classes=C, feature_dim=F_)
    out = single({"features": feats[:B], "logits": logits[:B]}, y[:B], ctx(B, 1))
    assert torch.isfinite(out["loss"])


class TinyModel(nn.Module):
    """Stand-in for the LightningModule: ``backbone`` (pooled features) and ``head``."""

    def __init__(self, d_in=6, width=8, c=4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d_in, width), nn.Tanh())
        self.head = nn.Linear(width, c)


def make_mulsupcon(queue_size=8, momentum=0.9, **kw):
    torch.manual_seed(0)
    model = TinyModel()
    plugin = MulSupCon(
        num_classes=4,
        feature_dim=8,
        proj_dims=[8, 5],
        queue_size=queue_size,
        momentum=momentum,
        proj_dropout=0.0,
        **kw,
    )
    model.loss_fn = plugin
    plugin.attach(model)
    return model, plugin


def step(model, plugin, x2, y, training=True):
    """One training step's loss call: inputs [2B, d] view-major, targets repeated per view."""
    feats = model.backbone(x2)
    outputs = {"features": feats, "logits": model.head(feats)}
    return plugin(outputs, y.repeat(2, 1), ctx(x2.shape[0], 2, training=training, inputs=x2))


def test_mulsupcon_plugin_key_encoder_is_a_frozen_copy():
    model, plugin = make_mulsupcon()
    assert plugin.key_backbone is not model.backbone
    for a, b in zip(model.backbone.parameters(), plugin.key_backbone.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
    for a, b in zip(plugin.projector.parameters(), plugin.key_projector.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
    # key encoder and queue are checkpointed; the online backbone is not saved a second time
    keys = set(plugin.state_dict())
    assert {"queue_keys", "queue_labels", "queue_ptr", "queue_count"} <= keys
    assert any(k.startswith("key_backbone.") for k in keys) and not any(k.startswith("_online") for k in keys)
    trainable = {id(p) for g in plugin.param_groups() for p in g["params"]}
    assert trainable == {id(p) for p in plugin.projector.parameters()}


def test_mulsupcon_plugin_momentum_update():
    model, plugin = make_mulsupcon(momentum=0.9)
    old_keys = [p.detach().clone() for p in plugin.key_backbone.parameters()]
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    online = [p.detach().clone() for p in model.backbone.parameters()]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 6, generator=gen)
    y = pooled_targets(4, 4, gen)
    step(model, plugin, x, y)
    for k_new, k_old, q in zip(plugin.key_backbone.parameters(), old_keys, online):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
    # no update outside training
    before = [p.detach().clone() for p in plugin.key_backbone.parameters()]
    step(model, plugin, x, y, training=False)
    assert all(torch.equal(a, b) for a, b in zip(before, plugin.key_backbone.parameters()))


def test_mulsupcon_plugin_queue_fill_order_and_loss():
    model, plugin = make_mulsupcon(queue_size=8, momentum=0.5, con_weight=1.0, cls_weight=0.0)
    gen = torch.Generator().manual_seed(4)
    B = 4
    batches = [(torch.randn(2 * B, 6, generator=gen), pooled_targets(B, 4, gen)) for _ in range(3)]
    for _, y in batches:
        y[:, 0] = 1  # every query has a row
    history = []
    for t, (x, y) in enumerate(batches):
        queue_before = plugin.queue_keys.clone(), plugin.queue_labels.clone(), plugin.queue_full
        # expected keys: momentum step first, then the key encoder on view 2
        ref_kb = copy.deepcopy(plugin.key_backbone)
        ref_kp = copy.deepcopy(plugin.key_projector)
        with torch.no_grad():
            for k, q in zip(
                list(ref_kb.parameters()) + list(ref_kp.parameters()),
                list(model.backbone.parameters()) + list(plugin.projector.parameters()),
            ):
                k.mul_(0.5).add_(0.5 * q)
            k_exp = F.normalize(ref_kp(ref_kb(x[B:])), dim=1)
        out = step(model, plugin, x, y)
        q = plugin.project(model.backbone(x[:B]))
        if t < 2:  # queue not yet full: only the in-batch keys are candidates
            assert not queue_before[2]
            expected = mulsupcon_loss(q, y, k_exp, y, temperature=0.1)["loss"]
        else:
            assert queue_before[2]
            keys = torch.cat([k_exp, queue_before[0]])
            labels = torch.cat([y.clamp(min=0), queue_before[1].long()])
            expected = mulsupcon_loss(q, y, keys, labels, temperature=0.1)["loss"]
        torch.testing.assert_close(out["loss"], expected)
        history.append((k_exp, (y == 1).to(torch.int8)))
        out["loss"].backward()
        assert all(p.grad is None for p in plugin.key_backbone.parameters())

    # FIFO: slots 0-3 were batch 0, then overwritten by batch 2; slots 4-7 hold batch 1
    torch.testing.assert_close(plugin.queue_keys[:4], history[2][0])
    torch.testing.assert_close(plugin.queue_keys[4:], history[1][0])
    assert torch.equal(plugin.queue_labels[:4], history[2][1])
    assert torch.equal(plugin.queue_labels[4:], history[1][1])
    assert int(plugin.queue_ptr) == 4 and int(plugin.queue_count) == 8


def test_mulsupcon_plugin_enqueue_wraps_and_eval():
    model, plugin = make_mulsupcon(queue_size=5)
    k = F.normalize(torch.randn(3, 5), dim=1)
    lab = torch.tensor([[1, 0, -1, 0], [0, 1, 0, 0], [1, 1, 0, 0]])
    plugin.enqueue(k, lab)
    plugin.enqueue(k * 2, lab)  # slots 3, 4, then wraps to 0
    assert int(plugin.queue_ptr) == 1 and plugin.queue_full
    torch.testing.assert_close(plugin.queue_keys[[3, 4, 0]], k * 2)
    torch.testing.assert_close(plugin.queue_keys[[1, 2]], k[1:])
    assert torch.equal(plugin.queue_labels[0], torch.tensor([1, 1, 0, 0], dtype=torch.int8))
    assert torch.equal(plugin.queue_labels[3], torch.tensor([1, 0, 0, 0], dtype=torch.int8))
    # evaluation: no enqueue; a single view gives the classification term only
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 6, generator=gen), pooled_targets(2, 4, gen)
    state = plugin.queue_keys.clone(), plugin.queue_ptr.clone()
    step(model, plugin, x, y, training=False)
    assert torch.equal(state[0], plugin.queue_keys) and torch.equal(state[1], plugin.queue_ptr)
    feats = model.backbone(x[:2])
    out = plugin({"features": feats, "logits": model.head(feats)}, y, ctx(2, 1, training=False))
    assert out["loss_con"].item() == 0.0
    with pytest.raises(ValueError, match="data.num_views"):
        plugin({"features": feats, "logits": model.head(feats)}, y, ctx(2, 1, training=True))
    fresh = MulSupCon(num_classes=4, feature_dim=8)
    with pytest.raises(RuntimeError, match="attach"):
        fresh({"features": torch.randn(4, 8), "logits": torch.randn(4, 4)}, y, ctx(4, 2, inputs=x))
