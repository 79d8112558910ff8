"""KMCL kernel head: embedding -> logits plus one diagonal Gaussian kernel per class (spec kmcl.md §3)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["KernelHead", "convert_reference_state_dict"]

_VAR_MODES = ("per_class", "shared_dim", "shared_scalar")


class KernelHead(nn.Module):
    """``x [B, in_features]`` -> ``{"features" [B, D], "logits" [B, C], "mu", "var"}``.

    ``mu``/``var`` are ``[B, C, D]`` (anisotropic) or ``[B, C]`` (isotropic); ``var = ELU(.) + var_offset``
    (> 1 for the default offset). ``embed_dim`` adds a linear projection ``proj`` to D = ``embed_dim``
    (None: D = ``in_features``). The anisotropic ``mean``/``var`` layers keep the reference layout
    (output unit ``d * C + c`` is dim d of class c), so reference checkpoints load unpermuted.
    ``var_mode``: ``per_class`` (reference "BC"), ``shared_dim`` (one variance per dim, "MKS",
    anisotropic only) or ``shared_scalar`` (one per image, "RBF"); shared variances are broadcast views.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        embed_dim: int | None = 128,
        *,
        loss_case: str = "anisotropic",
        var_mode: str = "per_class",
        var_offset: float = 1e-7 + 1 + 1,
        init: str = "reference",
    ) -> None:
        super().__init__()
        if loss_case not in ("anisotropic", "isotropic"):
            raise ValueError(f"loss_case must be 'anisotropic' or 'isotropic', got {loss_case!r}")
        if var_mode not in _VAR_MODES:
            raise ValueError(f"var_mode must be one of {_VAR_MODES}, got {var_mode!r}")
        if var_mode == "shared_dim" and loss_case == "isotropic":
            raise ValueError(
                "var_mode='shared_dim' needs loss_case='anisotropic' (isotropic kernels have no dims)"
            )
        if init not in ("reference", "default"):
            raise ValueError(f"init must be 'reference' or 'default', got {init!r}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.loss_case = loss_case
        self.var_mode = var_mode
        self.var_offset = float(var_offset)
        self.isotropic = loss_case == "isotropic"
        dim = self.in_features if embed_dim is None else int(embed_dim)
        #: D, the width of ``features`` and the dim of the kernels
        self.out_features = dim
        # a plain None attribute adds no state-dict key, as for the reference isotropic model
        self.proj = nn.Linear(self.in_features, dim) if embed_dim is not None else None
        self.pi = nn.Linear(dim, self.num_classes)
        per_class = self.num_classes if self.isotropic else self.num_classes * dim
        self.mean = nn.Linear(dim, per_class)
        var_out = {"per_class": per_class, "shared_dim": dim, "shared_scalar": 1}[var_mode]
        self.var = nn.Linear(dim, var_out)
        if init == "reference":
            self.reset_kernel_parameters()

    def reset_kernel_parameters(self) -> None:
        """Reference init: ``mean.weight ~ U(0, 0.1)``, ``var.weight = 1``, both biases 0."""
        nn.init.uniform_(self.mean.weight, 0.0, 0.1)
        nn.init.zeros_(self.mean.bias)
        nn.init.ones_(self.var.weight)
        nn.init.zeros_(self.var.bias)

    def _per_class(self, out: Tensor) -> Tensor:
        """``[B, C*D]`` in the reference's (d, c) order -> ``[B, C, D]``; isotropic ``[B, C]`` unchanged."""
        if self.isotropic:
            return out
        return out.view(out.shape[0], self.out_features, self.num_classes).transpose(1, 2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        e = self.proj(x) if self.proj is not None else x
        mu = self._per_class(self.mean(e))
        v = F.elu(self.var(e)) + self.var_offset
        if self.var_mode == "per_class":
            var = self._per_class(v)
        elif self.var_mode == "shared_dim":  # v: [B, D] -> var[b, c, d] = v[b, d]
            var = v[:, None, :].expand_as(mu)
        else:  # v: [B, 1] -> var[b, c(, d)] = v[b]
            var = (v if self.isotropic else v[:, :, None]).expand_as(mu)
        return {"features": e, "logits": self.pi(e), "mu": mu, "var": var}

    def extra_repr(self) -> str:
        return f"loss_case={self.loss_case}, var_mode={self.var_mode}, D={self.out_features}"


def convert_reference_state_dict(
    state_dict: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a reference KMCL checkpoint into ``(head_state, backbone_state)``.

    ``downsampler.weight [E, F, 1]`` -> ``proj.weight [E, F]``, ``downsampler.bias`` -> ``proj.bias``,
    ``kmm.{pi,mean,var}.*`` -> ``{pi,mean,var}.*``, ``encoder.*`` -> backbone (prefix stripped). A leading
    ``module.`` (DDP / EMA wrappers) is removed first. Other keys raise ``KeyError``.
    The head state loads into ``KernelHead`` with ``strict=True``.
    """
    head: dict[str, Tensor] = {}
    backbone: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name.startswith("downsampler."):
            leaf = name[len("downsampler.") :]
            # Conv1d(F, E, 1) weight [E, F, 1] is the Linear weight [E, F]
            head[f"proj.{leaf}"] = value.squeeze(-1) if leaf == "weight" and value.ndim == 3 else value
        elif name.startswith("kmm."):
            head[name[len("kmm.") :]] = value
        elif name.startswith("encoder."):
            backbone[name[len("encoder.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"keys not in a reference KMCL checkpoint (encoder/downsampler/kmm): {unknown[:5]}")
    return head, backbone
