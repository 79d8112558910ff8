"""Tests of mlcl.losses.kmcl (spec specs/kmcl.md §4, §9, §12).

The reference below is a deliberately plain loop transcription of spec §4 in float64 (ratio of
sums, exp(BC/T), explicit partner sets), independent of the vectorised log-space code under test.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch

from mlcl.losses import kmcl as kmcl_module
from mlcl.losses.base import LOSSES, LossContext
from mlcl.losses.kmcl import KMCL, kmcl_loss

DEFAULTS = dict(
    loss_case="anisotropic",
    gamma_neg=4.0,
    gamma_pos=0.0,
    clip=0.05,
    eps=1e-7,
    temperature=0.17,
    detach_focal_weight=True,
    loss_opt="all",
    unknown="negative",
    aniso_dim_scale=True,
    sd_eps=1.4901161193847656e-08,
    gauss_floor=1.17549e-38,
    log_eps=1e-7,
    asl_weight=1.0,
    rec_weight=1.0,
    kmcl_weight=1.0,
)
# float(t) on the differentiable outputs is intended here
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")
KEYS = ("asl", "rec", "kmcl", "loss")
NAMES = ("features", "logits", "mu", "var")


# ------------------------------------------------------------------------------------------------
# independent loop reference (spec §4)


def loop_reference(features, logits, mu, var, targets, **kw):
    p = {**DEFAULTS, **kw}
    bsz, ncls = logits.shape
    t = [[int(v) for v in row] for row in targets.tolist()]
    iso = p["loss_case"] == "isotropic"
    z = [list(r.unbind(0)) for r in logits.unbind(0)]

    # (a) ASL, §4.1
    asl = 0.0
    for b in range(bsz):
        for c in range(ncls):
            if p["unknown"] == "ignore" and t[b][c] == -1:
                continue
            prob = torch.sigmoid(z[b][c])
            q = torch.clamp(1 - prob + p["clip"], max=1.0) if p["clip"] > 0 else 1 - prob
            if t[b][c] == 1:
                term = torch.log(torch.clamp(prob, min=p["eps"]))
                weight = (1 - prob) ** p["gamma_pos"]
            else:
                term = torch.log(torch.clamp(q, min=p["eps"]))
                weight = (1 - q) ** p["gamma_neg"]
            if p["gamma_pos"] > 0 or p["gamma_neg"] > 0:
                term = term * (weight.detach() if p["detach_focal_weight"] else weight)
            asl = asl - term
    if p["loss_opt"] == "asl_only":
        zero = torch.zeros((), dtype=torch.float64)
        return {"asl": asl, "rec": zero, "kmcl": zero, "loss": p["asl_weight"] * asl}

    dim = features.shape[1]
    e = [list(r.unbind(0)) for r in features.unbind(0)]
    sd = torch.sqrt(torch.clamp(var, min=1e-20)) + p["sd_eps"]
    if iso:
        m = [[mu[b, c] for c in range(ncls)] for b in range(bsz)]
        s = [[sd[b, c] for c in range(ncls)] for b in range(bsz)]
    else:
        m = [[list(mu[b, c].unbind(0)) for c in range(ncls)] for b in range(bsz)]
        s = [[list(sd[b, c].unbind(0)) for c in range(ncls)] for b in range(bsz)]

    # (b) reconstruction, §4.2 (ratio of sums)
    rec = 0.0
    for b in range(bsz):
        num, den = 0.0, 0.0
        for c in range(ncls):
            q = 0.0
            for d in range(dim):
                mean, std = (m[b][c], s[b][c]) if iso else (m[b][c][d], s[b][c][d])
                q = q + (e[b][d] - mean) ** 2 / std**2
            kernel = torch.clamp(torch.exp(-q / 2), min=p["gauss_floor"])
            mass = torch.sigmoid(z[b][c]) * kernel
            if t[b][c] == 1:
                num = num + mass
            if p["unknown"] == "negative" or t[b][c] != -1:
                den = den + mass
        # a row without positive has r = 0 (spec §9.2), also when "ignore" leaves den = 0
        ratio = num / den if 1 in t[b] else torch.zeros((), dtype=torch.float64)
        rec = rec - torch.log(torch.clamp(ratio, min=p["eps"]))
    rec = rec / bsz

    # (c) kernel contrastive, §4.3
    def bd(i, j, c):
        if iso:
            si, sj, mi, mj, kappa, dims = s[i][c], s[j][c], m[i][c], m[j][c], dim, [None]
        else:
            kappa = dim if p["aniso_dim_scale"] else 1
            dims = range(len(m[i][c]))
        total = 0.0
        for d in dims:
            if not iso:
                si, sj, mi, mj = s[i][c][d], s[j][c][d], m[i][c][d], m[j][c][d]
            w = si**2 + sj**2
            total = total + 0.5 * torch.log(w / (2 * si * sj)) + 0.25 * (mi - mj) ** 2 / w
        return kappa * total

    cache = {}

    def big_e(i, j, c):
        if (i, j, c) not in cache:
            cache[(i, j, c)] = torch.exp(torch.exp(-bd(i, j, c)) / p["temperature"])
        return cache[(i, j, c)]

    labels = [{c for c in range(ncls) if t[b][c] == 1} for b in range(bsz)]
    con = 0.0
    for i in range(bsz):
        partners = [j for j in range(bsz) if j != i and labels[i] & labels[j]]
        if not partners:
            continue
        li = 0.0
        for j in partners:
            jac = len(labels[i] & labels[j]) / len(labels[i] | labels[j])
            for c in sorted(labels[i] & labels[j]):
                z_ic = sum(big_e(i, k, c) for k in range(bsz) if k != i)
                li = li + torch.log(jac * big_e(i, j, c) / z_ic + p["log_eps"])
        con = con - li / len(partners)
    con = torch.as_tensor(con, dtype=torch.float64) / bsz
    loss = p["asl_weight"] * asl + p["rec_weight"] * rec + p["kmcl_weight"] * con
    return {"asl": asl, "rec": rec, "kmcl": con, "loss": loss}


# ------------------------------------------------------------------------------------------------
# helpers


def make_inputs(bsz, ncls, dim, case="anisotropic", seed=0, p_pos=0.4, mu_scale=0.05, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (bsz, ncls, dim) if case == "anisotropic" else (bsz, ncls)
    targets = (torch.rand(bsz, ncls, generator=g) < p_pos).long()
    return {
        "features": (0.5 * torch.randn(bsz, dim, generator=g)).to(dtype).requires_grad_(),
        "logits": torch.randn(bsz, ncls, generator=g).to(dtype).requires_grad_(),
        "mu": (mu_scale * torch.randn(*shape, generator=g)).to(dtype).requires_grad_(),
        "var": (1 + 0.5 * torch.rand(*shape, generator=g)).to(dtype).requires_grad_(),
        "targets": targets,
    }


def leaves(x):
    return [x[n] for n in NAMES]


def run(fn, x, **kw):
    out = fn(x["features"], x["logits"], x["mu"], x["var"], x["targets"], **kw)
    grads = torch.autograd.grad(out["loss"], leaves(x), allow_unused=True)
    return out, grads


def assert_close_outputs(out, ref, rtol=1e-10, atol=1e-12):
    for k in KEYS:
        got, want = float(out[k].detach()), float(torch.as_tensor(ref[k]).detach())
        assert got == pytest.approx(want, rel=rtol, abs=atol), (k, got, want)


def assert_close_grads(grads, ref_grads, tol=1e-10):
    for name, g, r in zip(NAMES, grads, ref_grads):
        g = torch.zeros(()) if g is None else g
        r = torch.zeros(()) if r is None else r
        scale = max(float(r.abs().max()), 1e-30)
        assert float((g - r).abs().max()) <= tol * scale + 1e-14, name


# ------------------------------------------------------------------------------------------------
# contract


def test_signature_matches_contract():
    sig = inspect.signature(kmcl_loss)
    params = list(sig.parameters.values())
    assert [q.name for q in params[:5]] == ["features", "logits", "mu", "var", "targets"]
    for name, default in DEFAULTS.items():
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert sig.parameters[name].default == default, name


def test_return_keys_dtype_and_zero_dim():
    for dtype in (torch.float32, torch.float64):
        x = make_inputs(5, 4, 3, dtype=dtype)
        out = kmcl_loss(*leaves(x), x["targets"])
        assert set(out) == set(KEYS)
        for v in out.values():
            assert v.ndim == 0 and v.dtype == dtype


# ------------------------------------------------------------------------------------------------
# values and gradients against the loop reference

CONFIGS = {
    "aniso_default": dict(),
    "iso_default": dict(loss_case="isotropic"),
    "aniso_true_distance": dict(aniso_dim_scale=False),
    "aniso_hyper": dict(
        gamma_pos=1.0, gamma_neg=2.0, clip=0.0, temperature=0.5, detach_focal_weight=False, log_eps=1e-3
    ),
    "weights": dict(asl_weight=0.3, rec_weight=2.5, kmcl_weight=7.0),
    "iso_weights_hyper": dict(loss_case="isotropic", kmcl_weight=3.0, rec_weight=0.5, temperature=1.3),
    "asl_only": dict(loss_opt="asl_only"),
}


@pytest.mark.parametrize("impl", ["fast", "dense"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_loop_reference(name, impl):
    kw = CONFIGS[name]
    case = kw.get("loss_case", "anisotropic")
    x = make_inputs(6, 4, 3, case=case, seed=1)
    x["targets"][0] = 0  # a row without positives
    x["targets"][1] = 1  # a row with every label
    x["targets"][:, 3] = 0  # a class absent from the batch
    ref, ref_grads = run(loop_reference, x, **kw)
    out, grads = run(kmcl_loss, x, impl=impl, **kw)
    assert float(ref["kmcl"].detach()) != 0.0 or kw.get("loss_opt") == "asl_only"
    assert_close_outputs(out, ref)
    assert_close_grads(grads, ref_grads)


@pytest.mark.parametrize("case", ["anisotropic", "isotropic"])
def test_unknown_ignore_matches_loop_reference(case):
    x = make_inputs(6, 5, 3, case=case, seed=2, p_pos=0.35)
    g = torch.Generator().manual_seed(3)
    unk = torch.rand(6, 5, generator=g) < 0.3
    x["targets"] = torch.where(unk & (x["targets"] == 0), -1, x["targets"])
    x["targets"][2] = -1  # a row with only unknowns
    x["targets"][3, :2] = torch.tensor([1, -1])
    assert (x["targets"] == -1).any()
    for unknown in ("ignore", "negative"):
        ref, ref_grads = run(loop_reference, x, loss_case=case, unknown=unknown)
        out, grads = run(kmcl_loss, x, loss_case=case, unknown=unknown)
        assert_close_outputs(out, ref)
        assert_close_grads(grads, ref_grads)
    # ignore differs from negative in ASL and rec, not in kmcl (positives only)
    neg = kmcl_loss(*leaves(x), x["targets"], loss_case=case)
    ign = kmcl_loss(*leaves(x), x["targets"], loss_case=case, unknown="ignore")
    assert float(neg["asl"]) > float(ign["asl"])
    assert float(neg["kmcl"]) == pytest.approx(float(ign["kmcl"]), rel=1e-14)


def test_larger_batch_with_shared_structure_matches_loop_reference():
    # moderate kernels, so that BC = exp(-BD) is neither 0 nor 1 and every code path matters
    x = make_inputs(9, 5, 4, seed=4, p_pos=0.5, mu_scale=0.03)
    with torch.no_grad():
        x["mu"][3] = x["mu"][2]  # duplicate kernels
        x["var"][3] = x["var"][2]
    kw = dict(aniso_dim_scale=False, temperature=0.3)
    ref, ref_grads = run(loop_reference, x, **kw)
    out, grads = run(kmcl_loss, x, **kw)
    assert_close_outputs(out, ref)
    assert_close_grads(grads, ref_grads)


# ------------------------------------------------------------------------------------------------
# fast path == readable dense path (float64, 1e-10)


@pytest.mark.parametrize("case", ["anisotropic", "isotropic"])
@pytest.mark.parametrize("chunk_size, keep", [(None, True), (None, False), (1, True), (4, False)])
def test_fast_equals_dense(case, chunk_size, keep, monkeypatch):
    if not keep:
        monkeypatch.setattr(kmcl_module, "_KEEP_ELEMENTS", 0)
    x = make_inputs(14, 7, 6, case=case, seed=5, p_pos=0.3, mu_scale=0.2)
    x["targets"][4] = 1
    x["targets"][5] = -1
    for kw in (dict(), dict(aniso_dim_scale=False, unknown="ignore", temperature=0.05)):
        dense, dense_grads = run(kmcl_loss, x, loss_case=case, impl="dense", **kw)
        fast, fast_grads = run(kmcl_loss, x, loss_case=case, impl="fast", chunk_size=chunk_size, **kw)
        assert_close_outputs(fast, dense)
        assert_close_grads(fast_grads, dense_grads)


def test_fast_equals_dense_all_positive_and_many_chunks(monkeypatch):
    monkeypatch.setattr(kmcl_module, "_CHUNK_ELEMENTS", 50)  # forces chunks of one anchor
    x = make_inputs(5, 4, 8, seed=6, mu_scale=0.02)
    x["targets"] = torch.ones(5, 4, dtype=torch.long)
    kw = dict(aniso_dim_scale=False)
    dense, dense_grads = run(kmcl_loss, x, impl="dense", **kw)
    fast, fast_grads = run(kmcl_loss, x, **kw)
    assert_close_outputs(fast, dense)
    assert_close_grads(fast_grads, dense_grads)
    assert float(fast["rec"]) == 0.0


def test_fast_backward_twice_with_retain_graph():
    x = make_inputs(6, 4, 3, seed=23, p_pos=0.5)
    out = kmcl_loss(*leaves(x), x["targets"])
    out["kmcl"].backward(retain_graph=True)
    first = x["mu"].grad.clone(), x["var"].grad.clone()
    out["kmcl"].backward()
    assert torch.allclose(x["mu"].grad, 2 * first[0], rtol=1e-12, atol=0)
    assert torch.allclose(x["var"].grad, 2 * first[1], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------
# finite differences


@pytest.mark.parametrize("case", ["anisotropic", "isotropic"])
@pytest.mark.parametrize("impl", ["fast", "dense"])
def test_gradcheck(case, impl):
    x = make_inputs(4, 3, 2, case=case, seed=7, p_pos=0.6, mu_scale=0.3)
    x["targets"][0] = torch.tensor([1, 1, 0])
    x["targets"][1] = torch.tensor([1, 0, 1])

    def fn(features, logits, mu, var):
        return kmcl_loss(
            features,
            logits,
            mu,
            var,
            x["targets"],
            loss_case=case,
            impl=impl,
            detach_focal_weight=False,
            aniso_dim_scale=False,
            temperature=0.4,
        )["loss"]

    assert torch.autograd.gradcheck(fn, tuple(leaves(x)), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_anchor_function():
    g = torch.Generator().manual_seed(8)
    mu = torch.randn(4, 3, 2, generator=g, dtype=torch.float64).requires_grad_()
    s = (0.5 + torch.rand(4, 3, 2, generator=g, dtype=torch.float64)).requires_grad_()
    b, c = torch.tensor([0, 0, 2, 3, 1]), torch.tensor([0, 2, 2, 1, 1])
    for chunk, keep in ((1, 0), (2, 1 << 20), (8, 0)):

        def fn(m, v, chunk=chunk, keep=keep):
            return kmcl_module._AnchorBhattacharyya.apply(m, v, b, c, chunk, keep)

        assert torch.autograd.gradcheck(fn, (mu, s), eps=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# edge cases (spec §9.2)


def test_row_without_positive_and_all_positive_rows():
    x = make_inputs(5, 4, 3, seed=9)
    x["targets"][0] = 0
    x["targets"][1] = 1
    out, grads = run(kmcl_loss, x)
    # per-row rec contributions: the no-positive row adds -log(eps)/B, the all-positive row adds 0
    rec_rows = []
    for b in range(5):
        sub = {k: v[b : b + 1].detach() for k, v in x.items()}
        rec_rows.append(float(kmcl_loss(*leaves(sub), sub["targets"])["rec"]))
    assert rec_rows[0] == pytest.approx(-math.log(1e-7), rel=1e-15)
    assert rec_rows[0] == pytest.approx(16.118095650958320, rel=1e-15)
    assert rec_rows[1] == 0.0
    assert float(out["rec"]) == pytest.approx(sum(rec_rows) / 5, rel=1e-13)
    # features reach the loss through rec only: both rows get exactly zero gradient
    g_feat = grads[0]
    assert torch.all(g_feat[0] == 0) and torch.all(g_feat[1] == 0)
    assert g_feat[2:].abs().sum() > 0


def test_no_positive_anywhere_batch_of_one_and_no_shared_label():
    for targets in (torch.zeros(4, 3, dtype=torch.long), torch.eye(4, 3, dtype=torch.long)):
        x = make_inputs(4, 3, 2, seed=10)
        x["targets"] = targets
        out, grads = run(kmcl_loss, x)
        assert float(out["kmcl"]) == 0.0 and out["kmcl"].ndim == 0
        assert torch.isfinite(out["loss"])
        assert grads[1].abs().sum() > 0 and all(torch.isfinite(g).all() for g in grads if g is not None)
    assert float(kmcl_loss(*leaves(x), torch.zeros(4, 3))["rec"]) == pytest.approx(-math.log(1e-7), rel=1e-15)
    for case in ("anisotropic", "isotropic"):
        x = make_inputs(1, 3, 2, case=case, seed=11)
        x["targets"][:] = 1
        ref, _ = run(loop_reference, x, loss_case=case)
        out, grads = run(kmcl_loss, x, loss_case=case)
        assert float(out["kmcl"]) == 0.0
        assert_close_outputs(out, ref)
        assert grads[1].abs().sum() > 0 and all(torch.isfinite(g).all() for g in grads if g is not None)


def test_small_and_zero_variance():
    x = make_inputs(5, 3, 2, seed=12, p_pos=0.6)
    with torch.no_grad():
        x["var"][:2] = 1e-10
    ref, ref_grads = run(loop_reference, x)
    out, grads = run(kmcl_loss, x)
    assert_close_outputs(out, ref)
    assert_close_grads(grads, ref_grads)
    for dtype in (torch.float64, torch.float32):
        y = make_inputs(5, 3, 2, seed=12, p_pos=0.6, dtype=dtype)
        with torch.no_grad():
            y["var"][:2] = 0.0
        for impl in ("fast", "dense"):
            out, grads = run(kmcl_loss, y, impl=impl)
            assert all(torch.isfinite(out[k]) for k in KEYS)
            assert all(torch.isfinite(g).all() for g in grads)


def test_kernel_underflow_and_float32_saturation():
    # every kernel of row 0 is floored: r = sum(y p) / sum(p), independent of the kernels
    x = make_inputs(4, 3, 2, seed=13)
    x["targets"][0] = torch.tensor([1, 0, 1])
    with torch.no_grad():
        x["features"][0] = 100.0
    ref, ref_grads = run(loop_reference, x)
    out, grads = run(kmcl_loss, x)
    assert_close_outputs(out, ref)
    assert_close_grads(grads, ref_grads)
    assert torch.all(grads[0][0] == 0)
    p0 = torch.sigmoid(x["logits"][0].detach())
    row0 = -torch.log((p0[0] + p0[2]) / p0.sum())
    single = {k: v[:1].detach() for k, v in x.items()}
    assert float(kmcl_loss(*leaves(single), single["targets"])["rec"]) == pytest.approx(
        float(row0), rel=1e-12
    )
    # float32: raw sums would give 0/0 here (spec Q3) and exp(BC/T) overflows at T = 0.005 (Q4)
    y = make_inputs(4, 3, 2, seed=13, dtype=torch.float32)
    y["targets"][:, 0] = 1
    with torch.no_grad():
        y["features"][0] = 100.0
        y["logits"][0] = -30.0
    out, grads = run(kmcl_loss, y, temperature=0.005, aniso_dim_scale=False)
    assert all(torch.isfinite(out[k]) for k in KEYS)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case", ["anisotropic", "isotropic"])
def test_float32_agrees_with_float64(case):
    x64 = make_inputs(16, 10, 8, case=case, seed=14, p_pos=0.3, mu_scale=0.02)
    x32 = {k: (v.detach().float().requires_grad_() if v.is_floating_point() else v) for k, v in x64.items()}
    for kw in (dict(), dict(aniso_dim_scale=False)):
        ref, ref_grads = run(kmcl_loss, x64, loss_case=case, **kw)
        out, grads = run(kmcl_loss, x32, loss_case=case, **kw)
        for k in KEYS:
            assert float(out[k]) == pytest.approx(float(ref[k]), rel=1e-5, abs=1e-6), k
        for g, r in zip(grads, ref_grads):
            assert float((g.double() - r).abs().max()) <= 1e-3 * float(r.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["anisotropic", "isotropic"])
def test_half_precision_inputs_upcast(dtype, case):
    x = make_inputs(8, 6, 16, case=case, seed=15, p_pos=0.4)
    xh = {k: (v.detach().to(dtype).requires_grad_() if v.is_floating_point() else v) for k, v in x.items()}
    out, grads = run(kmcl_loss, xh, loss_case=case)
    for k in KEYS:
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k])
    for g in grads:
        assert g.dtype == dtype and torch.isfinite(g.float()).all()
    # half inputs are evaluated exactly like their float32 up-cast
    x32 = {k: (v.detach().float() if v.is_floating_point() else v) for k, v in xh.items()}
    ref = kmcl_loss(*leaves(x32), x32["targets"], loss_case=case)
    for k in KEYS:
        assert float(out[k]) == pytest.approx(float(ref[k]), rel=1e-6)


def test_finite_under_bf16_autocast():
    from mlcl.models.heads.kernel import KernelHead

    torch.manual_seed(16)
    head = KernelHead(32, 6, 16)
    x = torch.randn(8, 32)
    targets = (torch.rand(8, 6) < 0.4).long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = head(x)
        out = kmcl_loss(outputs["features"], outputs["logits"], outputs["mu"], outputs["var"], targets)
    assert all(torch.isfinite(out[k]) for k in KEYS)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


# ------------------------------------------------------------------------------------------------
# properties (spec §12.3)


@pytest.mark.parametrize("case", ["anisotropic", "isotropic"])
def test_batch_and_class_permutation_invariance(case):
    x = make_inputs(7, 5, 3, case=case, seed=17, p_pos=0.4, mu_scale=0.1)
    x["targets"][0, 0] = -1
    kw = dict(loss_case=case, unknown="ignore", aniso_dim_scale=False)
    base, base_grads = run(kmcl_loss, x, **kw)
    perm_b = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    perm_c = torch.tensor([2, 4, 0, 3, 1])
    xb = {
        k: v.detach()[perm_b].requires_grad_() if v.is_floating_point() else v[perm_b] for k, v in x.items()
    }
    out, grads = run(kmcl_loss, xb, **kw)
    assert_close_outputs(out, base, rtol=1e-12)
    for g, r in zip(grads, base_grads):
        assert torch.allclose(g, r[perm_b], rtol=1e-10, atol=1e-14)
    xc = {k: v.detach() for k, v in x.items()}
    xc["logits"] = xc["logits"][:, perm_c]
    xc["mu"] = xc["mu"][:, perm_c]
    xc["var"] = xc["var"][:, perm_c]
    xc["targets"] = xc["targets"][:, perm_c]
    for k in NAMES:
        xc[k].requires_grad_()
    out, grads = run(kmcl_loss, xc, **kw)
    assert_close_outputs(out, base, rtol=1e-12)
    assert torch.allclose(grads[0], base_grads[0], rtol=1e-10, atol=1e-14)
    for g, r in zip(grads[1:], base_grads[1:]):
        assert torch.allclose(g, r[:, perm_c], rtol=1e-10, atol=1e-14)


def test_ignore_equals_negative_without_unknowns_and_target_dtypes():
    x = make_inputs(6, 4, 3, seed=18)
    neg = kmcl_loss(*leaves(x), x["targets"])
    ign = kmcl_loss(*leaves(x), x["targets"], unknown="ignore")
    for k in KEYS:
        assert float(neg[k]) == float(ign[k])
    for t in (x["targets"].bool(), x["targets"].float(), x["targets"].int()):
        other = kmcl_loss(*leaves(x), t)
        for k in KEYS:
            assert float(other[k]) == pytest.approx(float(neg[k]), rel=1e-14)


def test_asl_only():
    x = make_inputs(6, 4, 3, seed=19)
    full = kmcl_loss(*leaves(x), x["targets"])
    only = kmcl_loss(None, x["logits"], None, None, x["targets"], loss_opt="asl_only")
    assert float(only["rec"]) == 0.0 and float(only["kmcl"]) == 0.0
    assert float(only["loss"]) == float(only["asl"]) == pytest.approx(float(full["asl"]), rel=1e-14)
    try:
        from mlcl.losses.classification import asymmetric_loss
    except ImportError:
        asymmetric_loss = None
    if callable(asymmetric_loss):
        ref = asymmetric_loss(
            x["logits"], x["targets"], gamma_pos=0, gamma_neg=4, clip=0.05, eps=1e-7, reduction="sum"
        )["loss"]
        assert float(only["asl"]) == pytest.approx(float(ref), rel=1e-12)


def test_pure_and_validates_arguments():
    x = make_inputs(5, 4, 3, seed=20)
    before = {k: v.detach().clone() for k, v in x.items()}
    kmcl_loss(*leaves(x), x["targets"])
    kmcl_loss(*leaves(x), x["targets"], impl="dense")
    for k, v in x.items():
        assert torch.equal(v.detach(), before[k])
    with pytest.raises(ValueError, match="loss_case"):
        kmcl_loss(*leaves(x), x["targets"], loss_case="isotropic")
    with pytest.raises(ValueError):
        kmcl_loss(*leaves(x), x["targets"], unknown="positive")
    with pytest.raises(ValueError):
        kmcl_loss(*leaves(x), x["targets"], loss_opt="kmcl_only")
    with pytest.raises(ValueError):
        kmcl_loss(None, x["logits"], None, None, x["targets"])
    with pytest.raises(ValueError):
        kmcl_loss(x["features"], x["logits"], x["mu"], x["var"][..., :2], x["targets"])


# ------------------------------------------------------------------------------------------------
# plugin


def test_plugin_registered_and_matches_function():
    from mlcl.models.heads.kernel import KernelHead

    assert LOSSES["kmcl"] is KMCL and KMCL.head == "kernel"
    plugin = KMCL(num_classes=5, feature_dim=16, head_kwargs=None)
    assert plugin.head_kwargs == {"embed_dim": 128, "loss_case": "anisotropic", "var_mode": "per_class"}
    head = KMCL.build_head(24, 5, {"var_mode": "shared_dim"})
    assert isinstance(head, KernelHead) and head.out_features == 128 and head.var_mode == "shared_dim"
    merged = KMCL(num_classes=5, feature_dim=16, head_kwargs={"embed_dim": 16}).head_kwargs
    assert merged == {"embed_dim": 16, "loss_case": "anisotropic", "var_mode": "per_class"}
    head_kwargs = {**plugin.head_kwargs, "embed_dim": 16}
    plugin = KMCL(num_classes=5, feature_dim=16, head_kwargs=head_kwargs, temperature=0.3, rec_weight=2.0)
    torch.manual_seed(21)
    head = KernelHead(24, 5, **head_kwargs)
    outputs = head(torch.randn(6, 24))
    targets = (torch.rand(6, 5) < 0.5).long()
    got = plugin(outputs, targets, LossContext(indices=torch.arange(6)))
    want = kmcl_loss(
        outputs["features"],
        outputs["logits"],
        outputs["mu"],
        outputs["var"],
        targets,
        temperature=0.3,
        rec_weight=2.0,
    )
    assert set(got) == set(KEYS)
    for k in KEYS:
        assert got[k].ndim == 0 and float(got[k]) == float(want[k])
    got["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_plugin_isotropic_and_loss_case_mismatch():
    from mlcl.models.heads.kernel import KernelHead

    hk = {"embed_dim": None, "loss_case": "isotropic", "var_mode": "shared_scalar"}
    plugin = KMCL(num_classes=4, feature_dim=12, head_kwargs=hk, loss_case="isotropic")
    head = KernelHead(12, 4, **hk)
    out = plugin(head(torch.randn(5, 12)), torch.ones(5, 4), LossContext(indices=torch.arange(5)))
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match=r"loss\.loss_case.*loss\.head_kwargs\.loss_case"):
        KMCL(num_classes=4, feature_dim=12, head_kwargs=hk)
    with pytest.raises(ValueError, match=r"loss\.head_kwargs\.loss_case"):
        KMCL(num_classes=4, feature_dim=12, head_kwargs={"embed_dim": 8}, loss_case="isotropic")


def test_plugin_gather(monkeypatch):
    from mlcl import distributed

    calls = []

    def fake_gather(t):  # two "ranks" holding the same rows
        calls.append(t.shape)
        return torch.cat([t, t])

    monkeypatch.setattr(distributed, "all_gather_cat", fake_gather)
    x = make_inputs(4, 3, 2, seed=22)
    outputs = {k: x[k] for k in NAMES}
    plugin = KMCL(num_classes=3, feature_dim=2, gather=True)
    got = plugin(outputs, x["targets"], LossContext(indices=torch.arange(4)))
    assert len(calls) == 5
    doubled = {k: torch.cat([v, v]) for k, v in x.items()}
    want = kmcl_loss(*leaves(doubled), doubled["targets"])
    for k in KEYS:
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-14)
    only = KMCL(num_classes=3, feature_dim=2, gather=True, loss_opt="asl_only")
    got = only({"logits": x["logits"], "features": None}, x["targets"], LossContext(indices=torch.arange(4)))
    assert float(got["kmcl"]) == 0.0


def test_yaml_config_lists_every_hyperparameter():
    omegaconf = pytest.importorskip("omegaconf")
    hydra_utils = pytest.importorskip("hydra.utils")
    path = Path(__file__).resolve().parents[2] / "src" / "mlcl" / "conf" / "loss" / "kmcl.yaml"
    cfg = omegaconf.OmegaConf.load(path)
    defaults = KMCL.hyperparam_defaults()
    assert set(cfg.keys()) - {"_target_"} == set(defaults) | {"gather", "head_kwargs"}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "_target_")):
            assert "#" in line, f"uncommented key: {line}"
    for name, default in defaults.items():
        assert cfg[name] == default, name
    assert cfg.gather is False
    plugin = hydra_utils.instantiate(cfg, num_classes=80, feature_dim=128, num_samples=0)
    assert isinstance(plugin, KMCL)
    assert plugin.head_kwargs["loss_case"] == "anisotropic" and plugin.head_kwargs["embed_dim"] == 128
    cfg.loss_case = "isotropic"
    plugin = hydra_utils.instantiate(cfg, num_classes=80, feature_dim=128, num_samples=0)
    assert plugin.head_kwargs["loss_case"] == "isotropic"
