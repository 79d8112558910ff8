"""The default head: pooled features -> logits."""

from __future__ import annotations

from torch import Tensor, nn


class LinearHead(nn.Module):
    """``{"features": x [B, F], "logits": Linear(F, C)(dropout(x)) [B, C]}``."""

    def __init__(self, in_features: int, num_classes: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.out_features = in_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"features": x, "logits": self.fc(self.dropout(x))}
