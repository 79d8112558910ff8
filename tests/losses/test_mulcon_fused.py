"""The fused MulCon contrast (default path) against the plain autograd path on the full similarity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlcl.losses.mulcon import _FusedContrast, _plain_contrast, select_contrast_set


def _setup(B, C, d, p, seed, negatives=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, d, generator=g, dtype=torch.float64)
    x = torch.randn(B, C, generator=g, dtype=torch.float64)
    y = (torch.rand(B, C, generator=g) < p).long()
    index, labels, num_pos = select_contrast_set(x, y, negatives)
    v = F.normalize(z.reshape(B * C, d)[index], dim=1).requires_grad_(True)
    return v, labels, num_pos, C


@pytest.mark.parametrize(
    ("B", "C", "d", "p", "negatives", "tau", "scale"),
    [
        (16, 6, 8, 0.35, 0, 0.2, 1.0),
        (16, 6, 8, 0.35, 60, 0.1, 1 / 3),  # hard negatives: S > P, the two-product backward
        (40, 12, 16, 0.1, 0, 0.5, 2.0),  # many anchors without a positive (n_i = 0)
        (8, 3, 4, 0.9, 5, 0.07, 1.0),  # fewer negatives exist than asked for
    ],
)
def test_fused_matches_plain_float64(B, C, d, p, negatives, tau, scale):
    v, labels, num_pos, classes = _setup(B, C, d, p, seed=B + C, negatives=negatives)
    plain = _plain_contrast(v, labels, num_pos, tau, scale)
    (g_plain,) = torch.autograd.grad(plain * 1.7, v)
    fused = _FusedContrast.apply(v, labels, num_pos, tau, scale, classes)
    (g_fused,) = torch.autograd.grad(fused * 1.7, v)  # a non-unit upstream gradient
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-10)
    torch.testing.assert_close(g_fused, g_plain, rtol=0, atol=1e-10)
    assert g_plain.abs().max() > 1e-3  # not a vacuous comparison
    assert float(plain.detach()) != 0.0


def test_fused_gradcheck():
    v, labels, num_pos, classes = _setup(6, 4, 3, 0.5, seed=3, negatives=8)
    assert torch.autograd.gradcheck(
        lambda a: _FusedContrast.apply(a, labels, num_pos, 0.3, 0.8, classes), (v,)
    )
