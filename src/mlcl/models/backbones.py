"""Backbones: any timm model by name, a small CNN for the embedded digits, and an MLP for tabular data.

Every backbone is an ``nn.Module`` with ``num_features`` (F) whose forward returns pooled features
``[B, F]``, or, when built with ``spatial=True``, the last feature map ``[B, F, H, W]`` (CNNs) or
tokens ``[B, N, F]`` (ViT-like timm models). ``pool(feats)`` turns the spatial output into ``[B, F]``.

There is no network at run time: ``pretrained`` is ``None``/``False`` or a local file path; asking for
downloaded weights fails with the config key to set.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

CUSTOM = ("small_cnn", "mlp")


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (two with stride 2): ``[B, C_in, H, W] -> [B, width*4, H/4, W/4]``."""

    def __init__(self, in_chans: int = 1, width: int = 32, spatial: bool = False) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)
            )

        w = width
        self.features = nn.Sequential(
            block(in_chans, w, 1), block(w, 2 * w, 2), block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1)
        )
        self.num_features = 4 * w
        self.spatial = spatial

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        return f if self.spatial else f.mean(dim=(2, 3))


class MLP(nn.Module):
    """Tabular encoder ``[B, in_features] -> [B, widths[-1]]``: Linear, norm, ReLU, dropout per layer."""

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int] = (256, 512, 256),
        dropout: float = 0.2,
        norm: str = "none",
        spatial: bool = False,
    ) -> None:
        super().__init__()
        if spatial:
            raise ValueError(
                "backbone=mlp has no spatial feature map; pick a loss whose head reads pooled features"
            )
        if norm not in ("none", "batch", "layer"):
            raise ValueError(f"backbone.norm must be 'none', 'batch' or 'layer', got {norm!r}")
        layers: list[nn.Module] = []
        prev = int(in_features)
        for w in widths:
            layers.append(nn.Linear(prev, int(w)))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(int(w)))
            elif norm == "layer":
                layers.append(nn.LayerNorm(int(w)))
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
            prev = int(w)
        self.net = nn.Sequential(*layers)
        self.num_features = prev
        self.spatial = False

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class TimmBackbone(nn.Module):
    """A timm model without its classifier: pooled features, or the last feature map when ``spatial``."""

    def __init__(self, model: nn.Module, spatial: bool) -> None:
        super().__init__()
        self.model = model
        self.spatial = spatial
        self.num_features = int(model.num_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.spatial:
            return self.model.forward_features(x)
        return self.model(x)


def pool(feats: Tensor) -> Tensor:
    """Global average of a spatial output: ``[B, F, H, W]`` or tokens ``[B, N, F]`` -> ``[B, F]``."""
    if feats.dim() == 4:
        return feats.mean(dim=(2, 3))
    if feats.dim() == 3:
        return feats.mean(dim=1)
    return feats


def _unknown_name_error(name: str) -> ValueError:
    import timm

    all_names = list(CUSTOM) + timm.list_models()
    close = difflib.get_close_matches(name, all_names, n=8, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown backbone name {name!r}: not one of {', '.join(CUSTOM)} and not a timm model.{hint} "
        "List timm models with `python -c \"import timm; print(timm.list_models('*resnet*'))\"`."
    )


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load local weights non-strictly, dropping classifier keys (``fc``/``head.fc``/``classifier``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"backbone.pretrained={str(path)!r} does not exist. There is no network here: "
            "download the weights "
            "elsewhere, copy them to this machine and set backbone.pretrained=/path/to/weights.pth "
            "(or backbone.pretrained=null to start from random init)."
        )
    state = torch.load(p, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"backbone.pretrained={str(path)!r} does not hold a state dict")
    drop = ("fc.", "head.fc.", "classifier.", "head.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(drop)]
    if len(missing) > 0.5 * len(list(model.state_dict())):
        raise ValueError(
            f"backbone.pretrained={str(path)!r}: {len(missing)} of the model's tensors "
            "are missing from the file "
            f"(e.g. {missing[:3]}); is it a checkpoint of a different architecture?"
        )
    log.info("loaded %s: %d missing, %d unexpected keys", p, len(missing), len(result.unexpected_keys))


def build_backbone(
    name: str,
    *,
    pretrained: str | bool | None = None,
    in_chans: int = 3,
    in_features: int | None = None,
    spatial: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a backbone by name (``small_cnn``, ``mlp`` or any timm model name).

    Args:
        name: backbone name.
        pretrained: local path of weights, or None/False.
        in_chans: image channels (image backbones).
        in_features: input width (``mlp`` only; filled from the data).
        spatial: return the feature map instead of pooled features.
        **kwargs: passed to the backbone constructor (e.g. ``width``, ``widths``, ``drop_rate``).
    """
    if pretrained is True:
        raise ValueError(
            "backbone.pretrained=true would download weights, and there is no network here. Set "
            "backbone.pretrained=/path/to/weights.pth (a local file), or backbone.pretrained=null."
        )
    if name == "small_cnn":
        net: nn.Module = SmallCNN(in_chans=in_chans, spatial=spatial, **kwargs)
    elif name == "mlp":
        if in_features is None:
            raise ValueError("backbone=mlp needs the input width; use it with data=arrays (vector inputs)")
        net = MLP(in_features, spatial=spatial, **kwargs)
    else:
        import timm

        if not timm.is_model(name):
            raise _unknown_name_error(name)
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            in_chans=in_chans,
            global_pool="" if spatial else "avg",
            **kwargs,
        )
        net = TimmBackbone(model, spatial)
        if pretrained:
            load_pretrained(model, pretrained)
        return net
    if pretrained:
        load_pretrained(net, pretrained)
    return net
