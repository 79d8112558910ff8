"""Tests of mlcl.losses.classification against independent float64 loop implementations written
from baselines.md §2 (one scalar autograd graph per entry, so gradients are checked too)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mlcl.losses import classification as cl
from mlcl.losses.base import LOSSES, LossContext, LossPlugin, get_loss_class

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
ROOT = Path(__file__).resolve().parents[2]
B, C = 5, 6


# ------------------------------------------------------------------------------------ inputs
def make_logits(seed: int, b: int = B, c: int = C, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, generator=g, dtype=torch.float64)).requires_grad_()


def make_targets(kind: str, seed: int, b: int = B, c: int = C) -> torch.Tensor:
    """``full`` {0,1}, ``single`` (one 1 per row, rest -1) or ``mixed`` (all three values)."""
    g = torch.Generator().manual_seed(1000 + seed)
    full = (torch.rand(b, c, generator=g) < 0.35).long()
    full[torch.arange(b), torch.randint(c, (b,), generator=g)] = 1
    if kind == "full":
        return full
    if kind == "single":
        y = torch.full((b, c), -1, dtype=torch.long)
        for i in range(b):
            ones = [j for j in range(c) if full[i, j] == 1]
            y[i, ones[int(torch.randint(len(ones), (1,), generator=g))]] = 1
        return y
    hide = torch.rand(b, c, generator=g) < 0.5
    y = torch.where(hide, torch.full_like(full, -1), full)
    y[0, :3] = torch.tensor([1, 0, -1])
    return y


def softplus(t):
    return torch.where(
        t > 0, t + torch.log1p(torch.exp(-torch.abs(t))), torch.log1p(torch.exp(-torch.abs(t)))
    )


def sig(t):
    return 1.0 / (1.0 + torch.exp(-t))


def grad_of(loss, *inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def assert_close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), rtol=rtol, atol=atol
    )


def check_against(out: dict, ref: dict, inputs: tuple, keys: tuple[str, ...]):
    """All keys equal the reference, the parts sum to ``loss``, gradients of ``loss`` agree."""
    assert set(out) == set(keys)
    for k in keys:
        assert out[k].dim() == 0
        assert out[k].dtype == torch.float64
        assert_close(out[k].detach(), ref[k].detach() if torch.is_tensor(ref[k]) else ref[k])
    parts = [k for k in keys if k.startswith("loss_")]
    if parts:
        assert_close(sum(out[k] for k in parts).detach(), out["loss"].detach())
    for k in keys:
        if k.startswith("num_"):
            assert not out[k].requires_grad
    got = grad_of(out["loss"], *inputs)
    want = grad_of(ref["loss"], *inputs)
    for g_got, g_want in zip(got, want):
        assert_close(g_got, g_want)


# ---------------------------------------------------------------------------- loop references
def ref_asl(x, y, *, gamma_pos, gamma_neg, clip, eps, reduction, unknown, detach=True, bce=False):
    """§2.1 per entry: -t w+ log(max(p,eps)) - (1-t) w- log(max(q,eps)), q = min(1-p+m, 1)."""
    pos_sum = x.new_zeros(())
    neg_sum = x.new_zeros(())
    n = 0
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            t = int(y[i, j])
            if t == -1 and unknown == "ignore":
                continue
            n += 1
            p = sig(x[i, j])
            if t == 1:
                if bce:
                    pos_sum = pos_sum - torch.log(p)
                    continue
                w = (1 - p) ** gamma_pos
                w = w.detach() if detach else w
                pos_sum = pos_sum - w * torch.log(torch.clamp(p, min=eps))
            else:
                if bce:
                    neg_sum = neg_sum - torch.log(1 - p)
                    continue
                q = 1 - p
                if clip:
                    q = torch.clamp(q + clip, max=1.0)
                w = (1 - q) ** gamma_neg
                w = w.detach() if detach else w
                neg_sum = neg_sum - w * torch.log(torch.clamp(q, min=eps))
    div = 1.0 if reduction == "sum" else max(n, 1)
    return {"loss": (pos_sum + neg_sum) / div, "loss_pos": pos_sum / div, "loss_neg": neg_sum / div}


def ref_hill(x, y, *, lamb, margin, gamma, reduction, unknown):
    pos_sum = x.new_zeros(())
    neg_sum = x.new_zeros(())
    n = 0
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            t = int(y[i, j])
            if t == -1 and unknown == "ignore":
                continue
            n += 1
            if t == 1:
                pm = sig(x[i, j] - margin)
                pos_sum = pos_sum - (1 - pm) ** gamma * torch.log(pm)
            else:
                p = sig(x[i, j])
                neg_sum = neg_sum + (lamb - p) * p * p
    div = 1.0 if reduction == "sum" else max(n, 1)
    return {"loss": (pos_sum + neg_sum) / div, "loss_pos": pos_sum / div, "loss_neg": neg_sum / div}


def ref_splc(x, y, *, epoch, tau, change_epoch, margin, gamma, reduction):
    pos_sum = x.new_zeros(())
    neg_sum = x.new_zeros(())
    corrected = 0
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            labelled = int(y[i, j]) == 1
            xp = x[i, j] - margin if labelled else x[i, j]
            p = sig(xp)
            use_pos = labelled
            if epoch >= change_epoch and not labelled and float(p) > tau:
                use_pos = True
                corrected += 1
            if use_pos:
                pos_sum = pos_sum - (1 - p) ** gamma * torch.log(p)
            else:
                neg_sum = neg_sum - p**gamma * torch.log(1 - p)
    div = 1.0 if reduction == "sum" else x.numel()
    return {
        "loss": (pos_sum + neg_sum) / div,
        "loss_pos": pos_sum / div,
        "loss_neg": neg_sum / div,
        "num_corrected": torch.tensor(float(corrected), dtype=torch.float64),
    }


def ref_large_loss(x, y, *, rejection_rate, mode):
    """§2.4 contract: R = {y = -1 and u >= theta}, theta = k-th largest u, k = ceil(B C r)."""
    n = x.numel()
    ell, ell_c, u = {}, {}, []
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            positive = int(y[i, j]) == 1
            # -log p = softplus(-x), -log(1-p) = softplus(x): finite for the saturated theta=0 case
            ell[i, j] = softplus(-x[i, j]) if positive else softplus(x[i, j])
            ell_c[i, j] = softplus(x[i, j]) if positive else softplus(-x[i, j])
            u.append(float(ell[i, j]) if int(y[i, j]) == -1 else 0.0)
    total = x.new_zeros(())
    rejected = 0
    if rejection_rate == 0:
        for v in ell.values():
            total = total + v
        return {"loss": total / n, "num_rejected": torch.tensor(0.0, dtype=torch.float64)}
    k = math.ceil(n * rejection_rate)
    theta = sorted(u, reverse=True)[k - 1]
    for (i, j), v in ell.items():
        in_r = int(y[i, j]) == -1 and float(v) >= theta
        if in_r:
            rejected += 1
            if mode == "correct":
                total = total + ell_c[i, j]
        else:
            total = total + v
    return {"loss": total / n, "num_rejected": torch.tensor(float(rejected), dtype=torch.float64)}


def nl(z, eps):
    return -torch.log(z + eps)


def ref_spml(x, y, *, kind, eps=1e-5, neg_weight=None, expected_num_pos=None):
    """AN / WAN / EPR (§2.5-2.6) as loops over entries, everything divided by B*C."""
    b, c = x.shape
    gamma = 1.0 / (c - 1) if neg_weight is None else neg_weight
    pos_sum = x.new_zeros(())
    neg_sum = x.new_zeros(())
    psum = x.new_zeros(())
    for i in range(b):
        for j in range(c):
            p = sig(x[i, j])
            psum = psum + p
            t = int(y[i, j])
            if t == 1:
                pos_sum = pos_sum + nl(p, eps)
            elif t == 0:
                neg_sum = neg_sum + nl(1 - p, eps)
            elif kind == "an":
                neg_sum = neg_sum + nl(1 - p, eps)
            elif kind == "wan":
                neg_sum = neg_sum + gamma * nl(1 - p, eps)
    out = {"loss_pos": pos_sum / (b * c), "loss_neg": neg_sum / (b * c)}
    out["loss"] = out["loss_pos"] + out["loss_neg"]
    if kind == "epr":
        out["loss_reg"] = (psum / b - expected_num_pos) ** 2 / c**2
        out["loss"] = out["loss"] + out["loss_reg"]
    return out


def ref_role(x, y, est, *, expected_num_pos, eps=1e-5):
    b, c = x.shape
    lp = x.new_zeros(())
    lc = x.new_zeros(())
    ln = x.new_zeros(())
    psum = x.new_zeros(())
    gsum = x.new_zeros(())
    for i in range(b):
        for j in range(c):
            p = sig(x[i, j])
            g = est[i, j]
            psum = psum + p
            gsum = gsum + g
            t = int(y[i, j])
            if t == 1:
                lp = lp + 0.5 * (nl(p, eps) + nl(g, eps))
            if t == 0:
                ln = ln + 0.5 * (nl(1 - p, eps) + nl(1 - g, eps))
            gs, ps = g.detach(), p.detach()
            lc = lc + 0.5 * (
                gs * nl(p, eps) + (1 - gs) * nl(1 - p, eps) + ps * nl(g, eps) + (1 - ps) * nl(1 - g, eps)
            )
    reg = 0.5 * ((psum / b - expected_num_pos) ** 2 / c**2 + (gsum / b - expected_num_pos) ** 2 / c**2)
    out = {"loss_pos": lp / (b * c), "loss_cross": lc / (b * c), "loss_neg": ln / (b * c), "loss_reg": reg}
    out["loss"] = out["loss_pos"] + out["loss_cross"] + out["loss_neg"] + out["loss_reg"]
    return out


KINDS = ["full", "single", "mixed"]
PAIR_KEYS = ("loss", "loss_pos", "loss_neg")


# ------------------------------------------------------------------------------ ASL family
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("unknown", ["negative", "ignore"])
def test_bce_matches_loop(kind, reduction, unknown):
    x, y = make_logits(1), make_targets(kind, 1)
    out = cl.bce_loss(x, y, reduction=reduction, unknown=unknown)
    ref = ref_asl(
        x, y, gamma_pos=0, gamma_neg=0, clip=0, eps=0, reduction=reduction, unknown=unknown, bce=True
    )
    check_against(out, ref, (x,), PAIR_KEYS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("unknown", ["negative", "ignore"])
@pytest.mark.parametrize("detach", [True, False])
def test_focal_matches_loop(kind, reduction, unknown, detach):
    x, y = make_logits(2), make_targets(kind, 2)
    out = cl.focal_loss(x, y, gamma=2.0, reduction=reduction, unknown=unknown, detach_focal_weight=detach)
    ref = ref_asl(
        x,
        y,
        gamma_pos=2.0,
        gamma_neg=2.0,
        clip=0,
        eps=1e-8,
        reduction=reduction,
        unknown=unknown,
        detach=detach,
    )
    check_against(out, ref, (x,), PAIR_KEYS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("unknown", ["negative", "ignore"])
@pytest.mark.parametrize(
    "params",
    [
        dict(gamma_pos=0.0, gamma_neg=4.0, clip=0.05),
        dict(gamma_pos=1.0, gamma_neg=4.0, clip=0.05),
        dict(gamma_pos=0.0, gamma_neg=0.0, clip=0.0),
        dict(gamma_pos=2.0, gamma_neg=3.0, clip=0.0),
    ],
)
@pytest.mark.parametrize("detach", [True, False])
def test_asl_matches_loop(kind, reduction, unknown, params, detach):
    x, y = make_logits(3), make_targets(kind, 3)
    out = cl.asymmetric_loss(x, y, reduction=reduction, unknown=unknown, detach_focal_weight=detach, **params)
    ref = ref_asl(x, y, eps=1e-8, reduction=reduction, unknown=unknown, detach=detach, **params)
    check_against(out, ref, (x,), PAIR_KEYS)


def test_asl_defaults_are_published_setting():
    x, y = make_logits(4), make_targets("mixed", 4)
    out = cl.asymmetric_loss(x, y)
    ref = ref_asl(
        x, y, gamma_pos=0.0, gamma_neg=4.0, clip=0.05, eps=1e-8, reduction="sum", unknown="negative"
    )
    check_against(out, ref, (x,), PAIR_KEYS)


def test_asl_detached_gradient_hand_formula():
    """Detached weights: d/dx = -(1-p)^g+ (1-p) on positives, w- p (1-p) / q on unclipped negatives."""
    x, y = make_logits(5), make_targets("full", 5)
    gp, gn, m = 1.0, 4.0, 0.05
    (g,) = grad_of(cl.asymmetric_loss(x, y, gamma_pos=gp, gamma_neg=gn, clip=m)["loss"], x)
    for i in range(B):
        for j in range(C):
            p = 1.0 / (1.0 + math.exp(-float(x[i, j].detach())))
            if int(y[i, j]) == 1:
                want = -((1 - p) ** gp) * (1 - p)
            else:
                q = min(1 - p + m, 1.0)
                want = 0.0 if q >= 1.0 else (1 - q) ** gn * p * (1 - p) / q
            assert math.isclose(float(g[i, j]), want, rel_tol=1e-9, abs_tol=1e-14)


@pytest.mark.parametrize(
    "fn,kw",
    [
        (cl.focal_loss, dict(detach_focal_weight=False)),
        (cl.asymmetric_loss, dict(detach_focal_weight=False, clip=0.0, gamma_pos=1.0)),
        (cl.asymmetric_loss, dict(detach_focal_weight=False)),
        (cl.bce_loss, dict(unknown="ignore", reduction="mean")),
        (cl.hill_loss, dict()),
        (cl.hill_loss, dict(unknown="ignore", reduction="mean")),
        (cl.splc_loss, dict(epoch=3)),
        (cl.large_loss, dict(rejection_rate=0.17, mode="reject")),
        (cl.large_loss, dict(rejection_rate=0.17, mode="correct")),
        (cl.an_loss, dict()),
        (cl.wan_loss, dict()),
        (cl.epr_loss, dict(expected_num_pos=1.5)),
    ],
)
def test_gradcheck(fn, kw):
    x = make_logits(6, 3, 4).detach()
    x = (x + 0.37).requires_grad_()  # moves entries off the ASL clip / SPLC thresholds
    y = make_targets("mixed", 6, 3, 4)
    assert torch.autograd.gradcheck(lambda t: fn(t, y, **kw)["loss"], (x,), eps=1e-6, atol=1e-7)


def test_role_gradcheck_both_inputs():
    # stop-gradients make ROLE's gradient differ from the total derivative; check each half's own
    # loss (the part that its input really minimises) with finite differences instead
    x = make_logits(7, 3, 4)
    y = make_targets("mixed", 7, 3, 4)
    est = torch.sigmoid(make_logits(8, 3, 4).detach()).requires_grad_()
    est_fixed, x_fixed = est.detach(), x.detach()

    def classifier_half(t):
        out = cl.role_loss(t, y, est_fixed, expected_num_pos=1.2)
        return out["loss"]

    def estimator_half(e):
        return cl.role_loss(x_fixed, y, e, expected_num_pos=1.2)["loss"]

    # with the other input fixed (no gradient), sg() only matters for the input itself: check
    # autograd against the loop reference, then finite differences of the half that is a real function
    (gx,) = grad_of(classifier_half(x), x)
    (gx_ref,) = grad_of(ref_role(x, y, est_fixed, expected_num_pos=1.2)["loss"], x)
    assert_close(gx, gx_ref)
    (ge,) = grad_of(estimator_half(est), est)
    (ge_ref,) = grad_of(ref_role(x_fixed, y, est, expected_num_pos=1.2)["loss"], est)
    assert_close(ge, ge_ref)


def test_asl_hard_threshold_negatives():
    """Negatives with p <= clip contribute zero loss and zero gradient."""
    p = torch.tensor([[0.01, 0.04, 0.2, 0.6]], dtype=torch.float64)
    x = torch.log(p / (1 - p)).requires_grad_()
    y = torch.zeros(1, 4, dtype=torch.long)
    out = cl.asymmetric_loss(x, y, clip=0.05)
    (g,) = grad_of(out["loss"], x)
    assert g[0, 0] == 0 and g[0, 1] == 0 and g[0, 2] > 0 and g[0, 3] > 0
    want = sum(-((pi - 0.05) ** 4) * math.log(1 - pi + 0.05) for pi in (0.2, 0.6))
    assert math.isclose(float(out["loss"]), want, rel_tol=1e-10)


def test_bce_hand_value():
    x = torch.tensor([[0.0, 2.0], [-1.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([[1, 0], [-1, 1]])
    want_pos = math.log(2) + math.log1p(math.exp(-3.0))
    want_neg = math.log1p(math.exp(2.0)) + math.log1p(math.exp(-1.0))
    out = cl.bce_loss(x, y)
    assert math.isclose(float(out["loss_pos"]), want_pos, rel_tol=1e-12)
    assert math.isclose(float(out["loss_neg"]), want_neg, rel_tol=1e-12)
    out = cl.bce_loss(x, y, unknown="ignore", reduction="mean")
    assert math.isclose(float(out["loss"]), (want_pos + math.log1p(math.exp(2.0))) / 3, rel_tol=1e-12)


@pytest.mark.parametrize("fn", [cl.bce_loss, cl.focal_loss, cl.asymmetric_loss, cl.hill_loss])
def test_unknown_negative_vs_ignore(fn):
    x, y = make_logits(9), make_targets("mixed", 9)
    unk = y == -1
    as_zero = torch.where(unk, torch.zeros_like(y), y)
    # "negative": -1 is exactly 0
    a, b = fn(x, y), fn(x, as_zero)
    for k in PAIR_KEYS:
        assert_close(a[k].detach(), b[k].detach())
    # "ignore": unknown logits do not matter, get no gradient, and leave the mean divisor
    out = fn(x, y, unknown="ignore")
    (g,) = grad_of(out["loss"], x)
    assert torch.all(g[unk] == 0) and (g[~unk] != 0).any()  # ASL's clip zeroes some observed ones
    x2 = torch.where(unk, x.detach() + 5.0, x.detach())
    assert_close(fn(x2, y, unknown="ignore")["loss"], out["loss"].detach())
    mean = fn(x, y, unknown="ignore", reduction="mean")["loss"]
    assert_close(mean * (~unk).sum(), out["loss"].detach())
    mean_neg = fn(x, y, reduction="mean")["loss"]
    assert_close(mean_neg * x.numel(), fn(x, y)["loss"].detach())


@pytest.mark.parametrize("fn", [cl.bce_loss, cl.focal_loss, cl.asymmetric_loss, cl.hill_loss])
def test_ignore_everything_unobserved_is_zero(fn):
    x = make_logits(10)
    y = torch.full((B, C), -1)
    for red in ("sum", "mean"):
        out = fn(x, y, unknown="ignore", reduction=red)
        assert all(float(out[k]) == 0.0 for k in PAIR_KEYS)
        (g,) = grad_of(out["loss"], x)
        assert torch.all(g == 0)


def test_bad_keywords_raise():
    x, y = make_logits(0), make_targets("full", 0)
    with pytest.raises(ValueError):
        cl.bce_loss(x, y, reduction="avg")
    with pytest.raises(ValueError):
        cl.asymmetric_loss(x, y, unknown="skip")
    with pytest.raises(ValueError):
        cl.large_loss(x, y, rejection_rate=1.0)
    with pytest.raises(ValueError):
        cl.large_loss(x, y, rejection_rate=0.1, mode="permanent")


# ----------------------------------------------------------------------------------------- Hill
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("unknown", ["negative", "ignore"])
def test_hill_matches_loop(kind, reduction, unknown):
    x, y = make_logits(11), make_targets(kind, 11)
    out = cl.hill_loss(x, y, reduction=reduction, unknown=unknown)
    ref = ref_hill(x, y, lamb=1.5, margin=1.0, gamma=2.0, reduction=reduction, unknown=unknown)
    check_against(out, ref, (x,), PAIR_KEYS)
    out = cl.hill_loss(x, y, lamb=2.0, margin=0.5, gamma=1.0, reduction=reduction, unknown=unknown)
    ref = ref_hill(x, y, lamb=2.0, margin=0.5, gamma=1.0, reduction=reduction, unknown=unknown)
    check_against(out, ref, (x,), PAIR_KEYS)


def test_hill_negative_gradient_shape():
    """d/dp (lamb - p) p^2 = 2 lamb p - 3 p^2: with respect to x multiply by p(1-p)."""
    x = torch.linspace(-4, 4, 9, dtype=torch.float64).reshape(1, 9).requires_grad_()
    (g,) = grad_of(cl.hill_loss(x, torch.zeros(1, 9, dtype=torch.long))["loss"], x)
    p = torch.sigmoid(x.detach())
    assert_close(g, (3.0 * p - 3.0 * p**2) * p * (1 - p))


# ----------------------------------------------------------------------------------------- SPLC
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("epoch", [0, 1, 4])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_splc_matches_loop(kind, epoch, reduction):
    x, y = make_logits(12), make_targets(kind, 12)
    out = cl.splc_loss(x, y, epoch=epoch, reduction=reduction)
    ref = ref_splc(x, y, epoch=epoch, tau=0.6, change_epoch=1, margin=1.0, gamma=2.0, reduction=reduction)
    check_against(out, ref, (x,), PAIR_KEYS + ("num_corrected",))
    if epoch == 0:
        assert float(out["num_corrected"]) == 0
    out = cl.splc_loss(x, y, epoch=epoch, tau=0.3, change_epoch=2, margin=0.5, gamma=1.0, reduction=reduction)
    ref = ref_splc(x, y, epoch=epoch, tau=0.3, change_epoch=2, margin=0.5, gamma=1.0, reduction=reduction)
    check_against(out, ref, (x,), PAIR_KEYS + ("num_corrected",))


def test_splc_epoch_gating_and_strict_threshold():
    x = torch.tensor([[0.3, 0.0, 2.0, 2.0, 1.5]], dtype=torch.float64)
    y = torch.tensor([[0, -1, -1, 1, 0]])
    tau = float(torch.sigmoid(x[0, 0]))  # entry 0 sits exactly at tau: not corrected (strict >)
    before = cl.splc_loss(x, y, epoch=0, tau=tau)
    after = cl.splc_loss(x, y, epoch=1, tau=tau)
    assert float(before["num_corrected"]) == 0
    # entries 2 and 4 exceed tau; entry 3 is a labelled positive (margin applied, not counted)
    assert float(after["num_corrected"]) == 2
    # corrected entries use the unshifted logit in the positive focal term
    p2, p4 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-1.5))
    pm = 1 / (1 + math.exp(-1.0))
    want_pos = -((1 - p2) ** 2) * math.log(p2) - (1 - p4) ** 2 * math.log(p4) - (1 - pm) ** 2 * math.log(pm)
    assert math.isclose(float(after["loss_pos"]), want_pos, rel_tol=1e-12)
    assert float(cl.splc_loss(x, y, epoch=5, tau=tau, change_epoch=6)["num_corrected"]) == 0


# ------------------------------------------------------------------------------------ Large loss
@pytest.mark.parametrize("kind", ["single", "mixed"])
@pytest.mark.parametrize("rate", [0.0, 0.07, 0.23, 0.41])
@pytest.mark.parametrize("mode", ["reject", "correct"])
def test_large_loss_matches_loop(kind, rate, mode):
    x, y = make_logits(13), make_targets(kind, 13)
    out = cl.large_loss(x, y, rejection_rate=rate, mode=mode)
    ref = ref_large_loss(x, y, rejection_rate=rate, mode=mode)
    check_against(out, ref, (x,), ("loss", "num_rejected"))
    if rate > 0:
        assert float(out["num_rejected"]) == math.ceil(x.numel() * rate)


def test_large_loss_rate_zero_is_an_bce_mean():
    x, y = make_logits(14), make_targets("mixed", 14)
    out = cl.large_loss(x, y, rejection_rate=0.0)
    bce = cl.bce_loss(x, y, reduction="mean")
    assert_close(out["loss"].detach(), bce["loss"].detach())
    assert float(out["num_rejected"]) == 0


def test_large_loss_selects_only_unobserved_with_ties_and_divides_by_all():
    # observed negatives with huge logits have the largest losses but must never be rejected
    x = torch.tensor([[6.0, 3.0, 3.0, 1.0], [7.0, -2.0, 0.5, -1.0]], dtype=torch.float64).requires_grad_()
    y = torch.tensor([[0, -1, -1, -1], [0, -1, -1, 1]])
    # k = ceil(8 * 0.1) = 1 but the two entries with logit 3 tie at theta: both rejected
    out = cl.large_loss(x, y, rejection_rate=0.1)
    assert float(out["num_rejected"]) == 2
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus = BCE of a negative
    want = (sp(6) + sp(1) + sp(7) + sp(-2) + sp(0.5) + sp(1.0)) / 8  # last: positive logit -1
    assert math.isclose(float(out["loss"]), want, rel_tol=1e-12)
    (g,) = grad_of(out["loss"], x)
    assert g[0, 1] == 0 and g[0, 2] == 0 and g[0, 0] != 0
    # LL-Ct treats the two as positives: BCE(x, 1) = softplus(-x)
    out = cl.large_loss(x, y, rejection_rate=0.1, mode="correct")
    assert math.isclose(float(out["loss"]), want + 2 * sp(-3.0) / 8, rel_tol=1e-12)
    (g,) = grad_of(out["loss"], x)
    s3 = 1 / (1 + math.exp(-3.0))
    assert math.isclose(float(g[0, 1]), (s3 - 1) / 8, rel_tol=1e-12)


def test_large_loss_theta_zero_only_unobserved():
    """theta = 0 (k beyond the unobserved entries with positive loss): every -1 entry is in R,
    observed entries never are (contract; the reference would also hit observed ones)."""
    x = torch.tensor(
        [[-800.0, -800.0, 2.0, 3.0], [1.0, -1.0, 0.0, 2.0]], dtype=torch.float64
    ).requires_grad_()
    y = torch.tensor([[-1, -1, 0, 1], [-1, 0, 1, 1]])
    out = cl.large_loss(x, y, rejection_rate=0.6, mode="correct")  # k = 5 > 1 unobserved with u > 0
    assert float(out["num_rejected"]) == 3
    ref = ref_large_loss(x, y, rejection_rate=0.6, mode="correct")
    assert_close(out["loss"].detach(), ref["loss"].detach())
    # fully labelled: nothing can be rejected
    yf = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 1]])
    out = cl.large_loss(x, yf, rejection_rate=0.5)
    assert float(out["num_rejected"]) == 0
    assert_close(out["loss"].detach(), cl.bce_loss(x, yf, reduction="mean")["loss"].detach())


def test_large_loss_correction_mask():
    x, y = make_logits(15), make_targets("single", 15)
    rate = 0.13
    mask = cl.large_loss_correction_mask(x, y, rejection_rate=rate)
    assert mask.dtype == torch.bool and mask.shape == y.shape
    k = math.ceil(x.numel() * rate)
    u = [
        (float(torch.nn.functional.softplus(x[i, j])), (i, j))
        for i in range(B)
        for j in range(C)
        if y[i, j] == -1
    ]
    u.sort(reverse=True)
    want = {ij for _, ij in u[: k - 1]}  # strict: the k-th itself is not switched
    assert {(int(i), int(j)) for i, j in mask.nonzero()} == want
    assert not cl.large_loss_correction_mask(x, y, rejection_rate=0.0).any()


# ------------------------------------------------------------------------ AN / WAN / EPR / ROLE
@pytest.mark.parametrize("kind", ["single", "mixed", "full"])
def test_an_wan_epr_match_loop(kind):
    x, y = make_logits(16), make_targets(kind, 16)
    check_against(cl.an_loss(x, y), ref_spml(x, y, kind="an"), (x,), PAIR_KEYS)
    check_against(cl.wan_loss(x, y), ref_spml(x, y, kind="wan"), (x,), PAIR_KEYS)
    check_against(
        cl.wan_loss(x, y, neg_weight=0.3, eps=1e-3),
        ref_spml(x, y, kind="wan", neg_weight=0.3, eps=1e-3),
        (x,),
        PAIR_KEYS,
    )
    check_against(
        cl.epr_loss(x, y, expected_num_pos=1.5),
        ref_spml(x, y, kind="epr", expected_num_pos=1.5),
        (x,),
        PAIR_KEYS + ("loss_reg",),
    )


def test_an_wan_single_positive_relation():
    """On single-positive data WAN with neg_weight 1 is AN; EPR has no negative term."""
    x, y = make_logits(17), make_targets("single", 17)
    assert_close(cl.wan_loss(x, y, neg_weight=1.0)["loss"].detach(), cl.an_loss(x, y)["loss"].detach())
    assert float(cl.epr_loss(x, y, expected_num_pos=1.0)["loss_neg"]) == 0.0


@pytest.mark.parametrize("kind", ["single", "mixed", "full"])
def test_role_matches_loop(kind):
    x, y = make_logits(18), make_targets(kind, 18)
    est = torch.sigmoid(1.5 * make_logits(19).detach()).requires_grad_()
    out = cl.role_loss(x, y, est, expected_num_pos=2.9)
    ref = ref_role(x, y, est, expected_num_pos=2.9)
    check_against(out, ref, (x, est), ("loss", "loss_pos", "loss_cross", "loss_neg", "loss_reg"))


def test_role_stop_gradients():
    """p's gradient ignores the estimator half of the cross term and vice versa."""
    x, y = make_logits(20), make_targets("single", 20)
    est = torch.sigmoid(make_logits(21).detach()).requires_grad_()
    cross = cl.role_loss(x, y, est, expected_num_pos=2.0)["loss_cross"]
    gx, ge = grad_of(cross, x, est)
    p, g = torch.sigmoid(x.detach()), est.detach()
    eps, n = 1e-5, x.numel()
    # classifier half: 1/2 [g nl(p) + (1-g) nl(1-p)] -> d/dx
    want_x = 0.5 / n * (-g / (p + eps) + (1 - g) / (1 - p + eps)) * p * (1 - p)
    want_e = 0.5 / n * (-p / (g + eps) + (1 - p) / (1 - g + eps))
    assert_close(gx, want_x)
    assert_close(ge, want_e)


# ------------------------------------------------------------------------------------ edge cases
ALL_FNS = [
    ("bce", lambda x, y: cl.bce_loss(x, y)),
    ("bce_ignore_mean", lambda x, y: cl.bce_loss(x, y, unknown="ignore", reduction="mean")),
    ("focal", lambda x, y: cl.focal_loss(x, y)),
    ("asl", lambda x, y: cl.asymmetric_loss(x, y)),
    ("asl_ignore_mean", lambda x, y: cl.asymmetric_loss(x, y, unknown="ignore", reduction="mean")),
    ("hill", lambda x, y: cl.hill_loss(x, y)),
    ("splc", lambda x, y: cl.splc_loss(x, y, epoch=2)),
    ("ll_r", lambda x, y: cl.large_loss(x, y, rejection_rate=0.3)),
    ("ll_ct", lambda x, y: cl.large_loss(x, y, rejection_rate=0.3, mode="correct")),
    ("an", lambda x, y: cl.an_loss(x, y)),
    ("wan", lambda x, y: cl.wan_loss(x, y)),
    ("epr", lambda x, y: cl.epr_loss(x, y, expected_num_pos=2.9)),
    ("role", lambda x, y: cl.role_loss(x, y, torch.full(x.shape, 0.3, dtype=x.dtype), expected_num_pos=2.9)),
]


def _edge_targets():
    no_pos_label = make_targets("mixed", 22).clone()
    no_pos_label[:, 2] = torch.where(no_pos_label[:, 2] == 1, 0, no_pos_label[:, 2])
    no_pos_sample = make_targets("mixed", 23).clone()
    no_pos_sample[1] = torch.tensor([0, -1, 0, -1, -1, 0])
    return {
        "label_without_positive": no_pos_label,
        "sample_without_positive": no_pos_sample,
        "all_unobserved": torch.full((B, C), -1),
        "all_negative": torch.zeros(B, C, dtype=torch.long),
    }


@pytest.mark.parametrize("name,fn", ALL_FNS)
@pytest.mark.parametrize("case", list(_edge_targets()))
def test_edge_cases_finite(name, fn, case):
    y = _edge_targets()[case]
    x = make_logits(24, scale=30.0)  # saturated logits as well
    out = fn(x, y)
    assert all(torch.isfinite(v) for v in out.values())
    (g,) = grad_of(out["loss"], x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name,fn", ALL_FNS)
def test_bf16_and_float32(name, fn):
    y = make_targets("mixed", 25)
    x64 = make_logits(25)
    for dtype in (torch.bfloat16, torch.float32):
        x = x64.detach().to(dtype).requires_grad_()
        out = fn(x, y)
        assert all(v.dtype == dtype and torch.isfinite(v) for v in out.values())
        (g,) = grad_of(out["loss"], x)
        assert g.dtype == dtype and torch.isfinite(g).all()
    x32 = x64.detach().float()
    ref = fn(x64.detach(), y)
    out32 = fn(x32, y)
    for k in ref:
        torch.testing.assert_close(out32[k].double(), ref[k], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name,fn", ALL_FNS)
def test_target_dtypes_and_purity(name, fn):
    x, y = make_logits(26), make_targets("mixed", 26)
    x0, y0 = x.detach().clone(), y.clone()
    ref = fn(x, y)
    for yt in (y.to(torch.int32), y.to(torch.int8), y.double(), y.float()):
        out = fn(x, yt)
        for k in ref:
            assert_close(out[k].detach(), ref[k].detach())
    assert torch.equal(x.detach(), x0) and torch.equal(y, y0)


def test_wan_default_weight_and_single_class():
    x, y = make_logits(27), make_targets("mixed", 27)
    assert_close(
        cl.wan_loss(x, y)["loss"].detach(), cl.wan_loss(x, y, neg_weight=1 / (C - 1))["loss"].detach()
    )
    with pytest.raises(ValueError):
        cl.wan_loss(x[:, :1], y[:, :1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name,fn", ALL_FNS)
def test_cuda_matches_cpu(name, fn):
    x, y = make_logits(28), make_targets("mixed", 28)
    ref = fn(x.detach(), y)
    xc = x.detach().cuda().requires_grad_()
    out = fn(xc, y.cuda())
    for k in ref:
        assert out[k].device.type == "cuda"
        assert_close(out[k].detach().cpu(), ref[k])


# --------------------------------------------------------------------------------------- plugins
PLUGINS = {
    "bce": (cl.BCE, lambda x, y, e: cl.bce_loss(x, y)),
    "focal": (cl.Focal, lambda x, y, e: cl.focal_loss(x, y)),
    "asl": (cl.ASL, lambda x, y, e: cl.asymmetric_loss(x, y)),
    "hill": (cl.Hill, lambda x, y, e: cl.hill_loss(x, y)),
    "splc": (cl.SPLC, lambda x, y, e: cl.splc_loss(x, y, epoch=e)),
    "large_loss": (cl.LargeLoss, lambda x, y, e: cl.large_loss(x, y, rejection_rate=e * 0.2 / 100)),
    "an": (cl.AN, lambda x, y, e: cl.an_loss(x, y)),
    "wan": (cl.WAN, lambda x, y, e: cl.wan_loss(x, y)),
    "epr": (cl.EPR, lambda x, y, e: cl.epr_loss(x, y, expected_num_pos=2.9)),
}
N_SAMPLES = 12


def build(name: str, **kw) -> LossPlugin:
    cls = get_loss_class(name)
    return cls(num_classes=C, feature_dim=8, num_samples=N_SAMPLES, head_kwargs={}, **kw)


@pytest.mark.parametrize("name", list(PLUGINS) + ["role"])
def test_registry_and_protocol(name):
    cls = get_loss_class(name)
    assert LOSSES[name] is cls and cls.name == name
    assert issubclass(cls, LossPlugin) and cls.head == "linear" and not cls.spatial
    assert isinstance(cls.unknown_policy, str) and cls.unknown_policy
    assert cls.__doc__


@pytest.mark.parametrize("name", list(PLUGINS))
@pytest.mark.parametrize("epoch", [0, 7])
@pytest.mark.parametrize("views", [1, 2])
def test_plugins_equal_functions(name, epoch, views):
    plugin = build(name)
    fn = PLUGINS[name][1]
    x = make_logits(30, b=views * B)
    y = make_targets("mixed", 30)
    ctx = LossContext(indices=torch.arange(B).repeat(views), epoch=epoch, num_views=views)
    out = plugin({"logits": x, "features": torch.zeros(views * B, 8)}, y, ctx)
    ref = fn(x, y.repeat(views, 1), epoch)
    assert set(out) == set(ref)
    for k in ref:
        assert_close(out[k].detach(), ref[k].detach())
    # targets already given per row are used as they are
    out_rows = plugin({"logits": x}, y.repeat(views, 1), ctx)
    assert_close(out_rows["loss"].detach(), ref["loss"].detach())


def test_plugin_keywords_reach_functions():
    x, y = make_logits(31), make_targets("mixed", 31)
    ctx = LossContext(indices=torch.arange(B), epoch=3)
    asl = build("asl", reduction="mean", unknown="ignore", gamma_neg=2.0, clip=0.1)
    assert asl.reduction == "mean" and asl.unknown == "ignore"
    want = cl.asymmetric_loss(x, y, reduction="mean", unknown="ignore", gamma_neg=2.0, clip=0.1)
    assert_close(asl({"logits": x}, y, ctx)["loss"].detach(), want["loss"].detach())
    ll = build("large_loss", mode="correct", delta_rel=5.0)
    assert math.isclose(ll.rejection_rate(3), 0.15)
    want = cl.large_loss(x, y, rejection_rate=0.15, mode="correct")
    assert_close(ll({"logits": x}, y, ctx)["loss"].detach(), want["loss"].detach())
    wan = build("wan", neg_weight=0.5)
    assert_close(
        wan({"logits": x}, y, ctx)["loss"].detach(), cl.wan_loss(x, y, neg_weight=0.5)["loss"].detach()
    )
    with pytest.raises(ValueError):
        build("bce", unknown="maybe")


def test_role_plugin_indexing_gradients_state():
    torch.manual_seed(0)
    role = build("role", expected_num_pos=1.7)
    assert role.theta.shape == (N_SAMPLES, C)
    a = math.log(0.6 / 0.4)
    assert role.theta.abs().max() <= a + 1e-6  # usable before init: unknown-entry rule everywhere
    groups = role.param_groups()
    assert len(groups) == 1 and groups[0]["lr_mult"] == 10.0 and groups[0]["params"][0] is role.theta

    targets_all = make_targets("mixed", 32, b=N_SAMPLES)
    role.init_estimates(targets_all)
    th = role.theta.detach()
    assert torch.allclose(th[targets_all == 1], torch.tensor(math.log(0.995 / 0.005)))
    assert torch.allclose(th[targets_all == 0], torch.tensor(math.log(0.005 / 0.995)))
    assert th[targets_all == -1].abs().max() <= a + 1e-6
    assert bool(role.initialised)

    idx = torch.tensor([7, 2, 11, 2, 0])
    x = make_logits(33).float().detach().requires_grad_()
    y = targets_all[idx]
    out = role({"logits": x}, y, LossContext(indices=idx))
    want = cl.role_loss(x, y, torch.sigmoid(role.theta[idx]), expected_num_pos=1.7)
    for k in want:
        assert_close(out[k].detach(), want[k].detach(), rtol=1e-6, atol=1e-7)
    out["loss"].backward()
    gt = role.theta.grad
    used = torch.zeros(N_SAMPLES, dtype=torch.bool)
    used[idx] = True
    assert torch.all(gt[~used] == 0) and torch.all(gt[used].abs().sum(1) > 0)
    assert x.grad is not None and torch.isfinite(x.grad).all()

    # state_dict round-trip restores theta (and the init flag) exactly
    other = build("role", expected_num_pos=1.7)
    other.load_state_dict(role.state_dict())
    assert torch.equal(other.theta, role.theta) and bool(other.initialised)
    out2 = other({"logits": x.detach()}, y, LossContext(indices=idx))
    assert_close(out2["loss"], out["loss"].detach())

    # two views: indices repeated per view, both rows read the same estimates
    x2 = torch.cat([x.detach(), x.detach() + 0.1])
    out_v = role({"logits": x2}, y, LossContext(indices=idx.repeat(2), num_views=2))
    want_v = cl.role_loss(x2, y.repeat(2, 1), torch.sigmoid(role.theta[idx.repeat(2)]), expected_num_pos=1.7)
    assert_close(out_v["loss"].detach(), want_v["loss"].detach(), rtol=1e-6, atol=1e-7)

    with pytest.raises(ValueError):
        cl.ROLE(num_classes=C, feature_dim=8, num_samples=0)


def test_role_optimiser_step_moves_used_rows_only():
    role = build("role")
    role.init_estimates(make_targets("single", 34, b=N_SAMPLES))
    before = role.theta.detach().clone()
    opt = torch.optim.Adam([{"params": g["params"], "lr": 0.01 * g["lr_mult"]} for g in role.param_groups()])
    idx = torch.tensor([1, 4, 5, 9, 3])
    x = make_logits(35).float().detach()
    role({"logits": x}, make_targets("single", 34, b=N_SAMPLES)[idx], LossContext(indices=idx))[
        "loss"
    ].backward()
    opt.step()
    moved = (role.theta.detach() != before).any(1)
    assert moved[idx].all() and moved.sum() == len(idx)


@pytest.mark.parametrize("name", list(PLUGINS) + ["role"])
def test_yaml_instantiates(name):
    from hydra.utils import instantiate

    path = ROOT / "src" / "mlcl" / "conf" / "loss" / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    plugin = instantiate(cfg, num_classes=C, feature_dim=8, num_samples=N_SAMPLES)
    assert type(plugin) is get_loss_class(name)
    # every hyper-parameter in the YAML is a constructor keyword with the same default and a comment
    text = path.read_text().splitlines()
    defaults = type(plugin).hyperparam_defaults()
    for key, value in cfg.items():
        if key == "_target_":
            continue
        assert key in defaults and defaults[key] == value, key
        line = next(ln for ln in text if ln.startswith(f"{key}:"))
        assert "#" in line, key
