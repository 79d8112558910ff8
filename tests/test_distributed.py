"""DDP equivalence of MulCon (spec mulcon.md §14): 2 gloo CPU processes with B rows each must reproduce the
single-process value and gradients on the concatenated 2B rows; plus ``mlcl.distributed.all_gather_cat``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from mlcl.losses.base import LossContext
from mlcl.losses.mulcon import MulCon, mulcon_loss

WORLD = 2
C, D, E = 4, 6, 8
SIZES = (4, 6)  # rows per rank for the plugin case (unequal on purpose)
B = 5  # rows per rank for the pure-function case
LOSS_CASES = [dict(), dict(denominator_size=14, temperature=0.3)]
PLUGIN_CASES = [dict(), dict(denominator_size=16, base_temperature=0.1)]


def full_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, C, D, generator=g, dtype=torch.float64)
    emb = torch.randn(n, C, E, generator=g, dtype=torch.float64)
    logits = torch.randn(n, C, generator=g, dtype=torch.float64)
    targets = (torch.rand(n, C, generator=g) < 0.4).long()
    targets[(torch.rand(n, C, generator=g) < 0.3) & (targets == 0)] = -1
    return feats, emb, logits, targets


def make_plugin(**kw) -> MulCon:
    torch.manual_seed(123)  # identical projector on every rank, as DDP's initial broadcast guarantees
    return MulCon(num_classes=C, feature_dim=E, proj_hidden=5, proj_dim=D, gather=True, **kw).double()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from mlcl.distributed import all_gather_cat

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    res: dict[str, object] = {}
    try:
        # 1. mulcon_loss on all_gather_cat outputs, B rows per rank.
        feats, _, logits, targets = full_batch(WORLD * B, seed=0)
        rows = slice(rank * B, (rank + 1) * B)
        for i, kw in enumerate(LOSS_CASES):
            f = feats[rows].clone().requires_grad_(True)
            x = logits[rows].clone().requires_grad_(True)
            out = mulcon_loss(all_gather_cat(f), all_gather_cat(x), all_gather_cat(targets[rows]), **kw)
            out["loss"].backward()
            res[f"loss{i}"] = {k: v.detach() for k, v in out.items()}
            # DDP averages over ranks after the gather's summed backward.
            res[f"loss{i}_grads"] = (f.grad / WORLD, x.grad / WORLD)

        # 2. the MulCon plugin with gather=True, unequal rows per rank.
        _, emb, logits, targets = full_batch(sum(SIZES), seed=1)
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        for i, kw in enumerate(PLUGIN_CASES):
            plugin = make_plugin(**kw)
            e = emb[rows].clone().requires_grad_(True)
            x = logits[rows].clone().requires_grad_(True)
            out = plugin(
                {"embeddings": e, "logits": x}, targets[rows], LossContext(indices=torch.arange(SIZES[rank]))
            )
            out["loss"].backward()
            params = []
            for p in plugin.parameters():
                grad = p.grad.clone()
                dist.all_reduce(grad)
                params.append(grad / WORLD)
            res[f"plugin{i}"] = {k: v.detach() for k, v in out.items()}
            res[f"plugin{i}_grads"] = (e.grad / WORLD, x.grad / WORLD, params)

        # 3. all_gather_cat itself: unequal sizes, values, summed backward, integer tensors.
        n = rank + 2
        x = (torch.arange(n * 3, dtype=torch.float64).reshape(n, 3) + 100 * rank).requires_grad_(True)
        gathered = all_gather_cat(x)
        weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape)
        (gathered * weights).sum().backward()
        res["gather"] = (gathered.detach(), x.grad, all_gather_cat(torch.full((n,), rank, dtype=torch.long)))

        # 4. a gradient buffer shared with another branch must not be modified by the gather's backward.
        leaf = torch.ones(WORLD, requires_grad=True)
        other = leaf * 2  # created before the gather, so its backward runs after the gather's
        y = torch.ones(1, requires_grad=True)
        ((all_gather_cat(y) + other) * torch.arange(1.0, WORLD + 1)).sum().backward()
        res["shared_grad"] = leaf.grad
    finally:
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        yield [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]


def assert_terms_equal(got, ref):
    for key in ("loss", "loss_cls", "loss_con", "num_anchors"):
        torch.testing.assert_close(got[key], ref[key].detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_mulcon_loss_on_gathered_inputs_equals_single_process(ranks, case):
    feats, _, logits, targets = full_batch(WORLD * B, seed=0)
    f = feats.clone().requires_grad_(True)
    x = logits.clone().requires_grad_(True)
    ref = mulcon_loss(f, x, targets, **LOSS_CASES[case])
    ref["loss"].backward()
    assert ref["loss_con"].item() > 0
    for rank, res in enumerate(ranks):
        assert_terms_equal(res[f"loss{case}"], ref)
        gf, gx = res[f"loss{case}_grads"]
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(gf, f.grad[rows], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(gx, x.grad[rows], rtol=1e-10, atol=1e-14)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", range(len(PLUGIN_CASES)))
def test_plugin_gather_equals_single_process(ranks, case):
    _, emb, logits, targets = full_batch(sum(SIZES), seed=1)
    plugin = make_plugin(**PLUGIN_CASES[case])
    e = emb.clone().requires_grad_(True)
    x = logits.clone().requires_grad_(True)
    ref = plugin({"embeddings": e, "logits": x}, targets, LossContext(indices=torch.arange(sum(SIZES))))
    ref["loss"].backward()
    assert ref["num_anchors"].item() > 0 and ref["loss_con"].item() > 0
    for rank, res in enumerate(ranks):
        assert_terms_equal(res[f"plugin{case}"], ref)
        ge, gx, params = res[f"plugin{case}_grads"]
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        torch.testing.assert_close(ge, e.grad[rows], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(gx, x.grad[rows], rtol=1e-10, atol=1e-14)
        for got, p in zip(params, plugin.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.timeout(120)
def test_all_gather_cat_unequal_sizes(ranks):
    parts = [torch.arange((r + 2) * 3, dtype=torch.float64).reshape(r + 2, 3) + 100 * r for r in range(WORLD)]
    expected = torch.cat(parts)
    weights = torch.arange(expected.numel(), dtype=torch.float64).reshape(expected.shape)
    owners = torch.cat([torch.full((r + 2,), r, dtype=torch.long) for r in range(WORLD)])
    start = 0
    for rank, res in enumerate(ranks):
        gathered, grad, gathered_int = res["gather"]
        assert torch.equal(gathered, expected)
        assert torch.equal(gathered_int, owners)
        # Every rank computes the same loss, so the summed backward returns WORLD × the rank's slice.
        assert torch.equal(grad, WORLD * weights[start : start + rank + 2])
        start += rank + 2


@pytest.mark.timeout(120)
def test_all_gather_cat_backward_leaves_shared_gradient_alone(ranks):
    for res in ranks:
        torch.testing.assert_close(res["shared_grad"], 2 * torch.arange(1.0, WORLD + 1))
