"""2-D pictures of embeddings: a t-SNE scatter per run and a side-by-side grid of several runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from mlcl.diagnostics.geometry import positives

__all__ = ["embedding_grid", "tsne_2d", "tsne_png"]


def subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``n`` rows, drawn without replacement."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def tsne_2d(z: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE of the rows of ``z`` ``[n, D]`` -> ``[n, 2]`` (cosine, PCA init, fixed ``random_state``)."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (z.shape[0] - 1) / 3)))
    return TSNE(
        n_components=2, perplexity=perplexity, init="pca", metric="cosine", random_state=seed
    ).fit_transform(z.astype(np.float32))


def tsne_png(
    z: Tensor,
    labels: Tensor,
    path: Path,
    *,
    color_by: int | str = "label_count",
    class_names: list[str] | None = None,
    max_points: int = 2000,
    seed: int = 0,
    title: str = "",
) -> Path:
    """Save a t-SNE scatter of ``z`` ``[N, D]`` (at most ``max_points`` rows) as PNG ``path``.

    Points are coloured by ``color_by``: ``"label_count"`` (number of positive labels) or a class index
    (positive vs not). Built on a bare matplotlib ``Figure`` (no pyplot state, safe in any thread).
    """
    from matplotlib.figure import Figure

    keep = subsample(z.shape[0], max_points, seed)
    xy = tsne_2d(z.detach().float().cpu().numpy()[keep], seed)
    y = positives(labels.cpu())[keep].numpy()
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    if color_by == "label_count":
        counts = y.sum(1).astype(int)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=counts, cmap="viridis", s=6, linewidths=0)
        fig.colorbar(sc, ax=ax, label="positive labels")
    else:
        c = int(color_by)
        name = class_names[c] if class_names else str(c)
        on = y[:, c] > 0
        ax.scatter(xy[~on, 0], xy[~on, 1], c="lightgray", s=6, linewidths=0, label=f"not {name}")
        ax.scatter(xy[on, 0], xy[on, 1], c="crimson", s=6, linewidths=0, label=name)
        ax.legend(loc="best", markerscale=3, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(keep)} test embeddings", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def embedding_grid(pngs: dict[str, Path], out: Path, columns: int = 4) -> Path:
    """Put the PNGs ``{method name: path}`` side by side (``columns`` per row, titled) into PNG ``out``."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    if not pngs:
        raise ValueError("embedding_grid needs at least one PNG")
    cols = min(columns, len(pngs))
    rows = -(-len(pngs) // cols)
    fig = Figure(figsize=(4 * cols, 4 * rows), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, png) in zip(axes, pngs.items()):
        ax.imshow(imread(str(png)))
        ax.set_title(name, fontsize=12)
    for ax in axes:
        ax.axis("off")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out
