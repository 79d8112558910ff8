"""Tests of mlcl.losses.clml against an independent float64 implementation written from clml.md."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mlcl.losses.base import LOSSES, LossContext, LossPlugin
from mlcl.losses.clml import CLML, clml_loss, correct_labels

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- independent reference
def reference_clml(x, z, y, *, epoch, lambda_=1.0, tau=0.75, change_epoch=1, delta=1.0, eig_thd=1e-6):
    """Plain per-label loop of spec §5 in float64: (loss, local, global, d loss / d x)."""
    x = x.detach().to(torch.float64)
    b, d = x.shape
    c_count = y.shape[1]
    pos = [[False] * c_count for _ in range(b)]
    for i in range(b):
        for c in range(c_count):
            promoted = epoch >= change_epoch and 1.0 / (1.0 + math.exp(-float(z[i, c]))) > tau
            pos[i][c] = int(y[i, c]) == 1 or promoted

    def nuclear_and_subgradient(a):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        g = torch.zeros_like(a)
        for k in range(s.numel()):
            if s[k] >= eig_thd:
                g += torch.outer(u[:, k], vh[k])
        return float(s.sum()), g

    local, grad = 0.0, torch.zeros_like(x)
    for c in range(c_count):
        rows = [i for i in range(b) if pos[i][c]]
        if not rows:
            local += delta
            continue
        nuc, g = nuclear_and_subgradient(x[rows])
        if nuc > delta:
            local += nuc
            for j, i in enumerate(rows):
                grad[i] += g[j]
        else:
            local += delta
    glob, g_all = nuclear_and_subgradient(x)
    scale = lambda_ / b
    return scale * (local - glob), scale * local, scale * glob, scale * (grad - g_all)


def random_case(b=12, c=6, d=20, seed=0, unknown=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(b, d, generator=g, dtype=torch.float64) + 0.2)
    y = (torch.rand(b, c, generator=g) < 0.35).long()
    if unknown:
        y[torch.rand(b, c, generator=g) < 0.15] = -1
    z = torch.randn(b, c, generator=g, dtype=torch.float64) * 2.0
    return x, z, y


def run(x, z, y, **kw):
    xr = x.clone().requires_grad_(True)
    out = clml_loss(xr, z, y, **kw)
    (grad,) = torch.autograd.grad(out["loss"], xr)
    return out, grad


def assert_matches_reference(x, z, y, method="reduced", **kw):
    out, grad = run(x, z, y, method=method, **kw)
    loss, local, glob, ref_grad = reference_clml(x, z, y, **kw)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-10, abs=1e-12)
    assert out["local"].item() == pytest.approx(local, rel=1e-10, abs=1e-12)
    assert out["global"].item() == pytest.approx(glob, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    return out, grad


# ---------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("method", ["reduced", "svd"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("epoch", [0, 3])
def test_matches_reference_random(method, seed, epoch):
    x, z, y = random_case(seed=seed)
    assert_matches_reference(x, z, y, method=method, epoch=epoch, lambda_=0.7, tau=0.6, delta=1.5)


@pytest.mark.parametrize("method", ["reduced", "svd"])
def test_more_rows_than_dims(method):
    # B > D: the global matrix and large groups are rank deficient by shape
    x, z, y = random_case(b=16, c=4, d=5, seed=3)
    y[:, 0] = 1
    assert_matches_reference(x, z, y, method=method, epoch=2, delta=0.5)


def test_coco_like_batch_matches_reference():
    x, z, y = random_case(b=40, c=30, d=200, seed=4)
    assert_matches_reference(x, z, y, epoch=1)


def test_worked_example():
    # spec §5.8: local = 12/2, global = 7/2, loss 2.5, gradient [[0, 0], [0, 0.5]]
    x = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    y = torch.tensor([[1, 0, 0], [1, 1, 0]])
    z = torch.zeros(2, 3, dtype=torch.float64)
    for method in ("reduced", "svd"):
        out, grad = run(x, z, y, epoch=0, method=method)
        assert out["local"].item() == pytest.approx(6.0, abs=1e-12)
        assert out["global"].item() == pytest.approx(3.5, abs=1e-12)
        assert out["loss"].item() == pytest.approx(2.5, abs=1e-12)
        torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [0.0, 0.5]], dtype=torch.float64))


def test_output_keys_shapes_dtypes():
    x, z, y = random_case()
    out = clml_loss(x, z, y, epoch=0)
    assert set(out) == {"loss", "local", "global"}
    assert all(v.dim() == 0 and v.dtype == torch.float64 for v in out.values())
    out32 = clml_loss(x.float(), z.float(), y, epoch=0)
    assert all(v.dtype == torch.float32 for v in out32.values())


def test_pure_inputs_untouched():
    x, z, y = random_case()
    x0, z0, y0 = x.clone(), z.clone(), y.clone()
    run(x, z, y, epoch=5)
    assert torch.equal(x, x0) and torch.equal(z, z0) and torch.equal(y, y0)


# ---------------------------------------------------------------------------- rank deficiency
def test_rank_deficient_group_uses_cut_subgradient():
    g = torch.Generator().manual_seed(5)
    a, b2 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    x = torch.stack([a, a, b2, 2.0 * b2, a + b2])
    y = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]])
    z = torch.zeros(5, 2, dtype=torch.float64)
    _, grad = assert_matches_reference(x, z, y, epoch=0)
    # duplicate rows in the same groups get identical subgradients: U_keep has identical rows for them
    torch.testing.assert_close(grad[0], grad[1], rtol=0, atol=1e-12)

    # local term of label 0 alone (rows 0, 1, 2; rank 2 of 3): U_keep V_keepᵀ, built from the Gram
    # eigenvectors of the two distinct directions as an independent check
    xr = x.clone().requires_grad_(True)
    local = clml_loss(xr, z, y, epoch=0)["local"]
    (g_local,) = torch.autograd.grad(local, xr)
    xc = x[:3]
    w, v = torch.linalg.eigh(xc.t() @ xc)  # right singular vectors with s² = w
    keep = w > 1e-8 * w.max()
    vk = v[:, keep]
    uk = xc @ vk / w[keep].sqrt()
    expected = (uk @ vk.t()) / 5.0
    torch.testing.assert_close(g_local[:3], expected, rtol=1e-8, atol=1e-10)

    # naive autograd through svdvals keeps an arbitrary null-space pair and gives another gradient
    xn = x.clone().requires_grad_(True)
    naive = torch.linalg.svdvals(xn[:3]).sum() / 5.0
    (g_naive,) = torch.autograd.grad(naive, xn)
    assert (g_naive[:3] - expected).abs().max() > 1e-3


def test_rank_deficient_batch_global_term():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(3, 8, generator=g, dtype=torch.float64)
    x = torch.cat([base, base, base[:1] * 3.0])  # rank 3 with 7 rows
    y = torch.eye(7, 3, dtype=torch.long)
    y[3:, 0] = 1
    z = torch.zeros(7, 3, dtype=torch.float64)
    for method in ("reduced", "svd"):
        assert_matches_reference(x, z, y, epoch=0, method=method)


def test_fast_path_agrees_with_svd_path():
    cases = [random_case(b=24, c=10, d=64, seed=s) for s in range(3)]
    x, z, y = random_case(b=10, c=3, d=30, seed=9)
    x[1] = x[0]
    x[2] = -0.5 * x[0]
    y[:3, 0] = 1
    cases.append((x, z, y))
    for x, z, y in cases:
        fast, g_fast = run(x, z, y, epoch=1, method="reduced")
        slow, g_slow = run(x, z, y, epoch=1, method="svd")
        for key in ("loss", "local", "global"):
            assert abs(fast[key].item() - slow[key].item()) <= 1e-10
        assert (g_fast - g_slow).abs().max().item() <= 1e-10


# ---------------------------------------------------------------------------- edge cases
def test_single_member_group_gradient_is_unit_vector():
    x = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1, 0], [0, 1], [0, 0]])
    z = torch.zeros(3, 2, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    out = clml_loss(xr, z, y, epoch=0)
    assert out["local"].item() == pytest.approx((5.0 + 5.0) / 3.0, abs=1e-12)
    (g_local,) = torch.autograd.grad(out["local"], xr)
    expected = torch.zeros_like(x)
    expected[0] = x[0] / 5.0 / 3.0
    expected[1] = x[1] / 5.0 / 3.0
    torch.testing.assert_close(g_local, expected, rtol=1e-10, atol=1e-14)


def test_hinge_is_strict_and_tiny_features_give_delta():
    # δ = 2. label 0: one row of norm exactly δ; label 1: norm 3 > δ; label 2: two unit rows, nuclear norm
    # exactly δ; label 3: rows 1-3, nuclear norm 5. Groups at δ contribute δ and no gradient.
    x = torch.zeros(4, 6, dtype=torch.float64)
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = 2.0, 3.0, 1.0, 1.0
    y = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]])
    z = torch.zeros(4, 5, dtype=torch.float64)
    expected = torch.zeros_like(x)
    expected[1, 1], expected[2, 2], expected[3, 3] = 2.0 / 4, 1.0 / 4, 1.0 / 4
    for method in ("reduced", "svd"):
        xr = x.clone().requires_grad_(True)
        out = clml_loss(xr, z, y, epoch=0, delta=2.0, method=method)
        assert out["local"].item() == pytest.approx((2.0 + 3.0 + 2.0 + 5.0 + 2.0) / 4.0, abs=1e-12)
        (g_local,) = torch.autograd.grad(out["local"], xr)
        torch.testing.assert_close(g_local, expected, rtol=0, atol=1e-12)

    # every group below δ: local = C·δ·λ/B exactly, no local gradient
    x, z, y = random_case(b=8, c=5, d=6, seed=7)
    x = x * 1e-3
    xr = x.clone().requires_grad_(True)
    out = clml_loss(xr, z, y, epoch=0, lambda_=2.0)
    assert out["local"].item() == pytest.approx(5 * 1.0 * 2.0 / 8, abs=1e-14)
    (g_local,) = torch.autograd.grad(out["local"], xr)
    assert torch.count_nonzero(g_local) == 0
    assert_matches_reference(x, z, y, epoch=0, lambda_=2.0)


def test_no_positives_rows_and_negative_loss():
    # edge_no_positives: rows without any positive join only the global term; the loss may be < 0
    x, z, y = random_case(b=10, c=4, d=12, seed=8)
    y[5:] = 0
    z = torch.full_like(z, -5.0)
    out, _ = assert_matches_reference(x, z, y, epoch=2)
    y0 = torch.zeros_like(y)
    out0, _ = assert_matches_reference(x, z, y0, epoch=2)
    assert out0["local"].item() == pytest.approx(4 * 1.0 / 10, abs=1e-14)
    assert out0["loss"].item() < 0


def test_minus_one_is_zero():
    x, z, y = random_case(seed=10, unknown=True)
    y0 = torch.where(y == -1, torch.zeros_like(y), y)
    for epoch in (0, 2):
        a, ga = run(x, z, y, epoch=epoch)
        b, gb = run(x, z, y0, epoch=epoch)
        assert a["loss"].item() == b["loss"].item()
        assert torch.equal(ga, gb)


# ---------------------------------------------------------------------------- label correction
def test_correct_labels_rule():
    logits = torch.tensor([[0.0, 1e-9, -3.0, 4.0], [5.0, 0.0, -1.0, 0.3]], dtype=torch.float64)
    targets = torch.tensor([[0, -1, 1, -1], [1, -1, 0, 0]])
    logits0, targets0 = logits.clone(), targets.clone()
    out = correct_labels(logits, targets, tau=0.5)
    # σ(0) = 0.5 exactly is not > 0.5 (strict); positives are never removed; 0 and -1 survive
    assert torch.equal(out, torch.tensor([[0, 1, 1, 1], [1, -1, 0, 1]]))
    assert out.dtype == torch.int64
    assert torch.equal(logits, logits0) and torch.equal(targets, targets0)
    lg = logits.clone().requires_grad_(True)
    assert not correct_labels(lg, targets, tau=0.5).requires_grad


def test_correction_epoch_gate():
    x, z, y = random_case(seed=11)
    z = torch.where(torch.rand(z.shape, generator=torch.Generator().manual_seed(1)) < 0.3, 3.0, -3.0)
    z = z.to(torch.float64)
    corrected = torch.where(torch.sigmoid(z) > 0.75, torch.ones_like(y), y)
    assert not torch.equal(corrected == 1, y == 1)  # the correction changes the groups here
    before, g_before = run(x, z, y, epoch=1, change_epoch=2)
    plain, g_plain = run(x, torch.full_like(z, -30.0), y, epoch=5, change_epoch=2)
    after, g_after = run(x, z, y, epoch=2, change_epoch=2)
    groups, g_groups = run(x, torch.full_like(z, -30.0), corrected, epoch=5, change_epoch=2)
    assert before["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-12)
    torch.testing.assert_close(g_before, g_plain)
    assert after["loss"].item() == pytest.approx(groups["loss"].item(), rel=1e-12)
    torch.testing.assert_close(g_after, g_groups)
    assert abs(after["loss"].item() - before["loss"].item()) > 1e-3


# ---------------------------------------------------------------------------- autograd contract
def test_upstream_gradient_is_used():
    x, z, y = random_case(seed=12)
    _, grad = run(x, z, y, epoch=2)
    xr = x.clone().requires_grad_(True)
    out = clml_loss(xr, z, y, epoch=2)
    (g1000,) = torch.autograd.grad(1000.0 * out["loss"], xr)
    torch.testing.assert_close(g1000, 1000.0 * grad, rtol=1e-12, atol=1e-12)
    # local and global carry their own upstream gradients
    xr = x.clone().requires_grad_(True)
    out = clml_loss(xr, z, y, epoch=2)
    (g_mix,) = torch.autograd.grad(2.0 * out["local"] + 3.0 * out["global"], xr)
    xr = x.clone().requires_grad_(True)
    out = clml_loss(xr, z, y, epoch=2)
    g_l = torch.autograd.grad(out["local"], xr, retain_graph=True)[0]
    g_g = torch.autograd.grad(out["global"], xr)[0]
    torch.testing.assert_close(g_mix, 2.0 * g_l + 3.0 * g_g)
    torch.testing.assert_close(g_l - g_g, grad)


def test_finite_differences_of_smooth_case():
    # away from kinks (all groups above δ, full rank) the subgradient is the true gradient
    x, z, y = random_case(b=6, c=3, d=8, seed=13, unknown=False)
    y[:, 0] = 1
    y[:3, 1] = 1
    y[3:, 2] = 1
    xr = x.clone().requires_grad_(True)
    torch.autograd.gradcheck(
        lambda t: clml_loss(t, z, y, epoch=0, delta=0.1)["loss"], (xr,), eps=1e-6, atol=1e-6
    )


def test_logits_get_no_gradient():
    x, z, y = random_case(seed=14)
    xr = x.clone().requires_grad_(True)
    zr = z.clone().requires_grad_(True)
    out = clml_loss(xr, zr, y, epoch=3)
    gx, gz = torch.autograd.grad(out["loss"], (xr, zr), allow_unused=True)
    assert gz is None or torch.count_nonzero(gz) == 0
    assert gx is not None


# ---------------------------------------------------------------------------- precision
def test_float32_matches_float64_reference_including_rank_deficiency():
    x, z, y = random_case(b=20, c=8, d=300, seed=15)
    x = x * 30.0  # large features: float32 rounding lifts null-space singular values above ε = 1e-6
    x[1] = x[0]
    x[2] = x[0]
    y[:3, 0] = 1
    loss, local, glob, ref_grad = reference_clml(x, z, y, epoch=2)
    out, grad = run(x.float(), z.float(), y, epoch=2)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-4)
    assert out["local"].item() == pytest.approx(local, rel=1e-4)
    assert out["global"].item() == pytest.approx(glob, rel=1e-4)
    assert ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item() < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_finite(dtype):
    x, z, y = random_case(b=16, c=6, d=40, seed=16)
    xr = x.to(dtype).requires_grad_(True)
    out = clml_loss(xr, z.to(dtype), y, epoch=2)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert xr.grad.dtype == dtype and torch.isfinite(xr.grad).all()
    loss, *_ = reference_clml(x.to(dtype), z.to(dtype), y, epoch=2)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-3)


# ---------------------------------------------------------------------------- plugin
class _StubBase(LossPlugin):
    """Sum-reduced BCE that records the targets it was given (stand-in for the real base plugins)."""

    head = "linear"

    def __init__(
        self, *, num_classes, feature_dim, num_samples=0, head_kwargs=None, gather=False, weight=1.0
    ):
        super().__init__(
            num_classes=num_classes, feature_dim=feature_dim, num_samples=num_samples, gather=gather
        )
        self.weight = weight
        self.seen = None

    def forward(self, outputs, targets, ctx):
        self.seen = targets.clone()
        logits = outputs["logits"]
        loss = self.weight * F.binary_cross_entropy_with_logits(
            logits, (targets == 1).to(logits.dtype), reduction="sum"
        )
        return {"loss": loss, "bce": loss.detach()}


class _KernelStub(_StubBase):
    head = "kernel"


@pytest.fixture
def stub_base(monkeypatch):
    monkeypatch.setitem(LOSSES, "_stub_base", _StubBase)
    monkeypatch.setitem(LOSSES, "_kernel_stub", _KernelStub)
    return "_stub_base"


def _plugin_batch(seed=17):
    x, z, y = random_case(b=10, c=5, d=16, seed=seed)
    z = z * 2.0
    return x, z, y


@pytest.mark.parametrize("epoch", [0, 1])
def test_plugin_total_and_terms(stub_base, epoch):
    x, z, y = _plugin_batch()
    plugin = CLML(num_classes=5, feature_dim=16, base_loss=stub_base, base_kwargs={"weight": 0.5}, tau=0.7)
    xr = x.clone().requires_grad_(True)
    zr = z.clone().requires_grad_(True)
    out = plugin({"features": xr, "logits": zr}, y, LossContext(indices=torch.arange(10), epoch=epoch))
    assert {"loss", "base_loss", "base_bce", "clml", "clml_local", "clml_global", "num_corrected"} <= set(out)
    assert all(v.dim() == 0 for v in out.values())
    # the base loss saw the uncorrected targets, -1 included
    assert torch.equal(plugin.base.seen, y)
    base = 0.5 * F.binary_cross_entropy_with_logits(z, (y == 1).to(z.dtype), reduction="sum")
    loss, local, glob, _ = reference_clml(x, z, y, epoch=epoch, tau=0.7)
    assert out["base_loss"].item() == pytest.approx(base.item(), rel=1e-12)
    assert out["clml"].item() == pytest.approx(loss, rel=1e-10)
    assert out["clml_local"].item() == pytest.approx(local, rel=1e-10)
    assert out["clml_global"].item() == pytest.approx(glob, rel=1e-10)
    assert out["loss"].item() == pytest.approx(base.item() + loss, rel=1e-10)
    promoted = sum(
        1
        for i in range(10)
        for c in range(5)
        if int(y[i, c]) != 1 and 1.0 / (1.0 + math.exp(-float(z[i, c]))) > 0.7
    )
    assert promoted > 0
    assert out["num_corrected"].item() == (promoted if epoch >= 1 else 0)
    out["loss"].backward()
    assert xr.grad is not None and zr.grad is not None and torch.isfinite(xr.grad).all()


def test_plugin_gather_and_views(stub_base):
    # outside DDP gathering is the identity; the base plugin inherits the gather flag
    x, z, y = _plugin_batch()
    ctx = LossContext(indices=torch.arange(10), epoch=1)
    plain = CLML(num_classes=5, feature_dim=16, base_loss=stub_base)({"features": x, "logits": z}, y, ctx)
    gathered_plugin = CLML(num_classes=5, feature_dim=16, base_loss=stub_base, gather=True)
    assert gathered_plugin.base.gather
    assert not CLML(num_classes=5, feature_dim=16, base_loss=stub_base, gather=True,
                    base_kwargs={"gather": False}).base.gather  # fmt: skip
    gathered = gathered_plugin({"features": x, "logits": z}, y, ctx)
    for key in plain:
        assert gathered[key].item() == pytest.approx(plain[key].item(), rel=1e-12)
    # two views, targets given once per sample: every row of both views is in the CLML batch
    x2 = torch.cat([x, x.flip(1)])
    z2 = torch.cat([z, z])
    ctx2 = LossContext(indices=torch.arange(10).repeat(2), epoch=1, num_views=2)
    out = CLML(num_classes=5, feature_dim=16, base_loss="_stub_base")(
        {"features": x2, "logits": z2}, torch.cat([y, y]), ctx2
    )
    loss, *_ = reference_clml(x2, z2, torch.cat([y, y]), epoch=1)
    assert out["clml"].item() == pytest.approx(loss, rel=1e-10)
    plugin = CLML(num_classes=5, feature_dim=16, base_loss="_stub_base")
    plugin.base.forward = lambda outputs, targets, ctx: {"loss": outputs["logits"].sum() * 0}
    out_once = plugin({"features": x2, "logits": z2}, y, ctx2)
    assert out_once["clml"].item() == pytest.approx(loss, rel=1e-10)


def test_plugin_rejects_non_linear_base(stub_base):
    with pytest.raises(ValueError, match="linear head"):
        CLML(num_classes=5, feature_dim=16, base_loss="_kernel_stub")


@pytest.mark.parametrize("base_loss", ["bce", "focal", "asl", "hill", "splc"])
def test_plugin_with_registered_base_losses(base_loss):
    from mlcl.losses.base import list_losses

    if base_loss not in list_losses():
        pytest.skip(f"the {base_loss!r} plugin is not available")
    x, z, y = _plugin_batch()
    plugin = CLML(num_classes=5, feature_dim=16, base_loss=base_loss)
    xr = x.clone().requires_grad_(True)
    out = plugin({"features": xr, "logits": z}, y, LossContext(indices=torch.arange(10), epoch=1))
    loss, *_ = reference_clml(x, z, y, epoch=1)
    assert out["clml"].item() == pytest.approx(loss, rel=1e-10)
    assert out["loss"].item() == pytest.approx(out["base_loss"].item() + loss, rel=1e-10)
    out["loss"].backward()
    assert torch.isfinite(xr.grad).all()


def test_yaml_lists_every_hyperparameter(stub_base):
    cfg = OmegaConf.load(ROOT / "src" / "mlcl" / "conf" / "loss" / "clml.yaml")
    assert cfg["_target_"] == "mlcl.losses.clml.CLML"
    own = CLML.hyperparam_defaults()
    keys = set(cfg) - {"_target_"}
    assert keys == set(own) | {"gather"}
    for key in own:
        assert cfg[key] == own[key], key
    assert cfg.gather is False
    from hydra.utils import instantiate

    plugin = instantiate(cfg, num_classes=5, feature_dim=16, base_loss=stub_base)
    assert isinstance(plugin, CLML) and plugin.eig_thd == 1e-6 and plugin.tau == 0.75
