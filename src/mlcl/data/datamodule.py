"""One LightningDataModule for every dataset source.

It builds the three splits of a source, hides training labels with the missing-label simulator
(once, on the full target matrix, so the mask is independent of workers and DDP ranks; val/test
stay fully labelled), applies per-source transforms, optionally returns ``num_views`` augmented
views per training sample, and yields dict batches::

    {"input": [B, ...] or [B, V, ...], "target": LongTensor[B, C] in {1, 0, -1},
     "index": LongTensor[B] (dataset index, for stateful losses)}
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from mlcl.data import missing as missing_lib
from mlcl.errors import DataError
from mlcl.rng import EpochShuffleSampler

log = logging.getLogger(__name__)


class LabeledSplit(Dataset):
    """Wrap a source split with (possibly masked) targets, a transform and ``num_views`` views.

    Sources whose class sets ``batched_getitem = True`` (in-memory tensors: ``source[index_tensor]`` is
    the stacked items) are read a whole batch at a time (``__getitems__``, one indexing op instead of
    one dict per sample and a collation); a transform with ``batched = True`` then sees the whole
    ``[B, ...]`` batch, any other transform each sample.
    """

    def __init__(
        self, source: Dataset, targets: Tensor, transform: Callable | None = None, num_views: int = 1
    ) -> None:
        if len(source) != targets.shape[0]:
            raise ValueError(f"source has {len(source)} items but {targets.shape[0]} target rows")
        self.source, self.targets, self.transform, self.num_views = source, targets, transform, num_views

    def __len__(self) -> int:
        return len(self.source)

    def _view(self, x: Any) -> Tensor:
        return self.transform(x) if self.transform is not None else x

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.source[i]
        if self.num_views == 1:
            inp = self._view(x)
        else:  # independent augmentations of the same sample
            inp = torch.stack([self._view(x) for _ in range(self.num_views)])
        return {"input": inp, "target": self.targets[i], "index": torch.tensor(i)}

    def _view_batch(self, x: Tensor) -> Tensor:
        if self.transform is None:
            return x
        if getattr(self.transform, "batched", False):
            return self.transform(x)
        return torch.stack([self.transform(xi) for xi in x])

    def __getitems__(self, indices: list[int]) -> list[dict[str, Tensor]]:
        """The items ``indices``; for batched sources read in one indexing op (a :class:`ReadBatch`)."""
        if not getattr(self.source, "batched_getitem", False):
            return [self[i] for i in indices]
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.source[idx]
        if self.num_views == 1:
            inp = self._view_batch(x)
        else:
            inp = torch.stack([self._view_batch(x) for _ in range(self.num_views)], dim=1)
        return ReadBatch({"input": inp, "target": self.targets[idx], "index": idx})


class ReadBatch(list):
    """A batch read in one go: per-sample views (so any DataLoader's default collation works) plus the
    collated dict, which :func:`collate` hands on without stacking the samples again."""

    def __init__(self, collated: dict[str, Tensor]) -> None:
        n = len(collated["index"])
        super().__init__({k: v[i] for k, v in collated.items()} for i in range(n))
        self.collated = collated


def collate(batch: list[Any]) -> Any:
    """Batches read in one go (:class:`ReadBatch`) pass through; other items are collated."""
    return batch.collated if isinstance(batch, ReadBatch) else default_collate(batch)


class MultiLabelDataModule(L.LightningDataModule):
    """Datamodule over a source factory ``source(split=...) -> Dataset``.

    Args:
        source: callable (Hydra ``_partial_``) building one split: ``source(split="train")``.
        batch_size: training batch size (per process).
        eval_batch_size: val/test batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        num_views: augmented views per training sample (2 for two-view contrastive losses); None = 1.
        root, path: the data location (a folder or a file). The YAMLs interpolate them into ``source``
            so that ``data.root=...`` / ``data.path=...`` is all a user types; unused here otherwise.
        augment: keyword arguments of the source's ``make_transform(train=True, ...)``.
        missing: missing-label config (``mode``, ``rate``, ``seed``, ``path``), training split only.
        drop_last: drop the last incomplete training batch.
        iterations_per_epoch: fixed number of training batches per epoch drawn from an endless,
            reshuffled stream (MulSupCon's "epoch = 1000 iterations"); None = one pass.
    """

    def __init__(
        self,
        source: Callable[..., Dataset],
        *,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        num_views: int | None = 1,
        root: str | None = None,
        path: str | None = None,
        augment: dict[str, Any] | None = None,
        missing: dict[str, Any] | None = None,
        drop_last: bool = False,
        persistent_workers: bool = False,
        iterations_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        num_views = 1 if num_views is None else int(num_views)
        if num_views < 1:
            raise ValueError(f"data.num_views must be >= 1, got {num_views}")
        self.root, self.path = root, path
        self.source = source
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size or batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.num_views = int(num_views)
        self.augment = dict(augment or {})
        self.missing = dict(missing or {"mode": "none"})
        self.drop_last = bool(drop_last)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.iterations_per_epoch = int(iterations_per_epoch) if iterations_per_epoch else None
        self.splits: dict[str, Dataset] = {}
        self.label_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = {s: self.source(split=s) for s in ("train", "val", "test")}
        train = raw["train"]
        for name, split in raw.items():
            if len(split) == 0:
                where = getattr(split, "path", None) or f"data.source ({type(split).__name__})"
                raise DataError(f"the {name} split is empty", where, "check the data files and data.source.*")
        sizes = {s: d.targets.shape[1] for s, d in raw.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"splits disagree on the number of classes: {sizes}")
        self.num_classes = int(train.targets.shape[1])
        self.class_names = list(getattr(train, "class_names", [str(c) for c in range(self.num_classes)]))
        self.input_kind = getattr(train, "input_kind", "image")

        full = train.targets.long()
        observed = missing_lib.apply_missing(
            full,
            mode=self.missing.get("mode", "none"),
            rate=float(self.missing.get("rate", 0.0)),
            seed=int(self.missing.get("seed", 0)),
            path=self.missing.get("path"),
            file_names=getattr(train, "file_names", None),
        )
        self.label_stats = missing_lib.label_stats(full, observed)
        self.train_targets = observed
        make_tf = getattr(type(train), "make_transform", None)
        train_tf = make_tf(True, **self.augment) if make_tf else None
        eval_tf = make_tf(False, **self.augment) if make_tf else None
        self.splits = {
            "train": LabeledSplit(train, observed, train_tf, self.num_views),
            "val": LabeledSplit(raw["val"], raw["val"].targets.long(), eval_tf),
            "test": LabeledSplit(raw["test"], raw["test"].targets.long(), eval_tf),
        }
        log.info(
            "data: %s train / %s val / %s test, %d classes; missing=%s -> %s",
            len(train),
            len(raw["val"]),
            len(raw["test"]),
            self.num_classes,
            self.missing,
            self.label_stats,
        )

    @property
    def num_train(self) -> int:
        return len(self.splits["train"])

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, train: bool) -> DataLoader:
        sampler, generator = None, None
        if train:
            # order from (seed, epoch), not from the global RNG: a resumed run replays it exactly.
            # Without replacement, num_samples > len concatenates fresh permutations.
            trainer = getattr(self, "trainer", None)
            sampler = EpochShuffleSampler(
                self.splits[split],
                num_samples=self.iterations_per_epoch * self.batch_size
                if self.iterations_per_epoch
                else None,
                epoch=trainer.current_epoch if trainer is not None else 0,
            )
            generator = sampler.loader_generator
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            generator=generator,
            drop_last=self.drop_last if train else False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
