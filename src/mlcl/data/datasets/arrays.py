"""Tabular multi-label data from ``.npz`` or HDF5 arrays (``input_kind="vector"``), e.g. yeast.

Each file holds a feature matrix ``[N, D]`` (``feature_key``) and a 0/1 label matrix ``[N, C]``
(``target_key``; -1 = unknown is accepted with ``allow_unknown``), optionally a ``[C]`` array of
class names (``class_names_key``; default names "0".."C-1"). The three splits come from:

* three files ``train_path`` / ``val_path`` / ``test_path`` (yeast: the MulSupCon files), or
* one file ``path`` with split-specific keys: a key containing ``{split}`` is formatted per split,
  e.g. ``feature_key="{split}/feature"`` for HDF5 groups or ``"X_{split}"`` in an npz; or
* one file ``path`` with a per-row ``split_key`` array (0/1/2 or "train"/"val"/"test"); or
* one file ``path`` split at random by ``fractions`` (train, val, test) with ``seed``.

With ``standardize`` the features are shifted and scaled by the per-feature mean and standard
deviation (population std; constant features are only centred) of the TRAIN split, which are then
applied unchanged to val and test (MulSupCon's StandardScaler protocol). All three split objects
share one cached load, so the files are read and the scaler fitted once per process.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mlcl.data.datasets.images import SPLITS, check_split, fraction_split, require_path
from mlcl.errors import DataError

NPZ_SUFFIXES = (".npz",)
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "0": 0, "1": 1, "2": 2}


@dataclass(frozen=True)
class LoadedArrays:
    """Result of one cached load: per-split float32 features / int64 targets and the train scaler."""

    features: dict[str, Tensor]
    targets: dict[str, Tensor]
    rows: dict[str, np.ndarray]  # row numbers of each split in its file
    class_names: list[str]
    mean: np.ndarray | None  # [D] float64, None without standardisation
    scale: np.ndarray | None


def _list_keys(path: Path) -> list[str]:
    if path.suffix.lower() in NPZ_SUFFIXES:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    import h5py

    names: list[str] = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def read_arrays(path: Path, keys: dict[str, tuple[str, str]]) -> dict[str, np.ndarray]:
    """Read ``{name: (key in file, config key)}`` from one npz/HDF5 file; ``None`` keys are skipped.

    A missing key raises ``ValueError`` naming the file, the key, the arrays present and the config
    key to set.
    """
    suffix = path.suffix.lower()
    out: dict[str, np.ndarray] = {}

    def missing(key: str, cfg: str) -> ValueError:
        return ValueError(f"{path}: no array {key!r} (arrays present: {_list_keys(path)}); set {cfg}")

    if suffix in NPZ_SUFFIXES:
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"cannot read as .npz (corrupt or truncated: {err})", path) from err
        with z:
            for name, (key, cfg) in keys.items():
                if key not in z.files:
                    raise missing(key, cfg)
                try:
                    out[name] = z[key]
                except ValueError as err:  # object arrays need pickle, which stays off
                    raise ValueError(f"{path}: array {key!r} cannot be read without pickle ({err})") from err
                except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                    raise DataError(f"array {key!r} is corrupt or truncated ({err})", path) from err
    elif suffix in HDF5_SUFFIXES:
        import h5py

        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise DataError(f"cannot open as HDF5 (corrupt or truncated: {err})", path) from err
        with f:
            for name, (key, cfg) in keys.items():
                obj = f.get(key)
                if not isinstance(obj, h5py.Dataset):
                    raise missing(key, cfg)
                out[name] = obj[()]
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected {NPZ_SUFFIXES + HDF5_SUFFIXES}")
    return out


def _check_features(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"{path}: features {key!r} must be 2-D [N, D], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{path}: features {key!r} must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"{path}: features {key!r} hold {int(bad.sum())} NaN/inf values, "
            f"e.g. {x[r, c].item()} at row {r}, column {c}"
        )
    return x


def _check_targets(y: np.ndarray, path: Path, key: str, allow_unknown: bool) -> np.ndarray:
    if y.ndim != 2:
        raise ValueError(
            f"{path}: targets {key!r} must be 2-D [N, C] (one column per class), got shape {y.shape}"
        )
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise ValueError(f"{path}: targets {key!r} must be numeric, got dtype {y.dtype}")
    allowed = [0, 1, -1] if allow_unknown else [0, 1]
    bad = ~np.isin(y, allowed)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        hint = "" if allow_unknown else " (set data.source.allow_unknown=true to accept -1 = unknown)"
        raise ValueError(
            f"{path}: targets {key!r} must be binary 0/1{'/-1' if allow_unknown else ''}; "
            f"found {y[r, c].item()!r} at row {r}, column {c}{hint}"
        )
    return y.astype(np.int64)


def _decode_names(raw: np.ndarray, path: Path, key: str, num_classes: int) -> list[str]:
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(raw).reshape(-1).tolist()]
    if len(names) != num_classes:
        raise ValueError(f"{path}: {len(names)} class names in {key!r} for {num_classes} target columns")
    return names


@lru_cache(maxsize=4)
def load_splits(
    files: tuple[tuple[str, str, str], ...],
    stamps: tuple[tuple[int, int], ...],
    feature_key: str,
    target_key: str,
    class_names_key: str | None,
    split_key: str | None,
    fractions: tuple[float, ...],
    seed: int,
    standardize: bool,
    allow_unknown: bool,
) -> LoadedArrays:
    """Read, check, split and standardise; cached on the file list, their (mtime, size) and options.

    ``files`` is ``((split or "", path, config key), ...)``: three entries for per-split files, one
    (split "") for the one-file forms.
    """
    del stamps  # part of the cache key only: a rewritten file is read again
    templated = "{split}" in feature_key or "{split}" in target_key
    feats: dict[str, np.ndarray] = {}
    targs: dict[str, np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}
    origin: dict[str, tuple[Path, str, str]] = {}  # split -> (file, feature key, target key)
    names: list[str] | None = None

    def read(split_name: str, path: Path, with_split_key: bool) -> dict[str, np.ndarray]:
        fk, tk = feature_key.format(split=split_name), target_key.format(split=split_name)
        keys = {"x": (fk, "data.source.feature_key"), "y": (tk, "data.source.target_key")}
        if class_names_key and split_name in ("train", ""):
            keys["names"] = (class_names_key, "data.source.class_names_key")
        if with_split_key:
            keys["split"] = (split_key, "data.source.split_key")
        arrays = read_arrays(path, keys)
        x = _check_features(arrays["x"], path, fk)
        y = _check_targets(arrays["y"], path, tk, allow_unknown)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{path}: features {fk!r} have {x.shape[0]} rows but targets {tk!r} have {y.shape[0]}"
            )
        arrays["x"], arrays["y"] = x, y
        origin[split_name] = (path, fk, tk)
        return arrays

    if files[0][0]:  # one file per split
        for split_name, path, cfg in files:
            arrays = read(split_name, require_path(path, cfg, f"{split_name} array file"), False)
            feats[split_name], targs[split_name] = arrays["x"], arrays["y"]
            rows[split_name] = np.arange(arrays["x"].shape[0])
            if "names" in arrays:
                names = _decode_names(arrays["names"], Path(path), class_names_key, arrays["y"].shape[1])
    else:
        _, path_s, cfg = files[0]
        path = require_path(path_s, cfg, "array file")
        if templated:
            for split_name in SPLITS:
                arrays = read(split_name, path, False)
                feats[split_name], targs[split_name] = arrays["x"], arrays["y"]
                rows[split_name] = np.arange(arrays["x"].shape[0])
                if "names" in arrays:
                    names = _decode_names(arrays["names"], path, class_names_key, arrays["y"].shape[1])
        else:
            arrays = read("", path, split_key is not None)
            x, y = arrays["x"], arrays["y"]
            if "names" in arrays:
                names = _decode_names(arrays["names"], path, class_names_key, y.shape[1])
            if split_key is not None:
                raw = np.asarray(arrays["split"]).reshape(-1)
                if raw.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"{path}: split key {split_key!r} has {raw.shape[0]} rows, features {x.shape[0]}"
                    )
                codes = [v.decode() if isinstance(v, bytes) else str(v) for v in raw.tolist()]
                bad = sorted({c for c in codes if c not in _SPLIT_CODES})
                if bad:
                    raise ValueError(
                        f"{path}: split key {split_key!r} holds {bad[:5]}; expected 0/1/2 or train/val/test"
                    )
                code = np.array([_SPLIT_CODES[c] for c in codes])
                parts = {s: np.flatnonzero(code == k) for k, s in enumerate(SPLITS)}
                empty = [s for s, idx in parts.items() if len(idx) == 0]
                if empty:
                    raise ValueError(f"{path}: split key {split_key!r} has no rows for {empty}")
            else:
                try:
                    parts = fraction_split(x.shape[0], fractions, seed)
                except ValueError as err:
                    raise DataError(str(err), path, "use more rows or other data.source.fractions") from err
            for s, idx in parts.items():
                feats[s], targs[s], rows[s] = x[idx], y[idx], idx
                origin[s] = origin[""]

    widths = {s: (feats[s].shape[1], targs[s].shape[1]) for s in SPLITS}
    for s in SPLITS[1:]:
        (p0, fk0, tk0), (p1, fk1, tk1) = origin["train"], origin[s]
        if widths[s][0] != widths["train"][0]:
            raise ValueError(
                f"inconsistent feature widths: {widths['train'][0]} in {p0} ({fk0!r}, train) "
                f"but {widths[s][0]} in {p1} ({fk1!r}, {s})"
            )
        if widths[s][1] != widths["train"][1]:
            raise ValueError(
                f"inconsistent numbers of classes: {widths['train'][1]} in {p0} ({tk0!r}, train) "
                f"but {widths[s][1]} in {p1} ({tk1!r}, {s})"
            )
    for s in SPLITS:
        if feats[s].shape[0] == 0:
            raise DataError(f"the {s} split has no rows", origin[s][0], "give every split at least one row")
    num_classes = widths["train"][1]
    mean = scale = None
    if standardize:
        if feats["train"].shape[0] < 2:
            raise ValueError("standardize needs at least 2 training rows")
        mean = feats["train"].mean(0)
        scale = feats["train"].std(0)
        # constant features: centre only (sklearn StandardScaler does the same)
        scale = np.where(scale < 10 * np.finfo(np.float64).eps, 1.0, scale)
    features = {}
    for s in SPLITS:
        x = feats[s] if mean is None else (feats[s] - mean) / scale
        features[s] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return LoadedArrays(
        features=features,
        targets={s: torch.from_numpy(np.ascontiguousarray(targs[s])) for s in SPLITS},
        rows=rows,
        class_names=names if names is not None else [str(c) for c in range(num_classes)],
        mean=mean,
        scale=scale,
    )


def _stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


class ArraySource(Dataset):
    """One split of a tabular dataset: ``__getitem__`` -> float32 ``[D]``, ``targets`` ``[N, C]``.

    Args:
        split: "train", "val" or "test".
        path: the one-file form (split by ``{split}`` keys, ``split_key`` or ``fractions``).
        train_path, val_path, test_path: the three-file form (all three, instead of ``path``).
        feature_key, target_key: array names (may contain ``{split}``).
        class_names_key: optional array of C class names.
        split_key: optional per-row split array (one-file form).
        fractions, seed: random split of the one-file form.
        standardize: centre and scale every feature by the training split's mean and std.
        allow_unknown: accept -1 (unknown) targets.
    """

    input_kind = "vector"

    def __init__(
        self,
        split: str,
        *,
        path: str | None = None,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        feature_key: str = "feature",
        target_key: str = "target",
        class_names_key: str | None = None,
        split_key: str | None = None,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        standardize: bool = True,
        allow_unknown: bool = False,
    ) -> None:
        check_split(split)
        per_split = {"train": train_path, "val": val_path, "test": test_path}
        given = [s for s, p in per_split.items() if p not in (None, "", "???")]
        if path not in (None, "", "???") and given:
            raise ValueError("set either data.path or data.source.{train,val,test}_path, not both")
        if given:
            absent = [f"data.source.{s}_path" for s in SPLITS if s not in given]
            if absent:
                raise FileNotFoundError(f"the three-file form needs all of train/val/test; set {absent}")
            files = tuple((s, str(per_split[s]), f"data.source.{s}_path") for s in SPLITS)
        else:
            files = (("", "" if path in (None, "???") else str(path), "data.path"),)
        if split_key is not None and ("{split}" in feature_key or "{split}" in target_key):
            raise ValueError("data.source.split_key cannot be combined with '{split}' keys")
        loaded = load_splits(
            files,
            tuple(_stamp(p) for _, p, _ in files),
            feature_key,
            target_key,
            class_names_key,
            split_key,
            tuple(float(f) for f in fractions),
            int(seed),
            bool(standardize),
            bool(allow_unknown),
        )
        self.split = split
        self.features = loaded.features[split]
        self.targets = loaded.targets[split]
        self.rows = loaded.rows[split]
        self.class_names = list(loaded.class_names)
        self.num_classes = len(self.class_names)
        self.num_features = int(self.features.shape[1])
        self.mean, self.scale = loaded.mean, loaded.scale

    def __len__(self) -> int:
        return self.features.shape[0]

    #: ``self[index_tensor]`` is the stacked rows: the datamodule reads whole batches at once
    batched_getitem = True

    def __getitem__(self, i: int) -> Tensor:
        return self.features[i]

    @staticmethod
    def make_transform(
        train: bool, *, feature_dropout: float = 0.0, noise_std: float = 0.0
    ) -> Callable | None:
        """Train-time view augmentation of a ``[D]`` vector; eval (or nothing to do): ``None``.

        ``feature_dropout`` zeroes each feature independently with that probability, without
        rescaling (MulSupCon's view: p = 0.5); ``noise_std`` then adds N(0, std^2) noise.
        """
        if not 0.0 <= float(feature_dropout) < 1.0:
            raise ValueError(f"augment.feature_dropout must be in [0, 1), got {feature_dropout}")
        if float(noise_std) < 0:
            raise ValueError(f"augment.noise_std must be >= 0, got {noise_std}")
        if not train or (feature_dropout == 0 and noise_std == 0):
            return None
        return FeatureAugment(float(feature_dropout), float(noise_std))


class FeatureAugment:
    """Bernoulli feature zeroing with probability ``p`` then additive Gaussian noise; returns a new tensor."""

    #: element-wise: applies to a whole ``[B, D]`` batch as to each row
    batched = True

    def __init__(self, p: float = 0.0, noise_std: float = 0.0) -> None:
        self.p, self.noise_std = p, noise_std

    def __call__(self, x: Tensor) -> Tensor:
        if self.p:
            x = x * (torch.rand_like(x) >= self.p).to(x.dtype)
        if self.noise_std:
            x = x + self.noise_std * torch.randn_like(x)
        return x

    def __repr__(self) -> str:
        return f"FeatureAugment(p={self.p}, noise_std={self.noise_std})"
