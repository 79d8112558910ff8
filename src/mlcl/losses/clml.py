"""CLML: nuclear-norm label-structure loss with batch-wise label correction (spec: clml.md).

CLML (Ma et al., arXiv 2209.01314) adds to an ordinary multi-label classification loss

    λ/B · ( Σ_c max(‖X_c‖_*, δ) − ‖X‖_* )

where X [B, D] are the pooled backbone features, X_c the rows whose (corrected) label c is positive and
‖·‖_* the nuclear norm (sum of all singular values). Before the groups are formed, entries the model
already predicts with σ(logit) > τ become positives (from epoch ``change_epoch`` on). The gradient is the
OLÉ subgradient U_keep V_keepᵀ (singular triplets with s ≥ ε only), multiplied by the upstream gradient
(the reference forgets that factor, quirk Q1 of the spec).

Fast path ("reduced"): one thin SVD X = U S Vh gives the global term and the reduced rows Y = U S [B, k],
k = min(B, D). Because Vh has orthonormal rows, X_c = Y_c Vh has the singular values of Y_c and
G(X_c) = G(Y_c) Vh, so every per-label SVD runs on k (= B ≪ D) columns and a single [B, k] @ [k, D] matmul
in backward maps all subgradients back. The per-label SVDs are batched by group size (zero-padded rows
change neither the singular values nor the kept U Vᵀ rows of the real members). ``method="svd"`` is the
plain per-label loop of the reference (one full-width SVD per non-empty label), kept for verification.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mlcl.config.params import Dict, Float, Int, Str
from mlcl.losses.base import LossContext, LossPlugin, get_loss_class, register_loss

__all__ = ["CLML", "clml_loss", "correct_labels", "plugin_hooks"]


def correct_labels(logits: Tensor, targets: Tensor, *, tau: float) -> Tensor:
    """Label correction: 1 where σ(logits) > τ (strict), ``targets`` elsewhere.

    logits [B, C] float, targets [B, C] in {1, 0, -1} -> int64 [B, C]. No gradient, inputs untouched;
    the epoch gate is applied by the caller (:func:`clml_loss`).
    """
    with torch.no_grad():
        z = logits.detach()
        if z.dtype not in (torch.float32, torch.float64):
            z = z.float()
        promote = torch.sigmoid(z) > tau
        return torch.where(promote, torch.ones_like(targets, dtype=torch.long), targets.long())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # linalg.svd has no Half/BFloat16 kernels; everything below float64 is computed in float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cut(s: Tensor, eig_thd: float, n: int, dim: int) -> Tensor:
    """Singular-value cut per matrix (``s`` [..., r] -> [..., 1]).

    Float64 uses the absolute ε of the reference. Lower precision uses ε_eff = max(ε, s_max·max(n, D)·eps)
    (spec Q8) because rounding lifts the null-space singular values of rank-deficient groups above ε.
    """
    thr = torch.full_like(s[..., :1], eig_thd)
    if s.dtype != torch.float64:
        s_max = s.amax(dim=-1, keepdim=True) if s.shape[-1] else thr
        thr = torch.maximum(thr, s_max * (max(n, dim) * torch.finfo(s.dtype).eps))
    return thr


def _subgradient(u: Tensor, s: Tensor, vh: Tensor, thr: Tensor) -> Tensor:
    """U_keep V_keepᵀ of (batched) thin SVD factors, keeping the triplets with s ≥ thr."""
    keep = (s >= thr).to(u.dtype)
    return (u * keep.unsqueeze(-2)) @ vh


def _size_buckets(n_max: int) -> list[tuple[int, int]]:
    """Group-size ranges (lo, hi], each padded to hi rows: (0, 1], (1, 2], (2, 4], ... covering n_max."""
    buckets = [(0, 1)]
    lo, hi = 1, 2
    while lo < n_max:
        buckets.append((lo, hi))
        lo, hi = hi, 2 * hi
    return buckets


def _local_reduced(y: Tensor, pos: Tensor, delta: float, eig_thd: float, dim: int, grad: bool):
    """Σ_c ℓ_c and its subgradient in reduced coordinates.

    y [B, k] reduced rows, pos [B, C] bool -> (local_sum 0-dim, g [B, k] or None). ``dim`` is the
    original feature width (for the low-precision cut).
    """
    b, k = y.shape
    counts = pos.sum(0)
    nonempty = counts > 0
    n_empty = int((~nonempty).sum())
    total = y.new_tensor(float(delta) * n_empty)
    g = y.new_zeros((b + 1, k)) if grad else None
    if not bool(nonempty.any()):
        return total, (g[:b] if grad else None)

    # members of every non-empty label, padded with row index b (an appended zero row)
    sizes = counts[nonempty]
    pos_ne = pos[:, nonempty]
    lab, row = pos_ne.t().nonzero(as_tuple=True)  # label-major, rows ascending
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(lab.numel(), device=y.device) - starts[lab]
    n_max = int(sizes.max())
    members = torch.full((sizes.numel(), n_max), b, dtype=torch.long, device=y.device)
    members[lab, slot] = row
    y_pad = torch.cat([y, y.new_zeros((1, k))])

    for lo, hi in _size_buckets(n_max):
        sel = (sizes > lo) & (sizes <= hi)
        if not bool(sel.any()):
            continue
        idx = members[sel][:, : min(hi, n_max)]
        if hi == 1:
            # single-member groups: ‖x‖ and x/‖x‖ without an SVD
            yi = y_pad[idx[:, 0]]
            s = torch.linalg.vector_norm(yi, dim=-1)
            active = s > delta
            total = total + torch.where(active, s, torch.full_like(s, delta)).sum()
            if grad:
                thr = _cut(s.unsqueeze(-1), eig_thd, 1, dim).squeeze(-1)
                w = torch.where(active & (s >= thr), 1.0 / s, torch.zeros_like(s))
                g.index_add_(0, idx[:, 0], yi * w.unsqueeze(-1))
            continue
        yb = y_pad[idx]  # [L, m, k]
        if grad:
            u, s, vh = torch.linalg.svd(yb, full_matrices=False)
        else:
            s = torch.linalg.svdvals(yb)
        nuc = s.sum(-1)
        active = nuc > delta
        total = total + torch.where(active, nuc, torch.full_like(nuc, delta)).sum()
        if grad:
            gb = _subgradient(u, s, vh, _cut(s, eig_thd, idx.shape[1], dim))
            gb = gb * active.to(gb.dtype)[:, None, None]
            g.index_add_(0, idx.reshape(-1), gb.reshape(-1, k))
    return total, (g[:b] if grad else None)


def _local_svd_loop(x: Tensor, pos: Tensor, delta: float, eig_thd: float, grad: bool):
    """Reference-style Σ_c ℓ_c: one full-width SVD per non-empty label (x [B, D]) -> (sum, g [B, D])."""
    b, d = x.shape
    counts = pos.sum(0)
    total = x.new_tensor(float(delta) * int((counts == 0).sum()))
    g = torch.zeros_like(x) if grad else None
    for c in torch.nonzero(counts).flatten().tolist():
        rows = torch.nonzero(pos[:, c]).flatten()
        u, s, vh = torch.linalg.svd(x[rows], full_matrices=False)
        nuc = s.sum()
        if bool(nuc > delta):
            total = total + nuc
            if grad:
                g.index_add_(0, rows, _subgradient(u, s, vh, _cut(s, eig_thd, rows.numel(), d)))
        else:
            total = total + delta
    return total, g


class _NuclearTerms(torch.autograd.Function):
    """(Σ_c max(‖X_c‖_*, δ), ‖X‖_*) with the ε-cut subgradients, scaled by the upstream gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, pos: Tensor, delta: float, eig_thd: float, method: str):  # type: ignore[override]
        grad = bool(ctx.needs_input_grad[0])
        b, d = x.shape
        if method == "reduced":
            # X = Rᵀ Qᵀ with orthonormal Q [D, B]: X and every row subset X_c keep their singular values
            # and U Vᵀ (times Qᵀ) when Qᵀ is dropped, so all SVDs run on B columns instead of D
            q, r = torch.linalg.qr(x.t()) if d > b else (None, None)
            y = r.t() if q is not None else x
            u, s, vh = torch.linalg.svd(y, full_matrices=False)
            global_nuc = s.sum()
            local_sum, g_local = _local_reduced(y, pos, delta, eig_thd, d, grad)
            if grad:
                g_global = _subgradient(u, s, vh, _cut(s, eig_thd, b, d))
                ctx.save_for_backward(g_local, g_global, q)
        elif method == "svd":
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
            global_nuc = s.sum()
            g_global = _subgradient(u, s, vh, _cut(s, eig_thd, b, d)) if grad else None
            local_sum, g_local = _local_svd_loop(x, pos, delta, eig_thd, grad)
            if grad:
                ctx.save_for_backward(g_local, g_global, None)
        else:
            raise ValueError(f"unknown method {method!r}; expected 'reduced' or 'svd'")
        return local_sum, global_nuc

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_local: Tensor, grad_global: Tensor):  # type: ignore[override]
        g_local, g_global, q = ctx.saved_tensors
        g = grad_local * g_local + grad_global * g_global
        if q is not None:
            g = g @ q.t()
        return g, None, None, None, None


def clml_loss(
    features: Tensor,
    logits: Tensor,
    targets: Tensor,
    *,
    epoch: int,
    lambda_: float = 1.0,
    tau: float = 0.75,
    change_epoch: int = 1,
    delta: float = 1.0,
    eig_thd: float = 1e-6,
    method: Literal["reduced", "svd"] = "reduced",
) -> dict[str, Tensor]:
    """CLML term (spec §14.1): ``{"loss": local − global, "local": λ/B Σ_c ℓ_c, "global": λ/B ‖X‖_*}``.

    features [B, D] (differentiable; half precision is computed in float32), logits [B, C] (only read,
    detached, for the label correction), targets [B, C] int in {1, 0, -1} with -1 ≡ 0. ℓ_c = ‖X_c‖_* if it
    exceeds δ, else δ (empty labels give δ). Correction (σ(logit) > τ → positive) is on iff
    ``epoch >= change_epoch``. Returns 0-dim tensors in the computation dtype (float64 for float64
    features, else float32). ``method="svd"`` selects the slow per-label reference loop.
    """
    if features.dim() != 2 or logits.shape != targets.shape or logits.shape[0] != features.shape[0]:
        raise ValueError(
            f"expected features [B, D], logits and targets [B, C]; got {tuple(features.shape)}, "
            f"{tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    dtype = _compute_dtype(features.dtype)
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = features.to(dtype)
        labels = correct_labels(logits, targets, tau=tau) if epoch >= change_epoch else targets
        pos = (labels == 1).to(features.device)
        local_sum, global_nuc = _NuclearTerms.apply(x, pos, float(delta), float(eig_thd), method)
        scale = float(lambda_) / features.shape[0]
        local = local_sum * scale
        glob = global_nuc * scale
    return {"loss": local - glob, "local": local, "global": glob}


@register_loss("clml")
class CLML(LossPlugin):
    """Base classification loss + CLML (spec clml.md §6): ``loss = base(Z, Y_obs) + clml_loss(X, Z, Y)``.

    The base loss is any registered linear-head plugin (``base_loss``, default "bce", constructed with
    ``base_kwargs``) and always sees the *uncorrected* targets; λ sits inside the CLML term. ``features`` are
    the pooled backbone features of the linear head (no projection, no normalisation), so the CLML scale
    follows the feature scale. All rows of the batch (every view) form the CLML batch; with ``gather=True``
    features, logits and targets are all-gathered over DDP ranks first, because nuclear norms do not add
    over shards (the reference's DataParallel sees the whole batch); the base plugin gets the same ``gather``
    unless ``base_kwargs`` sets it.

    The label correction is recomputed from the current logits at every step (stateless, spec §3): the
    plugin keeps no per-sample state and has nothing to checkpoint besides the base plugin's own state.
    Every hook of the plugin protocol (:func:`plugin_hooks`: ``attach``, ``on_train_targets``, ...) is
    forwarded to the base plugin, so e.g. ROLE's label estimates are initialised as without CLML.

    Logged terms: the base plugin's terms prefixed ``base_`` (its total as ``base_loss``), ``clml_local``,
    ``clml_global``, ``clml`` (= local − global, λ included) and ``num_corrected`` (entries promoted to
    positive by the correction in this batch, over all rows).
    """

    head = "linear"
    unknown_policy = (
        "identical to 0: the base loss gets the base plugin's own policy (default: negative, as in the "
        "reference) and CLML leaves -1 rows out of that label's group unless the correction promotes them"
    )

    #: hyper-parameters declared once (types, ranges, defaults; mlcl.config.validate reads them)
    hyperparams = {
        "lambda_": Float(1.0, ge=0),
        "tau": Float(0.75, ge=0, le=1),
        "change_epoch": Int(1, ge=0),
        "delta": Float(1.0, ge=0),
        "eig_thd": Float(1e-6, ge=0),
        "base_loss": Str("bce"),
        "base_kwargs": Dict({}, nullable=True),
    }

    hyperparams_as_keywords = True

    def __init__(self, **kwargs: Any) -> None:
        """``LossPlugin``'s keywords (num_classes, feature_dim, ...) plus the declared hyper-parameters."""
        super().__init__(**kwargs)  # checks the hyper-parameters and sets them as attributes
        base_cls = get_loss_class(self.base_loss)
        if base_cls.head != "linear" or base_cls.spatial:
            raise ValueError(
                f"CLML needs a base loss on the linear head; {self.base_loss!r} uses head {base_cls.head!r}"
                + (" (spatial)" if base_cls.spatial else "")
            )
        self.base_loss_name = self.base_loss
        # gathering the (sum-reduced) base loss too keeps its balance with the gathered CLML term equal to
        # the single-process (reference DataParallel) balance
        base_kwargs = {"gather": self.gather, **(self.base_kwargs or {})}
        self.base = base_cls(
            num_classes=self.num_classes,
            feature_dim=self.feature_dim,
            num_samples=self.num_samples,
            **base_kwargs,
        )

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        base_terms = self.base(outputs, targets, ctx)
        features, logits = outputs["features"], outputs["logits"]
        if targets.shape[0] != features.shape[0] and features.shape[0] == ctx.num_views * targets.shape[0]:
            targets = targets.repeat(ctx.num_views, 1)
        features, logits, targets = self.all_gather(features, logits, targets)
        terms = clml_loss(
            features,
            logits,
            targets,
            epoch=ctx.epoch,
            lambda_=self.lambda_,
            tau=self.tau,
            change_epoch=self.change_epoch,
            delta=self.delta,
            eig_thd=self.eig_thd,
        )
        if ctx.epoch >= self.change_epoch:
            corrected = correct_labels(logits, targets, tau=self.tau)
            num_corrected = ((corrected == 1) & (targets != 1)).sum()
        else:
            num_corrected = torch.zeros((), dtype=torch.long, device=targets.device)
        out = {f"base_{key}": value for key, value in base_terms.items()}
        out.update(
            clml_local=terms["local"],
            clml_global=terms["global"],
            clml=terms["loss"],
            num_corrected=num_corrected.to(terms["loss"].dtype),
        )
        out["loss"] = base_terms["loss"] + terms["loss"]
        return out

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, base={self.base_loss_name}, lambda_={self.lambda_}, tau={self.tau}, "
            f"change_epoch={self.change_epoch}, delta={self.delta}"
        )


def plugin_hooks() -> tuple[str, ...]:
    """Names of the hooks of the plugin protocol: ``attach``, ``param_groups`` and every ``on_*``."""
    return tuple(
        name
        for name, value in vars(LossPlugin).items()
        if callable(value) and (name.startswith("on_") or name in ("attach", "param_groups"))
    )


def _forward_to_base(name: str) -> Any:
    def hook(self: CLML, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.base, name)(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"``{name}`` of the base plugin (CLML keeps no state of its own)."
    return hook


# CLML owns no parameters or state: every hook, including ones added to the protocol later (e.g.
# on_train_targets, which initialises ROLE's label estimates), is the base plugin's
for _name in plugin_hooks():
    setattr(CLML, _name, _forward_to_base(_name))
