"""MulCon's label-level embedding module and projection head (spec mulcon.md §3–§5, §17.2–§17.4).

``LabelAttentionHead`` turns backbone tokens ``[B, N, D_in]`` (or a map ``[B, D_in, H, W]``) into one
embedding per (image, label) ``[B, C, E]`` plus per-label logits ``[B, C]``:

    tokens -> pixel self-attention blocks (width D_in) -> cross block (C learned label queries attend to
    the tokens, width E) -> label self-attention blocks (width E) -> per-label linear classifier.

The attention block is the Set-Transformer-style block of the reference, written by hand because
``nn.MultiheadAttention`` differs in scale, residual and projections: heads are contiguous column slices,
scores are scaled by 1/sqrt(full width), the residual adds the *projected* query, then post-LayerNorm and a
one-layer ReLU feed-forward inside a residual. No positional encoding: tokens are an unordered set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionBlock",
    "LabelAttentionHead",
    "ProjectionHead",
    "convert_reference_projector",
    "convert_reference_state_dict",
]

_INIT_STD = 0.02  # reference init_net("normal", gain 0.02) for every Linear
_LN_EPS = 1e-5


def _init_linear(layer: nn.Linear) -> None:
    nn.init.normal_(layer.weight, mean=0.0, std=_INIT_STD)
    nn.init.zeros_(layer.bias)


class AttentionBlock(nn.Module):
    """AB(X_q, X_kv) of spec §3.1 with width ``width`` and ``num_heads`` contiguous heads.

    ``forward(x_q [B, N_q, d_q] or [N_q, d_q] (shared by the batch), x_kv [B, N_kv, d_kv])`` returns
    ``(O [B, N_q, width], A [B, h, N_q, N_kv] or None)``; ``A`` is computed only with ``need_weights``.
    """

    def __init__(
        self, query_dim: int, kv_dim: int, width: int, num_heads: int, layer_norm: bool = True
    ) -> None:
        super().__init__()
        if width % num_heads != 0:
            raise ValueError(f"attention width {width} is not divisible by num_heads={num_heads}")
        self.width = width
        self.num_heads = num_heads
        # The reference (Set Transformer code) scales by the full width, not the head width (§13 Q4).
        self.scale = 1.0 / math.sqrt(width)
        self.fc_q = nn.Linear(query_dim, width)
        self.fc_k = nn.Linear(kv_dim, width)
        self.fc_v = nn.Linear(kv_dim, width)
        self.fc_o = nn.Linear(width, width)
        # Identity carries no parameters, so the ln0/ln1 keys are absent without layer norm (§17.2).
        self.ln0: nn.Module = nn.LayerNorm(width, eps=_LN_EPS) if layer_norm else nn.Identity()
        self.ln1: nn.Module = nn.LayerNorm(width, eps=_LN_EPS) if layer_norm else nn.Identity()

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.width // self.num_heads).transpose(1, 2)

    def forward(self, x_q: Tensor, x_kv: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        batch = x_kv.shape[0]
        q = self.fc_q(x_q)
        if q.dim() == 2:  # queries shared by every image: project once, then broadcast
            q = q.unsqueeze(0).expand(batch, -1, -1)
        qh = self._split_heads(q)
        kh = self._split_heads(self.fc_k(x_kv))
        vh = self._split_heads(self.fc_v(x_kv))
        if need_weights:
            attn = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * self.scale, dim=-1)
            mixed = torch.matmul(attn, vh)
        else:
            attn = None
            mixed = F.scaled_dot_product_attention(qh, kh, vh, scale=self.scale)
        out = (qh + mixed).transpose(1, 2).reshape(batch, q.shape[1], self.width)
        out = self.ln0(out)
        out = self.ln1(out + F.relu(self.fc_o(out)))
        return out, attn


class LabelAttentionHead(nn.Module):
    """Label-level embeddings and per-label logits from backbone tokens (spec §17.2).

    ``forward(features)`` takes tokens ``[B, N, in_channels]`` or a map ``[B, in_channels, H, W]`` (flattened
    row-major, token n = W·row + col) and returns ``{"embeddings": [B, C, embed_dim], "logits": [B, C],
    "attention": [B, num_heads, C, N]}`` (the cross block's label-to-token softmax weights).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        embed_dim: int = 1024,
        num_heads: int = 4,
        num_pixel_blocks: int = 2,
        num_label_blocks: int = 1,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if in_channels % num_heads != 0:
            raise ValueError(f"in_channels={in_channels} must be divisible by num_heads={num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_pixel_blocks < 0 or num_label_blocks < 0:
            raise ValueError("num_pixel_blocks and num_label_blocks must be >= 0")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.out_features = embed_dim
        self.label_queries = nn.Parameter(torch.empty(num_classes, embed_dim))
        self.pixel_blocks = nn.ModuleList(
            AttentionBlock(in_channels, in_channels, in_channels, num_heads, layer_norm)
            for _ in range(num_pixel_blocks)
        )
        self.cross_block = AttentionBlock(embed_dim, in_channels, embed_dim, num_heads, layer_norm)
        self.label_blocks = nn.ModuleList(
            AttentionBlock(embed_dim, embed_dim, embed_dim, num_heads, layer_norm)
            for _ in range(num_label_blocks)
        )
        # One independent Linear(E, 1) per label, stored as a [C, E] matrix and a [C] bias (§4); it is applied
        # per label in forward, never as a plain Linear.
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init (§3.3): Linear N(0, 0.02²) / bias 0, LayerNorm 1/0, queries Xavier-uniform."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Xavier on the reference's [1, C, E] tensor: fan_in = C·E, fan_out = E.
        bound = math.sqrt(6.0 / ((self.num_classes + 1) * self.embed_dim))
        nn.init.uniform_(self.label_queries, -bound, bound)

    def tokens(self, features: Tensor) -> Tensor:
        """Tokens ``[B, N, in_channels]`` from tokens or a map ``[B, in_channels, H, W]`` (row-major)."""
        if features.dim() == 4:
            if features.shape[1] != self.in_channels:
                raise ValueError(
                    f"features map has {features.shape[1]} channels, the head expects {self.in_channels}"
                )
            return features.flatten(2).transpose(1, 2)
        if features.dim() == 3:
            if features.shape[2] != self.in_channels:
                raise ValueError(
                    f"features tokens have width {features.shape[2]}, the head expects {self.in_channels}"
                )
            return features
        raise ValueError(
            f"features must be [B, N, D] tokens or a [B, D, H, W] map, got shape {tuple(features.shape)}"
        )

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        x = self.tokens(features)
        if x.shape[1] < 1:
            raise ValueError("features must contain at least one token")
        for block in self.pixel_blocks:
            x, _ = block(x, x)
        h, attn = self.cross_block(self.label_queries, x, need_weights=True)
        for block in self.label_blocks:
            h, _ = block(h, h)
        logits = torch.einsum("bce,ce->bc", h, self.classifier.weight) + self.classifier.bias
        return {"embeddings": h, "logits": logits, "attention": attn}

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, embed_dim={self.embed_dim}, "
            f"num_heads={self.num_heads}"
        )


class ProjectionHead(nn.Module):
    """MulCon projector g (spec §5, §17.3): ``fc1 -> ReLU -> fc2`` on ``[..., in_dim]``, no normalisation."""

    def __init__(self, in_dim: int = 1024, hidden_dim: int = 1024, out_dim: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_linear(self.fc1)
        _init_linear(self.fc2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


# ---------------------------------------------------------------------------------------------------------
# Reference checkpoints (SonDaoDuy/MulCon, §17.4)

_REFERENCE_BLOCKS = (
    ("sab1.mab.", "pixel_blocks.0."),
    ("sab2.mab.", "pixel_blocks.1."),
    ("sab3.mab.", "label_blocks.0."),
    ("mab.", "cross_block."),
)


def _strip_module(key: str) -> str:
    # The reference wraps every network in DataParallel, so saved keys may start with "module.".
    return key[len("module.") :] if key.startswith("module.") else key


def convert_reference_state_dict(
    net_a: Mapping[str, Tensor], classifiers: Sequence[Mapping[str, Tensor]], *, prefix: str = ""
) -> dict[str, Tensor]:
    """Map a reference label module (``net_A``) and its C classifiers (``net_C_0 … net_C_{C-1}``, in order)
    to ``LabelAttentionHead`` keys (prefixed with ``prefix``, e.g. ``"head."``) for strict loading.

    ``I [1, C, E]`` becomes ``label_queries [C, E]``; ``sab1/sab2.mab.*`` the pixel blocks, ``mab.*`` the
    cross block, ``sab3.mab.*`` the label block; classifier i's ``weight [1, E]`` / ``bias [1]`` become row i
    of ``classifier.weight`` / ``classifier.bias``. Unknown keys raise ``ValueError``.
    """
    out: dict[str, Tensor] = {}
    for raw_key, value in net_a.items():
        key = _strip_module(raw_key)
        if key == "I":
            out[prefix + "label_queries"] = value.reshape(value.shape[-2], value.shape[-1]).clone()
            continue
        for ref_prefix, our_prefix in _REFERENCE_BLOCKS:
            if key.startswith(ref_prefix):
                out[prefix + our_prefix + key[len(ref_prefix) :]] = value.clone()
                break
        else:
            raise ValueError(f"unexpected key {raw_key!r} in the reference label module (net_A)")
    if classifiers:
        weights, biases = [], []
        for i, state in enumerate(classifiers):
            state = {_strip_module(k): v for k, v in state.items()}
            if set(state) != {"weight", "bias"}:
                raise ValueError(
                    f"reference classifier net_C_{i} must hold 'weight' and 'bias', got {sorted(state)}"
                )
            weights.append(state["weight"].reshape(-1))
            biases.append(state["bias"].reshape(()))
        out[prefix + "classifier.weight"] = torch.stack(weights)
        out[prefix + "classifier.bias"] = torch.stack(biases)
    return out


def convert_reference_projector(net_p: Mapping[str, Tensor], *, prefix: str = "") -> dict[str, Tensor]:
    """Map a reference projector ``net_P`` (``nn.Sequential``: ``0.*`` Linear, ``2.*`` Linear) to
    ``ProjectionHead`` keys ``fc1.*`` / ``fc2.*`` (prefixed with ``prefix``)."""
    names = {"0": "fc1", "2": "fc2"}
    out: dict[str, Tensor] = {}
    for raw_key, value in net_p.items():
        index, _, param = _strip_module(raw_key).partition(".")
        if index not in names or param not in ("weight", "bias"):
            raise ValueError(f"unexpected key {raw_key!r} in the reference projector (net_P)")
        out[f"{prefix}{names[index]}.{param}"] = value.clone()
    return out
