"""mlcl.losses.mulcon against an independent plain-loop float64 implementation of spec mulcon.md §6–§7."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlcl.losses.base import LossContext, get_loss_class
from mlcl.losses.mulcon import MulCon, mulcon_loss
from mlcl.models.heads import HEADS, LabelAttentionHead, ProjectionHead

KEYS = {"loss", "loss_cls", "loss_con", "num_anchors"}


# --------------------------------------------------------------------------------------------- reference
def loop_reference(z, x, y, tau=0.2, tau_b=0.2, w_cls=1.0, w_con=0.5, denominator_size=0):
    """Spec §6.1–§7 written as plain loops over (b, c) entries, anchors and contrast entries.

    Works on 0-dim torch float64 scalars so that autograd gives reference gradients too.
    """
    B, C, _ = z.shape
    anchors = [(b, c) for b in range(B) for c in range(C) if int(y[b, c]) == 1]
    P = len(anchors)
    negatives = []
    if denominator_size > P:
        candidates = [(b, c) for b in range(B) for c in range(C) if int(y[b, c]) != 1]
        candidates.sort(key=lambda e: -float(x[e[0], e[1]].detach()))
        negatives = candidates[: denominator_size - P]
    members = anchors + negatives
    label = [c for _, c in anchors] + [None] * len(negatives)
    v = []
    for b, c in members:
        row = z[b, c]
        norm = torch.sqrt(sum(row[k] * row[k] for k in range(row.shape[0])))
        v.append(row / torch.clamp(norm, min=1e-12))

    def dot(a, b):
        return sum(a[k] * b[k] for k in range(a.shape[0]))

    total = torch.zeros((), dtype=torch.float64)
    for i in range(P):
        pos = [j for j in range(P) if j != i and label[j] == label[i]]
        if not pos:
            continue
        denom = torch.log(sum(torch.exp(dot(v[i], v[k]) / tau) for k in range(len(members)) if k != i))
        acc = sum(dot(v[i], v[j]) / tau - denom for j in pos)
        total = total - (tau / tau_b) * acc / len(pos)
    l_con = total / P if P > 0 else torch.zeros((), dtype=torch.float64)

    bce = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            t = 1.0 if int(y[b, c]) == 1 else 0.0
            xb = x[b, c]
            bce = bce + torch.clamp(xb, min=0) - xb * t + torch.log1p(torch.exp(-torch.abs(xb)))
    l_cls = bce / (B * C)
    return {
        "loss_cls": w_cls * l_cls,
        "loss_con": w_con * l_con,
        "loss": w_cls * l_cls + w_con * l_con,
        "num_anchors": float(P),
    }


def make_inputs(B=6, C=4, d=5, p=0.4, seed=0, unknown=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, d, generator=g, dtype=torch.float64)
    x = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    y = (torch.rand(B, C, generator=g) < p).long()
    if unknown:
        y[(torch.rand(B, C, generator=g) < unknown) & (y == 0)] = -1
    return z.to(dtype), x.to(dtype), y


def grads(out_key, z, x, y, **kw):
    z = z.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    out = mulcon_loss(z, x, y, **kw)
    gz, gx = torch.autograd.grad(out[out_key], [z, x], allow_unused=True)
    gz = torch.zeros_like(z) if gz is None else gz
    gx = torch.zeros_like(x) if gx is None else gx
    return out, gz, gx


def ref_grads(out_key, z, x, y, **kw):
    z = z.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    out = loop_reference(z, x, y, **kw)
    gz, gx = torch.autograd.grad(out[out_key], [z, x], allow_unused=True)
    gz = torch.zeros_like(z) if gz is None else gz
    gx = torch.zeros_like(x) if gx is None else gx
    return out, gz, gx


REF_KW = {"temperature": "tau", "base_temperature": "tau_b", "bce_weight": "w_cls", "con_weight": "w_con"}


def to_ref_kw(kw):
    return {REF_KW.get(k, k): v for k, v in kw.items()}


# --------------------------------------------------------------------------------------------- values + grads
CASES = [
    dict(),
    dict(temperature=0.1, base_temperature=0.07, bce_weight=0.3, con_weight=1.7),
    dict(denominator_size=20),
    dict(denominator_size=200),  # more requested than exist: use every non-positive
    dict(temperature=0.5, con_weight=0.0),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference_values_and_gradients(kw, seed):
    z, x, y = make_inputs(seed=seed, unknown=0.3)
    for key in ("loss", "loss_con", "loss_cls"):
        out, gz, gx = grads(key, z, x, y, **kw)
        ref, rgz, rgx = ref_grads(key, z, x, y, **to_ref_kw(kw))
        assert set(out) == KEYS
        assert out[key].dtype == torch.float64 and out[key].dim() == 0
        torch.testing.assert_close(out[key], ref[key].detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gz, rgz, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gx, rgx, rtol=1e-9, atol=1e-12)
    assert float(out["num_anchors"]) == ref["num_anchors"]


def test_hand_computed_value():
    # Anchors: (0,0), (1,0) with v = e1 and (0,1) with v = e2. Each class-0 anchor has one positive (s = 1/τ)
    # and one negative (s = 0): ℓ = log(1 + e^{-1/τ}); the class-1 anchor has no positive. L = 2ℓ/3.
    z = torch.zeros(2, 2, 2, dtype=torch.float64)
    z[0, 0] = torch.tensor([3.0, 0.0])
    z[1, 0] = torch.tensor([0.5, 0.0])
    z[0, 1] = torch.tensor([0.0, 2.0])
    z[1, 1] = torch.tensor([7.0, -1.0])  # not an anchor: never read
    y = torch.tensor([[1, 1], [1, 0]])
    x = torch.zeros(2, 2, dtype=torch.float64)
    out = mulcon_loss(z, x, y, temperature=0.2, base_temperature=0.2, con_weight=1.0)
    assert out["loss_con"].item() == pytest.approx(2 * math.log1p(math.exp(-5.0)) / 3, rel=1e-12)
    assert out["loss_cls"].item() == pytest.approx(math.log(2.0), rel=1e-12)
    assert out["num_anchors"].item() == 3.0


def test_gradcheck_finite_differences():
    z, x, y = make_inputs(B=4, C=3, d=3, p=0.5, seed=3, unknown=0.2)
    z.requires_grad_(True)
    x.requires_grad_(True)
    for kw in (dict(), dict(denominator_size=8, temperature=0.3)):
        assert torch.autograd.gradcheck(lambda a, b, kw=kw: mulcon_loss(a, b, y, **kw)["loss"], (z, x))
        assert torch.autograd.gradcheck(
            lambda a, kw=kw: mulcon_loss(a, x, y, chunk_size=2, **kw)["loss"], (z,)
        )


def test_analytic_gradient_formula():
    # §6.4: ∂L/∂v = (G + Gᵀ) V with G_ij = (τ/τ_b)/(Pτ)·[n_i>0]·(p_ij − m_ij/n_i), written here with loops.
    z, x, y = make_inputs(B=5, C=3, d=4, p=0.5, seed=4)
    tau, tau_b = 0.3, 0.2
    sel = [(b, c) for b in range(5) for c in range(3) if y[b, c] == 1]
    P = len(sel)
    v = torch.stack([z[b, c] / z[b, c].norm() for b, c in sel]).requires_grad_(True)
    z_in = torch.zeros_like(z)
    for r, (b, c) in enumerate(sel):
        z_in[b, c] = v[r].detach()
    z_in.requires_grad_(True)
    out = mulcon_loss(z_in, x, y, temperature=tau, base_temperature=tau_b, con_weight=1.0)
    (gz,) = torch.autograd.grad(out["loss_con"], [z_in])
    vd = v.detach()
    G = torch.zeros(P, P, dtype=torch.float64)
    for i in range(P):
        pos = [j for j in range(P) if j != i and sel[j][1] == sel[i][1]]
        if not pos:
            continue
        den = sum(math.exp(float(vd[i] @ vd[k]) / tau) for k in range(P) if k != i)
        for j in range(P):
            if j != i:
                p_ij = math.exp(float(vd[i] @ vd[j]) / tau) / den
                G[i, j] = (tau / tau_b) / (P * tau) * (p_ij - (j in pos) / len(pos))
    g_v = (G + G.T) @ vd
    for r, (b, c) in enumerate(sel):
        expected = g_v[r] - vd[r] * (vd[r] @ g_v[r])  # ‖z‖ = 1, so only the tangent projection remains
        torch.testing.assert_close(gz[b, c], expected, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------------------------- chunked path
@pytest.mark.parametrize("kw", [dict(), dict(denominator_size=60, temperature=0.1, base_temperature=0.3)])
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_matches_plain_float64(kw, chunk):
    z, x, y = make_inputs(B=16, C=6, d=8, p=0.35, seed=5, unknown=0.2)
    plain, gz, gx = grads("loss", z, x, y, **kw)
    chunked, cgz, cgx = grads("loss", z, x, y, chunk_size=chunk, **kw)
    for key in KEYS:
        torch.testing.assert_close(chunked[key], plain[key], rtol=0, atol=1e-10)
    torch.testing.assert_close(cgz, gz, rtol=0, atol=1e-10)
    torch.testing.assert_close(cgx, gx, rtol=0, atol=1e-10)
    assert gz.abs().max() > 1e-3  # the comparison is not vacuous


def test_chunked_edge_cases_and_bad_chunk():
    z, x, _ = make_inputs(B=3, C=3)
    single = torch.zeros(3, 3, dtype=torch.long)
    single[1, 1] = 1
    for y in (torch.zeros(3, 3, dtype=torch.long), single, torch.eye(3, dtype=torch.long)):
        out, gz, _ = grads("loss_con", z, x, y, chunk_size=2)
        assert out["loss_con"].item() == 0.0 and torch.isfinite(gz).all()
    with pytest.raises(ValueError, match="chunk_size"):
        mulcon_loss(z, x, torch.ones(3, 3), chunk_size=0)


# --------------------------------------------------------------------------------------------- edge cases §15
def test_label_in_one_sample_only_counts_in_P_but_adds_zero():
    z, x, _ = make_inputs(B=3, C=3, d=4, seed=6)
    y = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # label 1 only in sample 0
    out, gz, _ = grads("loss_con", z, x, y, con_weight=1.0)
    assert out["num_anchors"].item() == 3.0
    ref = loop_reference(z, x, y, w_con=1.0)
    assert out["loss_con"].item() == pytest.approx(ref["loss_con"].item(), rel=1e-12)
    # Only the two label-0 anchors have a positive: L = (ℓ_a + ℓ_b)/3, computed directly.
    v = F.normalize(z, dim=-1)
    s = lambda i, j: float(v[i] @ v[j]) / 0.2  # noqa: E731
    a, b, lone = (0, 0), (1, 0), (0, 1)
    la = -(s(a, b) - math.log(math.exp(s(a, b)) + math.exp(s(a, lone))))
    lb = -(s(b, a) - math.log(math.exp(s(b, a)) + math.exp(s(b, lone))))
    assert out["loss_con"].item() == pytest.approx((la + lb) / 3, rel=1e-12)
    # The lonely anchor still receives gradient through the other anchors' denominators.
    assert gz[0, 1].abs().sum() > 0


def test_sample_without_positive_only_in_bce():
    z, x, y = make_inputs(B=5, C=4, seed=7, p=0.5)
    y[2] = torch.tensor([0, -1, 0, 0])
    out, gz, _ = grads("loss_con", z, x, y)
    assert torch.all(gz[2] == 0)
    z2 = z.clone()
    z2[2] = torch.randn(4, 5, dtype=torch.float64) * 10
    assert mulcon_loss(z2, x, y)["loss_con"].item() == out["loss_con"].item()


def test_all_positive():
    z, x, _ = make_inputs(B=3, C=3, d=4, seed=8)
    y = torch.ones(3, 3, dtype=torch.long)
    out, gz, gx = grads("loss", z, x, y)
    ref, rgz, rgx = ref_grads("loss", z, x, y)
    assert out["num_anchors"].item() == 9.0
    torch.testing.assert_close(out["loss"], ref["loss"].detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gz, rgz, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("num_pos", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_P0_P1_give_exact_zero_without_nan(num_pos, dtype):
    z, x, _ = make_inputs(B=3, C=3, dtype=dtype)
    y = torch.zeros(3, 3, dtype=torch.long)
    if num_pos:
        y[1, 2] = 1
    out, gz, gx = grads("loss", z, x, y)
    assert out["loss_con"].item() == 0.0 and out["loss_con"].dim() == 0
    assert out["num_anchors"].item() == float(num_pos)
    assert torch.isfinite(gz).all() and torch.all(gz == 0)
    assert torch.isfinite(gx).all()
    # With hard negatives, a single anchor has no positive: still exactly zero.
    out = mulcon_loss(z, x, y, denominator_size=5)
    assert out["loss_con"].item() == 0.0 and torch.isfinite(out["loss"])


def test_no_anchor_with_positive_is_exact_zero():
    z, x, _ = make_inputs(B=3, C=3)
    y = torch.eye(3, dtype=torch.long)  # every label present once
    out, gz, _ = grads("loss_con", z, x, y, denominator_size=6)
    assert out["loss_con"].item() == 0.0 and torch.all(gz == 0)


def test_hard_negatives_selection_and_divisor():
    z, x, y = make_inputs(B=6, C=4, seed=9, p=0.4, unknown=0.3)
    P = int((y == 1).sum())
    k = 3
    out = mulcon_loss(z, x, y, denominator_size=P + k)
    assert out["num_anchors"].item() == P  # hard negatives do not count in P
    ref = loop_reference(z, x, y, denominator_size=P + k)
    assert out["loss_con"].item() == pytest.approx(ref["loss_con"].item(), rel=1e-12)
    # Non-positive entries outside the top-k logits are never read; the chosen ones are.
    nonpos = [(b, c) for b in range(6) for c in range(4) if y[b, c] != 1]
    nonpos.sort(key=lambda e: -float(x[e]))
    z_out = z.clone()
    for e in nonpos[k:]:
        z_out[e] = torch.randn(5, dtype=torch.float64)
    assert mulcon_loss(z_out, x, y, denominator_size=P + k)["loss_con"].item() == out["loss_con"].item()
    z_in = z.clone()
    z_in[nonpos[0]] = -z_in[nonpos[0]]
    assert mulcon_loss(z_in, x, y, denominator_size=P + k)["loss_con"].item() != out["loss_con"].item()
    # −1 entries are hard-negative candidates: a -1 with the largest logit is picked first.
    y2 = y.clone()
    y2[nonpos[0]] = -1
    torch.testing.assert_close(
        mulcon_loss(z, x, y2, denominator_size=P + 1)["loss"],
        loop_reference(z, x, y2, denominator_size=P + 1)["loss"],
        rtol=1e-12,
        atol=0,
    )
    # The contrastive term sends nothing into the logits.
    _, _, gx = grads("loss_con", z, x, y, denominator_size=P + k)
    assert torch.all(gx == 0)


def test_more_hard_negatives_than_exist_uses_all():
    z, x, y = make_inputs(B=4, C=3, seed=10, p=0.6)
    big = mulcon_loss(z, x, y, denominator_size=10_000)
    exact = mulcon_loss(z, x, y, denominator_size=12)  # B·C = 12: every entry is in 𝒮
    assert big["loss_con"].item() == exact["loss_con"].item()
    assert big["loss_con"].item() == pytest.approx(
        loop_reference(z, x, y, denominator_size=10_000)["loss_con"].item(), rel=1e-12
    )


def test_minus_one_identical_to_zero():
    z, x, y = make_inputs(B=6, C=4, seed=11, unknown=0.5)
    assert (y == -1).any()
    y0 = y.clamp(min=0)
    for kw in (dict(), dict(denominator_size=15)):
        a, gza, gxa = grads("loss", z, x, y, **kw)
        b, gzb, gxb = grads("loss", z, x, y0, **kw)
        for key in KEYS:
            assert a[key].item() == b[key].item()
        assert torch.equal(gza, gzb) and torch.equal(gxa, gxb)


def test_target_dtypes():
    z, x, y = make_inputs(B=5, C=4, seed=12)
    base = mulcon_loss(z, x, y)
    for yy in (y.bool(), y.float(), y.double(), y.int()):
        out = mulcon_loss(z, x, yy)
        for key in KEYS:
            assert out[key].item() == base[key].item()


# ------------------------------------------------------------------------------------------- §6.6 properties
def random_rotation(d, seed):
    q, r = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q * torch.sign(torch.diagonal(r))


def test_invariances():
    z, x, y = make_inputs(B=8, C=5, d=6, seed=13, p=0.4)
    base = mulcon_loss(z, x, y)["loss_con"].item()
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert mulcon_loss(z[perm], x[perm], y[perm])["loss_con"].item() == pytest.approx(base, rel=1e-12)
    scale = torch.rand(8, 5, 1, dtype=torch.float64) * 10 + 0.1
    assert mulcon_loss(z * scale, x, y)["loss_con"].item() == pytest.approx(base, rel=1e-12)
    rot = random_rotation(6, 1)
    assert mulcon_loss(z @ rot, x, y)["loss_con"].item() == pytest.approx(base, rel=1e-12)
    z_other = torch.where((y == 1).unsqueeze(-1), z, torch.randn_like(z) * 100)
    assert mulcon_loss(z_other, x, y)["loss_con"].item() == base
    # Already-normalised inputs: same value; the gradient w.r.t. v is the same, so ∂/∂z scales by 1/‖z‖.
    norm = z.norm(dim=-1, keepdim=True)
    out_z, gz, _ = grads("loss_con", z, x, y)
    out_v, gv, _ = grads("loss_con", z / norm, x, y)
    assert out_v["loss_con"].item() == pytest.approx(out_z["loss_con"].item(), rel=1e-12)
    torch.testing.assert_close(gz * norm, gv, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_lower_bound(seed):
    z, x, y = make_inputs(B=10, C=3, d=4, seed=seed, p=0.5)
    tau, tau_b = 0.2, 0.35
    out = mulcon_loss(z, x, y, temperature=tau, base_temperature=tau_b, con_weight=1.0)
    counts = (y == 1).sum(0)
    P = int(counts.sum())
    bound = (tau / tau_b) / P * sum(int(n) * math.log(int(n) - 1) for n in counts if n > 1)
    assert out["loss_con"].item() >= bound - 1e-12
    # Perfectly clustered features (one direction per label, labels orthogonal) approach the bound.
    clustered = F.one_hot(torch.arange(3), 4).to(torch.float64).expand(10, 3, 4)
    tight = mulcon_loss(clustered, x, y, temperature=0.01, base_temperature=0.01, con_weight=1.0)
    bound_tight = sum(int(n) * math.log(int(n) - 1) for n in counts if n > 1) / P
    assert tight["loss_con"].item() == pytest.approx(bound_tight, abs=1e-6)


def test_views_are_positives_and_labels_of_one_image_negatives():
    y = torch.tensor([[1, 1], [1, 1]])  # two views of one image with labels {0, 1}
    x = torch.zeros(2, 2, dtype=torch.float64)
    e = torch.eye(3, dtype=torch.float64)
    aligned = torch.stack([torch.stack([e[0], e[1]]), torch.stack([e[0], e[1]])])  # views agree, labels apart
    mixed = torch.stack([torch.stack([e[0], e[0]]), torch.stack([e[1], e[1]])])  # labels of an image collapse
    assert mulcon_loss(aligned, x, y)["loss_con"] < mulcon_loss(mixed, x, y)["loss_con"]


def test_stage_one_equality_mean_bce():
    z, x, y = make_inputs(B=6, C=4, seed=14, unknown=0.3)
    zz = z.clone().requires_grad_(True)
    out = mulcon_loss(zz, x, y, con_weight=0.0, bce_weight=1.0)
    t = (y == 1).double()
    p = torch.sigmoid(x)
    mean_bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    assert out["loss"].item() == pytest.approx(mean_bce.item(), rel=1e-12)
    assert out["loss_con"].item() == 0.0
    (g,) = torch.autograd.grad(out["loss"], [zz])
    assert torch.all(g == 0)


# --------------------------------------------------------------------------------------------- dtypes, checks
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_upcast_and_finite(dtype):
    z, x, y = make_inputs(B=16, C=8, d=16, seed=15, p=0.3, unknown=0.2)
    ref = mulcon_loss(z.float(), x.float(), y, denominator_size=40)
    zh = z.to(dtype).requires_grad_(True)
    xh = x.to(dtype).requires_grad_(True)
    out = mulcon_loss(zh, xh, y, denominator_size=40)
    for key in KEYS:
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key])
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=2e-2, atol=2e-2)
    out["loss"].backward()
    assert zh.grad.dtype == dtype and torch.isfinite(zh.grad).all() and torch.isfinite(xh.grad).all()


def test_dtype_follows_input():
    z, x, y = make_inputs()
    assert mulcon_loss(z, x, y)["loss"].dtype == torch.float64
    assert mulcon_loss(z.float(), x.float(), y)["loss"].dtype == torch.float32


def test_zero_projection_vector_is_finite():
    z, x, _ = make_inputs(B=3, C=2, d=3)
    y = torch.ones(3, 2, dtype=torch.long)
    z[0, 0] = 0.0
    out, gz, _ = grads("loss", z, x, y)
    assert torch.isfinite(out["loss"]) and torch.isfinite(gz).all()


def test_inputs_not_modified():
    z, x, y = make_inputs(unknown=0.3)
    copies = (z.clone(), x.clone(), y.clone())
    mulcon_loss(z, x, y, denominator_size=10)
    mulcon_loss(z, x, y, denominator_size=10, chunk_size=2)
    assert all(torch.equal(a, b) for a, b in zip((z, x, y), copies))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(features=torch.zeros(2, 3)), "features"),
        (dict(logits=torch.zeros(2, 4)), "logits"),
        (dict(targets=torch.zeros(3, 3)), "targets"),
        (dict(temperature=0.0), "temperature"),
        (dict(base_temperature=-1.0), "base_temperature"),
        (dict(bce_weight=-0.1), "bce_weight"),
        (dict(con_weight=-0.1), "con_weight"),
        (dict(denominator_size=-1), "denominator_size"),
        (dict(denominator_size=1.5), "denominator_size"),
    ],
)
def test_bad_inputs_raise_value_error_naming_argument(kwargs, name):
    args = dict(features=torch.zeros(2, 3, 4), logits=torch.zeros(2, 3), targets=torch.zeros(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        mulcon_loss(args.pop("features"), args.pop("logits"), args.pop("targets"), **args)


def test_no_quadratic_all_pairs_matrix():
    # B·C = 65,536 entries: an all-pairs matrix would need 16 GiB; selecting first keeps this instant.
    B, C, d = 512, 128, 8
    z = torch.randn(B, C, d)
    x = torch.randn(B, C)
    y = torch.zeros(B, C, dtype=torch.long)
    y[torch.arange(B), torch.arange(B) % 5] = 1
    out = mulcon_loss(z, x, y)
    assert out["num_anchors"].item() == B and torch.isfinite(out["loss"])


# --------------------------------------------------------------------------------------------- plugin
def small_head(C=5, E=16):
    torch.manual_seed(0)
    return LabelAttentionHead(8, C, embed_dim=E, num_heads=2, num_pixel_blocks=1, num_label_blocks=1)


def test_plugin_registration_and_attributes():
    cls = get_loss_class("mulcon")
    assert cls is MulCon
    assert cls.head == "label_attention" and HEADS[cls.head] is LabelAttentionHead
    assert cls.spatial is True
    assert "0" in cls.unknown_policy
    head = cls.build_head(8, 5, {"embed_dim": 16, "num_heads": 2})
    assert isinstance(head, LabelAttentionHead) and head.out_features == 16
    assert len(head.pixel_blocks) == 2 and len(head.label_blocks) == 1  # defaults kept for unset keys


def test_plugin_matches_projecting_every_row():
    head = small_head()
    plugin = MulCon(
        num_classes=5,
        feature_dim=16,
        head_kwargs={"embed_dim": 16},
        proj_hidden=12,
        proj_dim=6,
        denominator_size=14,
    )
    plugin.double()
    head.double()
    assert isinstance(plugin.projector, ProjectionHead)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(6, 8, 3, 2, generator=g, dtype=torch.float64)
    y = (torch.rand(6, 5, generator=g) < 0.4).long()
    y[0, 0], y[3, 0] = -1, 1
    ctx = LossContext(indices=torch.arange(6))
    out = plugin(head(feats), y, ctx)
    grads_plugin = torch.autograd.grad(out["loss"], list(plugin.parameters()) + list(head.parameters()))
    # Independent path: project all B·C rows, then the pure loss.
    outputs = head(feats)
    ref = mulcon_loss(plugin.projector(outputs["embeddings"]), outputs["logits"], y, denominator_size=14)
    grads_ref = torch.autograd.grad(ref["loss"], list(plugin.parameters()) + list(head.parameters()))
    assert set(out) == KEYS
    for key in KEYS:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-12, atol=1e-14)
    for a, b in zip(grads_plugin, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert out["loss_con"].item() > 0


def test_plugin_views_repeat_targets():
    head = small_head()
    plugin = MulCon(num_classes=5, feature_dim=16, proj_hidden=8)
    feats = torch.randn(4, 8, 2, 2)
    y = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, -1]])
    out = plugin(head(feats), y, LossContext(indices=torch.arange(2).repeat(2), num_views=2))
    ref = plugin(head(feats), y.repeat(2, 1), LossContext(indices=torch.arange(4)))
    assert out["num_anchors"].item() == 8.0
    torch.testing.assert_close(out["loss"], ref["loss"])


def test_plugin_stage_one_has_no_projector():
    head = small_head()
    plugin = MulCon(num_classes=5, feature_dim=16, con_weight=0.0)
    assert plugin.projector is None and len(list(plugin.parameters())) == 0
    assert plugin.param_groups() == []
    feats = torch.randn(3, 8, 2, 2)
    y = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, -1], [1, 1, 0, 0, 0]])
    outputs = head(feats)
    out = plugin(outputs, y, LossContext(indices=torch.arange(3)))
    mean_bce = F.binary_cross_entropy_with_logits(outputs["logits"], (y == 1).float())
    torch.testing.assert_close(out["loss"], mean_bce)
    assert out["loss_con"].item() == 0.0


def test_plugin_validates_hyper_parameters():
    with pytest.raises(ValueError, match="temperature"):
        MulCon(num_classes=5, feature_dim=16, temperature=0)
    with pytest.raises(ValueError, match="con_weight"):
        MulCon(num_classes=5, feature_dim=16, con_weight=-1)
