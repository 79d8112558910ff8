"""Heads: map backbone features to the outputs a loss plugin needs.

Every head is built as ``Head(in_features, num_classes, **head_kwargs)``, exposes
``out_features`` (width of its ``"features"``/``"embeddings"`` output, used to size projectors)
and returns a dict with at least ``"logits"`` ``[B, C]``.
"""

from mlcl.models.heads.kernel import KernelHead
from mlcl.models.heads.label_attention import LabelAttentionHead, ProjectionHead
from mlcl.models.heads.linear import LinearHead

HEADS = {
    "linear": LinearHead,
    "kernel": KernelHead,
    "label_attention": LabelAttentionHead,
}

__all__ = ["HEADS", "KernelHead", "LabelAttentionHead", "LinearHead", "ProjectionHead"]
