"""The easy digit mosaic (``data=digits_easy``, for smoke tests) and the source pools of all digit data.

The 1,797 8x8 digit images shipped inside scikit-learn (``sklearn.datasets.load_digits``, UCI
optical digits) are partitioned per class into disjoint train/val/test *source pools*, so no digit
image appears in two splits. Each mosaic is a ``grid x grid`` canvas of 8x8 cells; ``k`` cells
(``k`` drawn from ``label_probs``, 1-4 by default) hold one digit each, of ``k`` distinct classes,
and the label set is the set of digits present (10 classes). Everything is a deterministic
function of ``data_seed`` and the split, independent of the training seed, so every run of a sweep
evaluates on the same test mosaics. The default benchmark (``data=digits``) is the harder
:class:`mlcl.data.datasets.digit_scenes.DigitScenes`, built from the same pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
CELL = 8


@lru_cache(maxsize=4)
def _source_pools(pool_fractions: tuple[float, ...], seed: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Load sklearn digits and split the indices of each class into disjoint per-split pools."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    pools: list[list[np.ndarray]] = [[] for _ in SPLITS]
    fr = np.asarray(pool_fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr <= 0).any():
        raise ValueError(f"data.pool_fractions must be three positive numbers, got {list(pool_fractions)}")
    cuts = np.cumsum(fr / fr.sum())[:2]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b = (cuts * len(idx)).round().astype(int)
        for s, part in enumerate((idx[:a], idx[a:b], idx[b:])):
            pools[s].append(part)
    return images, labels, pools


class DigitsMosaic(Dataset):
    """Digit-mosaic split: ``x [1, 8*grid, 8*grid]`` float in [0, 1], ``targets [N, 10]`` in {0, 1}.

    Args:
        split: "train", "val" or "test".
        num_samples: mosaics in this split (default from ``sizes``).
        sizes: default number of mosaics per split.
        grid: cells per side (``grid**2 >= max labels``).
        label_probs: probability of 1, 2, ... labels per image.
        data_seed: seed of the source-pool partition and the composition.
        pool_fractions: share of each class's source digits given to train/val/test.
    """

    num_classes = 10
    class_names = [str(d) for d in range(10)]
    input_kind = "image"

    def __init__(
        self,
        split: str,
        *,
        num_samples: int | None = None,
        sizes: dict[str, int] | None = None,
        grid: int = 3,
        label_probs: Sequence[float] = (0.35, 0.3, 0.2, 0.15),
        data_seed: int = 0,
        pool_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        sizes = {"train": 4000, "val": 1000, "test": 1000, **(sizes or {})}
        n = int(num_samples if num_samples is not None else sizes[split])
        probs = np.asarray(label_probs, dtype=np.float64)
        if probs.ndim != 1 or len(probs) > min(grid * grid, 10) or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(
                f"data.label_probs={list(label_probs)} must be non-negative with at most "
                f"min(grid**2, 10)={min(grid * grid, 10)} entries"
            )
        self.split, self.grid = split, grid
        images, _, pools = _source_pools(tuple(float(f) for f in pool_fractions), data_seed)
        pool = pools[_SPLIT_CODE[split]]
        self.source_ids = np.sort(np.concatenate(pool))  # which sklearn digits this split may use
        rng = np.random.default_rng([data_seed, _SPLIT_CODE[split], 7919])

        counts = rng.choice(np.arange(1, len(probs) + 1), size=n, p=probs / probs.sum())
        # k distinct classes and k distinct cells per image: first k of a random permutation
        class_perm = np.argsort(rng.random((n, 10)), axis=1)
        cell_perm = np.argsort(rng.random((n, grid * grid)), axis=1)
        slot = np.arange(len(probs))[None, :] < counts[:, None]  # [n, K] which draws are used
        k_max = len(probs)
        cls = class_perm[:, :k_max]
        cells = cell_perm[:, :k_max]
        # pick a source image of each drawn class from this split's pool
        pick = rng.random((n, k_max))
        pool_sizes = np.array([len(p) for p in pool])
        offsets = np.concatenate([[0], np.cumsum(pool_sizes)[:-1]])
        flat_pool = np.concatenate(pool)
        src = flat_pool[offsets[cls] + (pick * pool_sizes[cls]).astype(np.int64)]

        canvas = np.zeros((n, grid * grid, CELL, CELL), dtype=np.float32)
        rows, ks = np.nonzero(slot)
        canvas[rows, cells[rows, ks]] = images[src[rows, ks]]
        canvas = canvas.reshape(n, grid, grid, CELL, CELL).transpose(0, 1, 3, 2, 4)
        self.images = torch.from_numpy(canvas.reshape(n, 1, grid * CELL, grid * CELL).copy())
        targets = np.zeros((n, 10), dtype=np.int64)
        targets[rows, cls[rows, ks]] = 1
        self.targets = torch.from_numpy(targets)
        self.used_sources = np.unique(src[rows, ks])

    def __len__(self) -> int:
        return self.images.shape[0]

    #: ``self[index_tensor]`` is the stacked images: the datamodule reads whole batches at once
    batched_getitem = True

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]

    @staticmethod
    def make_transform(train: bool, *, max_shift: int = 0, noise_std: float = 0.0, **_: object):
        """Optional train-time augmentation (random shift in pixels, Gaussian noise); eval: identity."""
        if not train or (max_shift == 0 and noise_std == 0.0):
            return None
        return _ShiftNoise(max_shift, noise_std)


class _ShiftNoise:
    """Random integer translation with zero fill plus additive Gaussian noise (CHW tensors)."""

    def __init__(self, max_shift: int, noise_std: float) -> None:
        self.max_shift, self.noise_std = int(max_shift), float(noise_std)

    def __call__(self, x: Tensor) -> Tensor:
        if self.max_shift:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            if dy > 0:
                x[..., :dy, :] = 0
            elif dy < 0:
                x[..., dy:, :] = 0
            if dx > 0:
                x[..., :, :dx] = 0
            elif dx < 0:
                x[..., :, dx:] = 0
        if self.noise_std:
            x = x + self.noise_std * torch.randn_like(x)
        return x
