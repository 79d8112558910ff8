"""Pieces shared by the image sources: the file-list dataset, robust image loading, transforms.

Every image source (COCO, VOC, NUS-WIDE, folder + CSV) resolves its split to a list of image paths
plus a ``[N, C]`` target matrix and hands both to :class:`ImageListSource`, whose ``__getitem__``
returns an RGB PIL image; :func:`make_image_transform` (every source's ``make_transform``) turns it
into a ``[3, S, S]`` float tensor. Nothing is ever downloaded: a missing root or annotation file
raises ``FileNotFoundError`` naming the config key to set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BAD_IMAGE_POLICIES = ("raise", "skip_black")
CHECK_FILES_POLICIES = ("none", "raise", "drop")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: side of the black stand-in for an unreadable image (the transform resizes it anyway)
BLACK_SIZE = 32


class BadImageError(OSError):
    """An image file exists but cannot be decoded (corrupt, truncated or not an image)."""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def require_path(path: str | os.PathLike[str] | None, key: str, what: str, *, is_dir: bool = False) -> Path:
    """``path`` as a ``Path`` if it exists; otherwise ``FileNotFoundError`` naming the config ``key``."""
    if path is None or str(path) in ("", "???"):
        raise FileNotFoundError(f"{what}: no path given; set {key}")
    p = Path(path).expanduser()
    ok = p.is_dir() if is_dir else p.is_file()
    if not ok:
        kind = "directory" if is_dir else "file"
        raise FileNotFoundError(f"{what}: {kind} {str(p)!r} not found; set {key} (nothing is downloaded)")
    return p


def load_image(path: str | os.PathLike[str], on_bad_image: str = "raise") -> Image.Image:
    """Decode ``path`` as an RGB PIL image.

    A missing file raises ``FileNotFoundError`` and an undecodable one :class:`BadImageError`, both
    naming the file; with ``on_bad_image="skip_black"`` either becomes a black RGB image (the
    CLML reference's behaviour for lost images) and a warning is logged.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    try:
        with Image.open(path) as img:
            # convert() forces the full decode inside the try (Image.open only reads the header)
            return img.convert("RGB")
    except FileNotFoundError as err:
        if on_bad_image == "raise":
            raise FileNotFoundError(f"image file not found: {str(path)!r}") from err
        log.warning("image file not found, using a black image: %s", path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        if on_bad_image == "raise":
            raise BadImageError(
                f"cannot read image {str(path)!r}: {err} (set data.source.on_bad_image=skip_black "
                "to replace unreadable images by black ones)"
            ) from err
        log.warning("unreadable image, using a black image: %s (%s)", path, err)
    return Image.new("RGB", (BLACK_SIZE, BLACK_SIZE))


def holdout_split(n: int, size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (kept, held-out) sorted index arrays.

    ``size`` is a fraction in (0, 1) or an absolute count >= 1 of held-out rows.
    """
    if isinstance(size, float) and 0.0 < size < 1.0:
        k = int(round(size * n))
    elif float(size) >= 1 and float(size) == int(size):
        k = int(size)
    else:
        raise ValueError(f"held-out size must be a fraction in (0, 1) or a count >= 1, got {size!r}")
    if not 0 < k < n:
        raise ValueError(f"cannot hold out {k} of {n} rows (both parts must be non-empty)")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def fraction_split(n: int, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Seeded split of ``range(n)`` into train/val/test sorted index arrays by ``fractions`` (3 numbers)."""
    fr = np.asarray(list(fractions), dtype=np.float64)
    if fr.shape != (3,) or (fr <= 0).any() or not np.isfinite(fr).all():
        raise ValueError(
            f"fractions must be three positive numbers (train, val, test), got {list(fractions)}"
        )
    fr = fr / fr.sum()
    n_train, n_val = int(round(fr[0] * n)), int(round(fr[1] * n))
    sizes = (n_train, n_val, n - n_train - n_val)
    if min(sizes) < 1:
        raise ValueError(f"fractions {list(fractions)} of {n} rows leave an empty split: sizes {sizes}")
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum(sizes)[:2]
    return {s: np.sort(part) for s, part in zip(SPLITS, np.split(perm, cuts))}


class ImageListSource(Dataset):
    """One split of an image dataset given as a list of files: ``__getitem__`` -> RGB PIL image.

    Args:
        paths: image file of each row.
        targets: ``[N, C]`` labels in {1, 0} (or -1 where the dataset itself marks a label unknown).
        class_names: C names, in class-index order.
        file_names: per-row names matched by ``missing=file`` (default: the paths' base names).
        on_bad_image: "raise" (error naming the file) or "skip_black" (black image, labels kept).
        check_files: "none", "raise" (check every file exists at construction and report the missing
            ones) or "drop" (remove rows whose file does not exist, with a warning).
    """

    input_kind = "image"

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        targets: Tensor,
        class_names: Sequence[str],
        *,
        file_names: Sequence[str] | None = None,
        on_bad_image: str = "raise",
        check_files: str = "none",
    ) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(
                f"data.source.on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}"
            )
        if check_files not in CHECK_FILES_POLICIES:
            raise ValueError(
                f"data.source.check_files must be one of {CHECK_FILES_POLICIES}, got {check_files!r}"
            )
        paths = [str(p) for p in paths]
        names = [os.path.basename(p) for p in paths] if file_names is None else [str(f) for f in file_names]
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.dim() != 2 or targets.shape[0] != len(paths) or len(names) != len(paths):
            raise ValueError(
                f"{len(paths)} paths, {len(names)} file names and targets of shape "
                f"{tuple(targets.shape)} disagree"
            )
        if targets.shape[1] != len(class_names):
            raise ValueError(f"{len(class_names)} class names for {targets.shape[1]} target columns")
        keep = np.arange(len(paths))
        if check_files != "none":
            exists = np.fromiter((os.path.isfile(p) for p in paths), dtype=bool, count=len(paths))
            if not exists.all():
                missing = [paths[i] for i in np.flatnonzero(~exists)[:5]]
                msg = f"{int((~exists).sum())} of {len(paths)} image files do not exist, e.g. {missing}"
                if check_files == "raise":
                    raise FileNotFoundError(msg + " (set data.source.check_files=drop to skip them)")
                log.warning("%s; dropping those rows", msg)
                keep = np.flatnonzero(exists)
                paths = [paths[i] for i in keep]
                names = [names[i] for i in keep]
                targets = targets[torch.from_numpy(keep)]
        #: positions of the kept rows in the lists given to the constructor (all unless "drop")
        self.kept_rows = keep
        self.paths = paths
        self.file_names = names
        self.targets = targets
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:
        return load_image(self.paths[i], self.on_bad_image)

    @staticmethod
    def make_transform(train: bool, **augment: Any) -> Callable:
        """See :func:`make_image_transform`."""
        return make_image_transform(train, **augment)


class Cutout:
    """Paint one axis-aligned rectangle of ``fraction`` x the image sides, centred at a uniformly
    random pixel (clipped at the borders), with one random RGB colour (KMCL/CLML reference Cutout).

    Works on PIL images and on ``[..., H, W]`` tensors (uint8, or float in [0, 1]); returns a copy.
    """

    def __init__(self, fraction: float = 0.5) -> None:
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"cutout fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def _box(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = int(round(self.fraction * h)), int(round(self.fraction * w))
        cy, cx = int(torch.randint(h, ()).item()), int(torch.randint(w, ()).item())
        y0, y1 = max(cy - ch // 2, 0), min(cy + (ch - ch // 2), h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + (cw - cw // 2), w)
        return y0, y1, x0, x1

    def __call__(self, img: Any) -> Any:
        colour = torch.randint(256, (3,))
        if isinstance(img, Image.Image):
            out = img.copy()
            y0, y1, x0, x1 = self._box(out.height, out.width)
            if y1 > y0 and x1 > x0:
                ImageDraw.Draw(out).rectangle((x0, y0, x1 - 1, y1 - 1), fill=tuple(colour.tolist()))
            return out
        if isinstance(img, Tensor):
            out = img.clone()
            y0, y1, x0, x1 = self._box(out.shape[-2], out.shape[-1])
            fill = colour if out.dtype == torch.uint8 else colour.to(out.dtype) / 255.0
            if out.dim() >= 3 and out.shape[-3] == 3:
                out[..., :, y0:y1, x0:x1] = fill.view(3, 1, 1)
            else:
                out[..., y0:y1, x0:x1] = fill[0]
            return out
        raise TypeError(f"Cutout expects a PIL image or a tensor, got {type(img).__name__}")

    def __repr__(self) -> str:
        return f"Cutout(fraction={self.fraction})"


def _normalize_stats(
    normalize: str | Mapping[str, Sequence[float]],
) -> tuple[Sequence[float], Sequence[float]] | None:
    if isinstance(normalize, str):
        if normalize == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        if normalize == "none":
            return None
        raise ValueError(f"augment.normalize must be 'imagenet', 'none' or {{mean, std}}, got {normalize!r}")
    if isinstance(normalize, Mapping) and {"mean", "std"} <= set(normalize):
        return tuple(normalize["mean"]), tuple(normalize["std"])
    raise ValueError(f"augment.normalize must be 'imagenet', 'none' or {{mean, std}}, got {normalize!r}")


def make_image_transform(
    train: bool,
    *,
    image_size: int = 224,
    normalize: str | Mapping[str, Sequence[float]] = "imagenet",
    hflip: bool = False,
    random_resized_crop: Sequence[float] | None = None,
    randaugment: bool | Mapping[str, Any] = False,
    cutout: bool | float = False,
) -> Callable:
    """PIL image -> float32 ``[3, S, S]`` tensor (torchvision.transforms.v2).

    Train: ``RandomResizedCrop(S, scale=random_resized_crop)`` if a scale pair is given, else
    ``Resize((S, S))``; then optional ``RandomHorizontalFlip``, :class:`Cutout` (True = half the
    side, or a fraction), torchvision ``RandAugment`` (True, or a dict of its keyword arguments);
    then ``ToImage`` + ``ToDtype(float32, scale=True)`` + optional ``Normalize``.
    Eval: ``Resize((S, S))`` + ``ToImage`` + ``ToDtype`` + ``Normalize`` (no randomness).

    ``normalize``: "imagenet" (ImageNet mean/std, KMCL/MulCon), "none" ([0, 1] input, CLML/ASL) or
    a mapping with ``mean`` and ``std``. Resizing is bilinear with antialiasing.
    """
    from torchvision.transforms import v2

    size = int(image_size)
    if size < 1:
        raise ValueError(f"augment.image_size must be >= 1, got {image_size}")
    stats = _normalize_stats(normalize)
    ops: list[Callable] = []
    if train and random_resized_crop is not None:
        scale = tuple(float(s) for s in random_resized_crop)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(
                f"augment.random_resized_crop must be a (min, max) scale pair, got {random_resized_crop}"
            )
        ops.append(v2.RandomResizedCrop(size, scale=scale, antialias=True))
    else:
        ops.append(v2.Resize((size, size), antialias=True))
    if train:
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        if cutout:
            ops.append(Cutout(0.5 if cutout is True else float(cutout)))
        if randaugment:
            ops.append(v2.RandAugment(**(dict(randaugment) if isinstance(randaugment, Mapping) else {})))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if stats is not None:
        ops.append(v2.Normalize(mean=list(stats[0]), std=list(stats[1])))
    return v2.Compose(ops)
