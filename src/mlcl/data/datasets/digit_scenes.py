"""The default benchmark: cluttered multi-label scenes of real handwritten digits (no download).

Built from the 1,797 8x8 digits shipped with scikit-learn, split into disjoint per-split source
pools exactly as the easy mosaic (:func:`mlcl.data.datasets.digits._source_pools`). One image is
generated in four steps, all vectorised over the whole split:

1. **Scene and labels.** A latent scene ``s`` is drawn from ``scene_probs`` (uniform by default).
   Digit ``c`` is present independently with probability ``q[s, c] = t_c * (p_in if c is a core
   digit of scene s else p_out)``, redrawn until at least one digit is present. ``t_c =
   imbalance ** (-rank_c / (C - 1))`` is the long tail (rank = the digit's position in
   ``class_order``), so the head digit is ``imbalance`` times as frequent as the tail digit, and
   digits sharing a scene co-occur far more often than others (like objects in COCO scenes).
2. **Objects.** Every present digit becomes one object: a random source image of that class from
   this split's pool, occluded with probability ``occlusion_prob`` (a random ``a x b`` box of the
   8x8 source with ``a, b`` in ``occlusion_size`` is erased), scaled by a factor drawn from
   ``scale_range`` and placed at a random slot of a ``grid x grid`` layout of ``cell``-pixel slots,
   its centre jittered by up to ``jitter`` pixels.
3. **Clutter** (0 to ``clutter_max`` per image, in free slots, no label): with probability
   ``partial_prob`` half of a random source digit of any class (top, bottom, left or right half),
   else a random pen stroke (a line segment of width ``stroke_width``).
4. **Composition.** Objects are combined by a pixel-wise maximum; Gaussian noise of std
   ``noise_std`` is added and the image clipped to [0, 1].

Labels, objects, clutter and noise use separate random streams of ``(data_seed, split)``, so
turning clutter or noise off leaves the labels and the labelled objects unchanged, and every
training seed of a sweep sees the same data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mlcl.data.datasets.digits import _SPLIT_CODE, SPLITS, DigitsMosaic, _source_pools
from mlcl.errors import UserError

SRC = 8  # sklearn digits are 8x8
# five scenes of four core digits; every digit is core in exactly two scenes and shares a scene
# with six others, so the class frequency is set by the long tail alone (see scene_matrix)
DEFAULT_SCENES = ((0, 3, 5, 8), (1, 2, 6, 9), (0, 4, 7, 9), (1, 5, 7, 8), (2, 3, 4, 6))
_STREAM = {"labels": 1, "objects": 2, "clutter": 3, "noise": 4}


def scene_matrix(
    scenes: Sequence[Sequence[int]], p_in: float, p_out: float, imbalance: float, class_order: Sequence[int]
) -> np.ndarray:
    """Presence probabilities ``q [S, C]``: ``q[s, c] = t_c * (p_in if c in scenes[s] else p_out)``."""
    num_classes = len(class_order)
    rank = np.empty(num_classes, dtype=np.float64)
    rank[np.asarray(class_order)] = np.arange(num_classes)
    tail = float(imbalance) ** (-rank / max(num_classes - 1, 1))  # [C], 1 for the head digit
    core = np.zeros((len(scenes), num_classes), dtype=bool)
    for s, members in enumerate(scenes):
        core[s, list(members)] = True
    return tail[None, :] * np.where(core, p_in, p_out)


def sample_labels(
    rng: np.random.Generator, q: np.ndarray, scene_probs: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scenes ``[n]`` drawn from ``scene_probs`` and labels ``[n, C]`` (bool) ~ Bernoulli(``q[scene]``).

    A row without any label is redrawn within its scene, so ``P(c | s) = q[s, c] / (1 - prod_d (1 -
    q[s, d]))`` and the scene frequencies stay ``scene_probs``.
    """
    scene = rng.choice(len(scene_probs), size=n, p=scene_probs)
    qs = q[scene]  # [n, C]
    targets = rng.random(qs.shape) < qs
    empty = ~targets.any(1)
    while empty.any():  # a few rounds: P(empty) is small for every scene
        targets[empty] = rng.random((int(empty.sum()), qs.shape[1])) < qs[empty]
        empty = ~targets.any(1)
    return scene, targets


def _interp_matrix(centre: np.ndarray, scale: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resampling weights ``[N, size, SRC]`` placing an 8-pixel source centred at ``centre``.

    Output pixel ``x`` (centre ``x + 0.5``) reads source coordinate ``(x + 0.5 - centre) / scale + 4``;
    its weight on source pixel ``u`` (centre ``u + 0.5``) is the triangle ``max(0, 1 - |distance|)``,
    zero outside the source (so at scale 1 and an integer offset the digit is copied verbatim).
    """
    x = np.arange(size, dtype=np.float64) + 0.5
    src = (x[None, :] - centre[:, None]) / scale[:, None] + SRC / 2  # [N, size]
    u = np.arange(SRC, dtype=np.float64) + 0.5
    return np.clip(1.0 - np.abs(src[:, :, None] - u[None, None, :]), 0.0, None).astype(np.float32)


def render(patches: np.ndarray, cy: np.ndarray, cx: np.ndarray, scale: np.ndarray, size: int) -> Tensor:
    """Draw 8x8 ``patches [N, 8, 8]`` scaled by ``scale [N]`` at centres ``(cy, cx)``: ``[N, size, size]``."""
    ry = torch.from_numpy(_interp_matrix(cy, scale, size))  # [N, size, 8]
    rx = torch.from_numpy(_interp_matrix(cx, scale, size))
    return ry @ torch.from_numpy(patches) @ rx.transpose(1, 2)


def render_strokes(p0: np.ndarray, p1: np.ndarray, width: float, size: int) -> Tensor:
    """Anti-aliased segments from ``p0 [N, 2]`` to ``p1 [N, 2]`` (y, x in pixels): ``[N, size, size]``."""
    g = np.arange(size, dtype=np.float32) + 0.5
    pix = np.stack(np.meshgrid(g, g, indexing="ij"), -1)[None]  # [1, size, size, 2]
    a, d = p0[:, None, None, :].astype(np.float32), (p1 - p0)[:, None, None, :].astype(np.float32)
    # distance to the segment: project onto it, clamp to the end points
    t = ((pix - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-6)
    closest = a + np.clip(t, 0.0, 1.0)[..., None] * d
    dist = np.sqrt(((pix - closest) ** 2).sum(-1))
    return torch.from_numpy(np.clip(1.0 - dist / width, 0.0, 1.0))


def _pick_sources(rng: np.random.Generator, pool: list[np.ndarray], classes: np.ndarray) -> np.ndarray:
    """One uniformly drawn source index of each requested class from this split's per-class pools."""
    sizes = np.array([len(p) for p in pool])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(pool)
    return flat[offsets[classes] + (rng.random(len(classes)) * sizes[classes]).astype(np.int64)]


def _composite(n: int, size: int, image_of: np.ndarray, layers: Tensor) -> Tensor:
    """Pixel-wise maximum of ``layers [M, size, size]`` per image ``image_of [M]``: ``[n, size, size]``."""
    canvas = torch.zeros(n, size * size)
    index = torch.from_numpy(image_of)[:, None].expand(-1, size * size)
    canvas.scatter_reduce_(0, index, layers.reshape(-1, size * size), "amax", include_self=True)
    return canvas.view(n, size, size)


class DigitScenes(Dataset):
    """Scene-structured digit images: ``x [1, grid*cell, grid*cell]`` in [0, 1], ``targets [N, 10]``.

    Args:
        split: "train", "val" or "test".
        num_samples: images in this split (default from ``sizes``).
        sizes: default number of images per split.
        grid, cell: a ``grid x grid`` layout of ``cell``-pixel slots (image side ``grid * cell``).
        scenes: core digits of each latent scene.
        scene_probs: probability of each scene (None = uniform).
        p_in, p_out: presence probability of a head-frequency digit inside / outside its scenes.
        imbalance: frequency ratio of the most to the least frequent digit (the long tail).
        class_order: digits from most to least frequent.
        scale_range: digit size factor range (1 = 8 pixels).
        jitter: maximum shift of an object's centre from its slot centre, in pixels.
        occlusion_prob, occlusion_size: chance that a digit loses a random box; box side range (px).
        clutter_max: unlabelled distractors per image, uniform in 0..clutter_max.
        partial_prob: share of distractors that are half digits (the rest are pen strokes).
        stroke_width: pen stroke width in pixels.
        noise_std: additive Gaussian pixel noise.
        data_seed, pool_fractions: as for the easy mosaic.
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
        grid: int = 4,
        cell: int = 8,
        scenes: Sequence[Sequence[int]] = DEFAULT_SCENES,
        scene_probs: Sequence[float] | None = None,
        p_in: float = 0.9,
        p_out: float = 0.05,
        imbalance: float = 10.0,
        class_order: Sequence[int] = tuple(range(10)),
        scale_range: Sequence[float] = (0.9, 1.25),
        jitter: float = 2.0,
        occlusion_prob: float = 0.3,
        occlusion_size: Sequence[int] = (2, 3),
        clutter_max: int = 2,
        partial_prob: float = 0.5,
        stroke_width: float = 1.0,
        noise_std: float = 0.03,
        data_seed: int = 0,
        pool_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        sizes = {"train": 4000, "val": 1000, "test": 1000, **(sizes or {})}
        n = int(num_samples if num_samples is not None else sizes[split])
        scenes = [tuple(int(c) for c in s) for s in scenes]
        probs = np.full(len(scenes), 1.0 / max(len(scenes), 1)) if scene_probs is None else scene_probs
        probs = np.asarray(probs, dtype=np.float64)
        self.q = _validated_q(scenes, probs, p_in, p_out, imbalance, class_order, grid)
        self.scene_probs = probs / probs.sum()
        self.split, self.grid, self.cell = split, int(grid), int(cell)
        size = self.grid * self.cell
        images, _, pool = _source_pools(tuple(float(f) for f in pool_fractions), data_seed)
        pool = pool[_SPLIT_CODE[split]]
        self.source_ids = np.sort(np.concatenate(pool))
        stream = {k: np.random.default_rng([data_seed, _SPLIT_CODE[split], v]) for k, v in _STREAM.items()}

        # 1. scenes and labels (Bernoulli given the scene, empty rows redrawn)
        self.scene, targets = sample_labels(stream["labels"], self.q, self.scene_probs, n)
        self.targets = torch.from_numpy(targets.astype(np.int64))

        # 2. one object per present digit, each in its own slot of a random slot order
        rng = stream["objects"]
        slots = grid * grid
        slot_order = np.argsort(rng.random((n, slots)), axis=1)
        rows, cls = np.nonzero(targets)
        nth = np.cumsum(targets, axis=1)[rows, cls] - 1  # index of the object within its image
        src = _pick_sources(rng, pool, cls)
        patches = images[src].copy()
        _occlude(rng, patches, occlusion_prob, occlusion_size)
        cy, cx, sc = self._place(rng, slot_order[rows, nth], scale_range, jitter)
        layers = [render(patches, cy, cx, sc, size)]
        owners = [rows]
        self.used_sources = np.unique(src)

        # 3. clutter in the remaining free slots, never labelled
        rng = stream["clutter"]
        count = rng.integers(0, int(clutter_max) + 1, size=n) if clutter_max > 0 else np.zeros(n, int)
        count = np.minimum(count, slots - targets.sum(1))
        c_rows = np.repeat(np.arange(n), count)
        c_nth = targets.sum(1)[c_rows] + (np.arange(len(c_rows)) - np.repeat(np.cumsum(count) - count, count))
        cy, cx, sc = self._place(rng, slot_order[c_rows, c_nth], scale_range, jitter)
        partial = rng.random(len(c_rows)) < partial_prob
        halves = _pick_sources(rng, pool, rng.integers(0, 10, size=int(partial.sum())))
        layers.append(render(_half(rng, images[halves]), cy[partial], cx[partial], sc[partial], size))
        owners.append(c_rows[partial])
        self.used_sources = np.union1d(self.used_sources, halves)
        stroke = ~partial
        angle = rng.random(int(stroke.sum())) * np.pi
        half_len = self.cell * sc[stroke] * (0.25 + 0.25 * rng.random(int(stroke.sum())))
        offset = np.stack([np.sin(angle), np.cos(angle)], 1) * half_len[:, None]
        centre = np.stack([cy[stroke], cx[stroke]], 1)
        layers.append(render_strokes(centre - offset, centre + offset, float(stroke_width), size))
        owners.append(c_rows[stroke])
        self.num_clutter = torch.from_numpy(count)

        # 4. composition and noise
        canvas = _composite(n, size, np.concatenate(owners), torch.cat(layers))
        if noise_std > 0:
            noise = stream["noise"].standard_normal(canvas.shape).astype(np.float32)
            canvas = (canvas + float(noise_std) * torch.from_numpy(noise)).clamp_(0.0, 1.0)
        self.images = canvas.unsqueeze(1).contiguous()

    def _place(
        self, rng: np.random.Generator, slot: np.ndarray, scale_range: Sequence[float], jitter: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centres (y, x) in pixels and scale factors of objects placed in ``slot [M]`` (row-major)."""
        lo, hi = float(scale_range[0]), float(scale_range[1])
        scale = lo + (hi - lo) * rng.random(len(slot))
        shift = float(jitter) * (2.0 * rng.random((2, len(slot))) - 1.0)
        cy = (slot // self.grid + 0.5) * self.cell + shift[0]
        cx = (slot % self.grid + 0.5) * self.cell + shift[1]
        return cy, cx, scale

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]

    # the same optional train-time shift/noise augmentation (data.augment) as the easy mosaic
    make_transform = staticmethod(DigitsMosaic.make_transform)


def _occlude(rng: np.random.Generator, patches: np.ndarray, prob: float, side: Sequence[int]) -> None:
    """Erase, in place, a random box with sides in ``side`` from each patch with probability ``prob``."""
    m = len(patches)
    hit = rng.random(m) < prob
    h, w = rng.integers(int(side[0]), int(side[1]) + 1, size=(2, m))
    top = (rng.random(m) * (SRC - h + 1)).astype(np.int64)
    left = (rng.random(m) * (SRC - w + 1)).astype(np.int64)
    r = np.arange(SRC)
    in_rows = (r[None] >= top[:, None]) & (r[None] < (top + h)[:, None])  # [m, 8]
    in_cols = (r[None] >= left[:, None]) & (r[None] < (left + w)[:, None])
    patches[in_rows[:, :, None] & in_cols[:, None, :] & hit[:, None, None]] = 0.0


def _half(rng: np.random.Generator, patches: np.ndarray) -> np.ndarray:
    """Keep one random half (0 top, 1 bottom, 2 left, 3 right) of each 8x8 patch: ``[m, 8, 8]``."""
    which = rng.integers(0, 4, size=len(patches))
    r = np.arange(SRC)
    lower = r >= SRC // 2
    keep_rows = np.where((which == 0)[:, None], ~lower, np.where((which == 1)[:, None], lower, True))
    keep_cols = np.where((which == 2)[:, None], ~lower, np.where((which == 3)[:, None], lower, True))
    return patches * (keep_rows[:, :, None] & keep_cols[:, None, :])


def _validated_q(
    scenes: list[tuple[int, ...]],
    probs: np.ndarray,
    p_in: float,
    p_out: float,
    imbalance: float,
    class_order: Sequence[int],
    grid: int,
) -> np.ndarray:
    """Check the scene knobs (one UserError paragraph each) and return ``scene_matrix``."""
    where = "data.source"
    if not scenes or any(not s or min(s) < 0 or max(s) > 9 or len(set(s)) < len(s) for s in scenes):
        raise UserError(
            f"scenes={[list(s) for s in scenes]} must be non-empty lists of distinct digits 0-9",
            f"{where}.scenes",
            "give each scene its core digits, e.g. [[0, 3, 5, 8], [1, 2, 6, 9]]",
        )
    if probs.shape != (len(scenes),) or (probs < 0).any() or probs.sum() <= 0:
        raise UserError(
            f"scene_probs={probs.tolist()} needs one non-negative weight per scene ({len(scenes)})",
            f"{where}.scene_probs",
            "set null for uniform scenes",
        )
    if not (0 <= p_out <= 1 and 0 < p_in <= 1 and imbalance >= 1):
        raise UserError(
            f"p_in={p_in}, p_out={p_out}, imbalance={imbalance} out of range",
            f"{where}.p_in/p_out/imbalance",
            "use 0 < p_in <= 1, 0 <= p_out <= 1 and imbalance >= 1",
        )
    if sorted(int(c) for c in class_order) != list(range(10)):
        raise UserError(
            f"class_order={list(class_order)} is not a permutation of the digits 0-9",
            f"{where}.class_order",
            "list every digit once, most frequent first",
        )
    if grid * grid < 10:
        raise UserError(
            f"grid={grid} gives {grid * grid} slots, fewer than the 10 digits an image may hold",
            f"{where}.grid",
            "use grid >= 4",
        )
    return scene_matrix(scenes, p_in, p_out, imbalance, class_order)
