"""Batched reads of tensor-backed splits: the same batches as item-by-item reads plus collation."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, default_collate

from mlcl.data.datamodule import LabeledSplit, collate
from mlcl.data.datasets.arrays import FeatureAugment


class _Tensors(torch.utils.data.Dataset):
    batched_getitem = True

    def __init__(self, n: int) -> None:
        self.x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


class _PerItem(_Tensors):
    batched_getitem = False


class _AddIndexSum:
    """A per-sample transform (not batched): adds the sum of the sample."""

    def __call__(self, x):
        assert x.dim() == 1, "called on a batch"
        return x + x.sum()


def _item_batch(split: LabeledSplit, idx: list[int]) -> dict:
    return default_collate([split[i] for i in idx])


def test_batched_read_equals_item_reads():
    y = (torch.rand(10, 4, generator=torch.Generator().manual_seed(0)) < 0.5).long()
    split = LabeledSplit(_Tensors(10), y)
    idx = [7, 2, 2, 9]
    raw = split.__getitems__(idx)
    got = collate(raw)
    want = _item_batch(split, idx)
    assert set(got) == set(want) == {"input", "target", "index"}
    plain = default_collate(list(raw))  # a DataLoader without mlcl's collate sees the same batch
    for k in want:
        assert torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype, k
        assert torch.equal(plain[k], want[k]) and plain[k].dtype == want[k].dtype, k


def test_per_sample_transform_and_views_in_a_batched_read():
    y = torch.zeros(6, 2, dtype=torch.long)
    split = LabeledSplit(_Tensors(6), y, transform=_AddIndexSum(), num_views=2)
    got = collate(split.__getitems__([1, 4]))
    want = _item_batch(split, [1, 4])
    assert got["input"].shape == (2, 2, 3)
    assert torch.equal(got["input"], want["input"])


def test_batched_transform_sees_the_batch_and_views_differ():
    torch.manual_seed(0)
    split = LabeledSplit(_Tensors(50), torch.zeros(50, 2, dtype=torch.long), FeatureAugment(0.5), num_views=2)
    x = collate(split.__getitems__(list(range(50))))["input"]
    base = split.source.x
    kept = x != 0
    assert torch.equal(x[kept], base.unsqueeze(1).expand_as(x)[kept])  # zeroing only, no rescaling
    assert 0.3 < kept[:, :, 1:].float().mean() < 0.7  # about half of the (non-zero) features survive
    assert not torch.equal(kept[:, 0], kept[:, 1])  # independent masks per view


def test_loader_uses_batched_reads_only_for_batched_sources():
    y = torch.zeros(9, 2, dtype=torch.long)
    for source in (_Tensors(9), _PerItem(9)):
        split = LabeledSplit(source, y)
        batches = list(DataLoader(split, batch_size=4, collate_fn=collate))
        assert [b["input"].shape[0] for b in batches] == [4, 4, 1]
        assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(9))
    assert isinstance(LabeledSplit(_PerItem(3), y[:3]).__getitems__([0, 1]), list)
