"""Embed the data with a trained :class:`MLCLModule` and compute every representation diagnostic.

``run_diagnostics`` is the single entry point used by ``mlcl-train`` (after testing) and ``mlcl-eval``
when ``diagnostics=embeddings`` is chosen; its flat ``{name: float}`` result is stored under
``representation`` in ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mlcl.diagnostics.geometry import alignment_uniformity, label_alignment_uniformity
from mlcl.diagnostics.plot import subsample, tsne_png
from mlcl.diagnostics.probe import linear_probe_map
from mlcl.diagnostics.retrieval import label_retrieval_ap, retrieval_scores
from mlcl.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["Embeddings", "extract", "representation_metrics", "run_diagnostics"]


@dataclass
class Embeddings:
    """Embeddings of one split: ``features`` ``[N, F]``, ``labels`` ``[N, C]`` and, for heads with
    label-level outputs, ``label_level`` ``[N, C, E]`` (MulCon's label embeddings, KMCL's class means)."""

    features: Tensor
    labels: Tensor
    label_level: Tensor | None = None


@torch.no_grad()
def extract(module: Any, loader: DataLoader, device: torch.device | str = "cpu") -> Embeddings:
    """Run ``module.backbone`` + ``module.head`` over ``loader`` (eval mode, restored afterwards).

    The sample embedding is the head's ``"features"`` when it has one (the representation the
    contrastive losses shape), else the pooled backbone features (``module.encode``). Label-level
    embeddings are the head's ``"embeddings"`` ``[B, C, E]`` or anisotropic ``"mu"`` ``[B, C, D]``.
    """
    from mlcl.models.backbones import pool

    was_training = module.training
    module.eval()
    feats, labels, label_level = [], [], []
    try:
        for batch in loader:
            fmap = module.backbone(batch["input"].to(device))
            out = module.head(fmap)
            f = out.get("features")
            feats.append((f if f is not None else pool(fmap)).float().cpu())
            labels.append(batch["target"].cpu())
            lv = out.get("embeddings", out.get("mu"))
            if lv is not None and lv.dim() == 3:
                label_level.append(lv.float().cpu())
    finally:
        module.train(was_training)
    return Embeddings(torch.cat(feats), torch.cat(labels), torch.cat(label_level) if label_level else None)


def representation_metrics(
    emb: Embeddings,
    train: Embeddings | None = None,
    *,
    k: int = 10,
    alpha: float = 2.0,
    t: float = 2.0,
    probe_reg: float = 1e-3,
    label_max_rows: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """All diagnostics of one split as a flat dict (alignment / uniformity raw, retrieval and probe in %).

    Keys: ``alignment``, ``uniformity``, ``retrieval_wAP``, ``retrieval_wAP@k``, ``retrieval_nDCG@k``,
    ``probe_mAP`` (when ``train`` is given) and, with label-level embeddings (on at most
    ``label_max_rows`` rows), ``label_alignment``, ``label_uniformity``, ``label_retrieval_AP`` (means
    over labels that have a value).
    """
    z, y = emb.features.to(device), emb.labels.to(device)
    align, unif = alignment_uniformity(z, y, alpha, t)
    out = {"alignment": align, "uniformity": unif}
    out.update({f"retrieval_{key}": v for key, v in retrieval_scores(z, y, (k,)).items()})
    if train is not None:
        out["probe_mAP"] = linear_probe_map(
            train.features.to(device), train.labels.to(device), z, y, probe_reg
        )
    if emb.label_level is not None:
        keep = torch.from_numpy(subsample(z.shape[0], label_max_rows, seed))
        e, ye = emb.label_level[keep].to(device), emb.labels[keep].to(device)
        align, unif = label_alignment_uniformity(e, ye, alpha, t)
        for name, per_label in (
            ("label_alignment", align),
            ("label_uniformity", unif),
            ("label_retrieval_AP", label_retrieval_ap(e, ye)),
        ):
            finite = per_label[torch.isfinite(per_label)]
            out[name] = float(finite.mean()) if finite.numel() else math.nan
    return out


@contextmanager
def evaluated_weights(module: Any) -> Iterator[None]:
    """Within the block the module holds the weights its test metrics were computed with.

    An EMA callback (``mlcl.callbacks.EMA``) of the module's last trainer swaps its averaged weights in
    for testing and back out afterwards; the diagnostics swap them in the same way so they describe the
    model that was tested. Without such a callback nothing changes.
    """
    trainer = getattr(module, "_trainer", None)
    swaps = [cb for cb in getattr(trainer, "callbacks", None) or [] if hasattr(cb, "_swap_in")]
    for cb in swaps:
        cb._swap_in(module)
    try:
        yield
    finally:
        for cb in swaps:
            cb._swap_out(module)


def _loader(dm: Any, split: str, labels: str = "full", max_rows: int = 0, seed: int = 0) -> DataLoader:
    """An eval-mode loader over ``split`` (train: eval transform, one view, ``labels`` full|observed,
    at most ``max_rows`` rows drawn at random when > 0)."""
    from torch.utils.data import Subset

    from mlcl.data.datamodule import LabeledSplit

    ds = dm.splits[split]
    if split == "train":
        if labels not in ("full", "observed"):
            raise UserError(
                f"diagnostics.probe_labels={labels!r}", "diagnostics.probe_labels", "use full or observed"
            )
        targets = ds.source.targets.long() if labels == "full" else ds.targets
        ds = LabeledSplit(ds.source, targets, dm.splits["test"].transform, num_views=1)
    if max_rows > 0 and len(ds) > max_rows:
        ds = Subset(ds, subsample(len(ds), max_rows, seed).tolist())
    return DataLoader(ds, batch_size=dm.eval_batch_size, shuffle=False, num_workers=dm.num_workers)


def _color_by(value: Any, num_classes: int) -> int | str:
    if value == "label_count":
        return value
    try:
        c = int(value)
    except (TypeError, ValueError):
        c = -1
    if not 0 <= c < num_classes:
        raise UserError(
            f"diagnostics.color_by={value!r} is neither 'label_count' nor a class index",
            "diagnostics.color_by",
            f"use label_count or an integer in 0..{num_classes - 1}",
        )
    return c


def _log(loggers: list[Any], metrics: dict[str, float], pngs: dict[str, Path]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        lg.log_metrics({f"representation/{k}": v for k, v in metrics.items()})
        if isinstance(lg, WandbLogger):
            for split, png in pngs.items():
                lg.log_image(key=f"representation/embeddings_{split}", images=[str(png)])
        lg.save()


def run_diagnostics(
    cfg: Any, module: Any, datamodule: Any, run_dir: Path, loggers: list[Any] | None = None
) -> dict[str, float]:
    """Embed the configured splits, compute the diagnostics, save ``embeddings.png`` and log everything.

    ``cfg.diagnostics`` holds the knobs (``conf/diagnostics/embeddings.yaml``). Metrics of the test split
    are named plainly (``alignment``), others are prefixed (``val.alignment``); non-finite values are
    dropped. Returns the flat dict stored under ``representation`` in ``metrics.json``.
    """
    d = cfg.diagnostics
    start = time.time()
    name = d.get("device", "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    splits = list(d.get("splits", ["test"]))
    if not splits or any(s not in ("val", "test") for s in splits):
        raise UserError(
            f"diagnostics.splits={splits} is not a list of val/test", "diagnostics.splits", "e.g. [test]"
        )
    datamodule.setup("test")
    color_by = _color_by(d.get("color_by", "label_count"), datamodule.num_classes)
    original = next(module.parameters()).device
    module.to(device)
    try:
        with evaluated_weights(module):
            train = None
            if d.get("probe", True):
                loader = _loader(
                    datamodule,
                    "train",
                    d.get("probe_labels", "full"),
                    int(d.get("probe_max_train") or 0),
                    int(d.get("seed", 0)),
                )
                train = extract(module, loader, device)
            embs = {split: extract(module, _loader(datamodule, split), device) for split in splits}
    finally:
        module.to(original)
    metrics: dict[str, float] = {}
    pngs: dict[str, Path] = {}
    for split, emb in embs.items():
        values = representation_metrics(
            emb,
            train,
            k=int(d.get("k", 10)),
            alpha=float(d.get("alpha", 2.0)),
            t=float(d.get("t", 2.0)),
            probe_reg=float(d.get("probe_reg", 1e-3)),
            label_max_rows=int(d.get("label_max_rows", 1000)),
            seed=int(d.get("seed", 0)),
            device=device,
        )
        prefix = "" if split == "test" else f"{split}."
        metrics.update({prefix + k: v for k, v in values.items()})
        if int(d.get("max_points", 2000)) > 0:
            name = "embeddings.png" if split == "test" else f"embeddings_{split}.png"
            pngs[split] = tsne_png(
                emb.features,
                emb.labels,
                Path(run_dir) / name,
                color_by=color_by,
                class_names=getattr(datamodule, "class_names", None),
                max_points=int(d.get("max_points", 2000)),
                seed=int(d.get("seed", 0)),
                title=f"{cfg.get('loss_name') or ''} ({split})".strip(),
            )
    dropped = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if dropped:
        log.warning("representation diagnostics without a value (too few positives?): %s", dropped)
    metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    _log(loggers or [], metrics, pngs)
    log.info("representation diagnostics in %.1fs: %s", time.time() - start, metrics)
    return metrics
