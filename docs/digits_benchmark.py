"""Draw docs/digits_benchmark.png: samples of the default benchmark (data=digits) and its label structure.

Run from the repository root:  PYTHONPATH=src python docs/digits_benchmark.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from mlcl.data.datasets.digit_scenes import DigitScenes

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path = ROOT / "docs" / "digits_benchmark.png") -> None:
    """Render 16 test images with their label sets, the train class frequencies and the label lift."""
    knobs = OmegaConf.to_container(OmegaConf.load(ROOT / "src/mlcl/conf/data/digits.yaml").source)
    knobs = {k: v for k, v in knobs.items() if k not in ("_target_", "_partial_")}
    test = DigitScenes("test", **knobs)
    train = DigitScenes("train", **knobs)
    y = train.targets.double().numpy()

    fig = Figure(figsize=(13, 5.6), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.5, 1])
    axes = left.subplots(3, 6)
    for i, ax in enumerate(axes.flat):
        ax.imshow(test.images[i, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
        labels = " ".join(str(c) for c in np.flatnonzero(test.targets[i].numpy()))
        ax.set_title(f"{{{labels}}}  s{test.scene[i]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    left.suptitle(
        "test images: label set {digits} and latent scene s (clutter and half digits carry no label)"
    )

    ax_freq, ax_lift = right.subplots(2, 1, height_ratios=[1, 1.5])
    ax_freq.bar(np.arange(10), 100 * y.mean(0), color="tab:blue")
    ax_freq.set_xticks(range(10))
    ax_freq.set_xlabel("digit")
    ax_freq.set_ylabel("% of train images")
    ax_freq.set_title(f"long tail ({len(y)} train images, {y.sum(1).mean():.2f} labels per image)")
    lift = (y.T @ y / len(y)) / np.outer(y.mean(0), y.mean(0))
    np.fill_diagonal(lift, np.nan)
    im = ax_lift.imshow(np.log2(lift), cmap="RdBu_r", vmin=-3, vmax=3)
    ax_lift.set_xticks(range(10))
    ax_lift.set_yticks(range(10))
    ax_lift.set_title("co-occurrence: log2 P(c,d) / (P(c) P(d))")
    right.colorbar(im, ax=ax_lift, shrink=0.8)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
