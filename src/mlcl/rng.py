"""Random state that shapes training, made a function of ``(seed, epoch)`` so resume replays it exactly.

Two pieces:

- :class:`EpochShuffleSampler` draws the training order from its own generator seeded with
  ``(seed, epoch)``; it never touches the global torch RNG, so the order does not depend on what
  else drew random numbers since the process started (a resumed run starts a new process).
- :class:`RNGState` re-seeds the global torch/numpy/python RNGs at the start of every training
  epoch from ``(seed, epoch)`` (augmentations, dropout, random masks of a loss draw from them) and
  stores their states in every checkpoint (``checkpoint["rng_states"]``), restoring them on resume.

Checkpoints are written at epoch ends, so a run killed anywhere in epoch ``e`` resumes from the
end of epoch ``e - 1`` and replays epoch ``e`` with the same order and the same random draws.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sized
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import RandomSampler

# separate streams for the sampler, the DataLoader's worker seeds and the global RNGs
_SAMPLER, _WORKERS, _GLOBAL = 0, 1, 2


def epoch_seed(seed: int, epoch: int, stream: int = _GLOBAL) -> int:
    """A 63-bit seed mixed from ``(seed, epoch, stream)`` (SeedSequence: nearby inputs decorrelate)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def default_seed() -> int:
    """The run's seed as ``lightning.seed_everything`` published it (``PL_GLOBAL_SEED``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochShuffleSampler(RandomSampler):
    """A ``RandomSampler`` whose permutation of epoch ``e`` is drawn from a generator seeded ``(seed, e)``.

    Lightning calls :meth:`set_epoch` before every training epoch; without it, each pass advances
    the epoch by one. The body of ``__iter__`` runs lazily (at the first batch), after Lightning set
    the epoch, also on resume. ``num_samples`` > ``len(data)`` concatenates fresh permutations
    (a fixed number of iterations per epoch). Under DDP Lightning swaps it for a
    ``DistributedSampler``, which is itself seeded by ``(seed, epoch)``.
    """

    def __init__(
        self, data_source: Sized, seed: int | None = None, num_samples: int | None = None, epoch: int = 0
    ) -> None:
        super().__init__(data_source, num_samples=num_samples)
        self.seed = default_seed() if seed is None else int(seed)
        self.epoch = int(epoch)
        # the DataLoader draws its workers' base seed from this generator instead of the global RNG
        self.loader_generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, _WORKERS))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.loader_generator.manual_seed(epoch_seed(self.seed, self.epoch, _WORKERS))

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        self.generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, _SAMPLER))
        yield from super().__iter__()


def get_states() -> dict[str, Any]:
    """The states of the python, numpy, torch CPU and (if present) CUDA global RNGs."""
    # tuples of ints, tensors and floats only: loadable with ``torch.load(weights_only=True)``
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            str(np_state[0]),
            torch.from_numpy(np_state[1].astype(np.int64)),
            *map(float, np_state[2:]),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_states(states: dict[str, Any]) -> None:
    """Restore what :func:`get_states` returned (CUDA only when the device count matches)."""
    random.setstate(states["python"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_globals(seed: int) -> None:
    """Seed python, numpy and torch (all devices) global RNGs with one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNGState(L.Callback):
    """Re-seed the global RNGs from ``(seed, epoch, rank)`` at each training epoch start; checkpoint them.

    The states at save time go into ``checkpoint["rng_states"]`` and are restored on resume (so
    draws made between resuming and the first epoch start are reproduced too); the epoch-start
    re-seed then makes the epoch itself independent of the process history.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = default_seed() if seed is None else int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # each rank gets its own stream (different augmentations per rank, as with per-rank seeding)
        seed_globals(epoch_seed(self.seed + 1_000_003 * trainer.global_rank, trainer.current_epoch))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["rng_states"] = get_states()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_states(checkpoint["rng_states"])
