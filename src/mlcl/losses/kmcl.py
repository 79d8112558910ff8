"""KMCL: kernel-based multilabel contrastive learning (Sajedi, Khaki et al., arXiv 2307.03967).

Spec: ``specs/kmcl.md``. The head (:class:`mlcl.models.heads.KernelHead`) predicts, per image, a
logit and a diagonal Gaussian kernel ``N(mu_c, var_c)`` per class. The loss is

* ``asl``: asymmetric focal loss on the logits, summed over all ``B*C`` entries (spec §4.1);
* ``rec``: batch mean of ``-log`` of the share that the true labels carry in the ``sigmoid(z)``-weighted
  mixture of the image's own kernels, evaluated at the image's embedding (§4.2);
* ``kmcl``: a supervised-contrastive term on Bhattacharyya coefficients between the class-c kernels
  of two images that share class c, with the Jaccard overlap of their label sets inside the log (§4.3).

Everything is evaluated in log space (§9.1), which reproduces the reference exactly wherever the
reference itself does not under/overflow.

Performance. The Bhattacharyya distances are the cost: a dense evaluation needs ``[B, B, C, D]``
temporaries. The loss only reads ``BD[i, :, c]`` for *anchor entries* ``(i, c)`` with ``y_ic = 1`` and
at least one other sample positive for ``c`` (the denominator ``Z_ic`` of any other entry is never
used), so the default ``impl="fast"`` evaluates the distances for those entries only (``[N, B, D]``
with ``N`` = number of anchor entries, ~3 % of ``B*C`` on COCO), in chunks of anchors, inside a custom
autograd function with an analytic backward (no autograd graph over pairwise temporaries; it
reuses two of them when they are small and recomputes them per chunk otherwise). ``impl="dense"``
is the plain, readable transcription of the spec on the full ``[B, B, C, D]`` grid; both agree to
rounding (tested in float64).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mlcl.config.params import Bool, Choice, Float, Int
from mlcl.losses.base import LossContext, LossPlugin, register_loss

__all__ = ["KMCL", "kmcl_loss"]

_LOSS_CASES = ("anisotropic", "isotropic")
_UNKNOWN = ("negative", "ignore")
_LOSS_OPTS = {"all": "all", "asl_only": "asl_only", "ASLOnly": "asl_only"}
_IMPLS = ("fast", "dense")
#: elements of one ``[anchors, B, D]`` temporary in the fast path when ``chunk_size`` is None
_CHUNK_ELEMENTS = 1 << 22
#: the fast backward reuses forward intermediates (2 tensors of N*B*D) up to this many elements
_KEEP_ELEMENTS = 1 << 23


def _log(x: float) -> float:
    """``log`` of a non-negative Python float, with ``log(0) = -inf``."""
    return math.log(x) if x > 0 else -math.inf


# --------------------------------------------------------------------------------------------
# term (a): asymmetric loss


def _asl_term(
    logits: Tensor,
    pos: Tensor,
    known: Tensor | None,
    *,
    gamma_neg: float,
    gamma_pos: float,
    clip: float | None,
    eps: float,
    detach_focal_weight: bool,
) -> Tensor:
    """Sum-reduced ASL of ``logits [B, C]`` for positives ``pos [B, C]`` (bool); ``known`` masks entries."""
    y = pos.to(logits.dtype)
    p = torch.sigmoid(logits)
    # q = 1 - max(p - m, 0): negatives with p <= m have q = 1, i.e. zero loss and zero gradient
    q = (1 - p + clip).clamp(max=1) if clip is not None and clip > 0 else 1 - p
    ell = y * torch.log(p.clamp(min=eps)) + (1 - y) * torch.log(q.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        p_t = p * y + q * (1 - y)
        gamma_t = gamma_pos * y + gamma_neg * (1 - y)
        weight = torch.pow(1 - p_t, gamma_t)
        ell = ell * (weight.detach() if detach_focal_weight else weight)
    if known is not None:
        ell = torch.where(known, ell, torch.zeros_like(ell))
    return -ell.sum()


# --------------------------------------------------------------------------------------------
# term (b): reconstruction


def _sq_distance(features: Tensor, mu: Tensor, s: Tensor, *, isotropic: bool, decompose: bool) -> Tensor:
    """``q[b, c] = sum_d (e_bd - mu_bc(d))^2 / s_bc(d)^2`` -> ``[B, C]``."""
    if not isotropic:
        return ((features[:, None, :] - mu) / s).square().sum(-1)
    if not decompose:
        return (features[:, None, :] - mu[:, :, None]).square().sum(-1) / s.square()
    # sum_d (e_d - m)^2 = sum_d (e_d - mean(e))^2 + D (mean(e) - m)^2: O(B*D + B*C) instead of
    # O(B*C*D) and, unlike expanding the square, free of cancellation.
    dim = features.shape[1]
    mean = features.mean(1, keepdim=True)
    spread = (features - mean).square().sum(1, keepdim=True)
    return (spread + dim * (mean - mu).square()) / s.square()


def _rec_term(
    features: Tensor,
    logits: Tensor,
    mu: Tensor,
    s: Tensor,
    pos: Tensor,
    known: Tensor | None,
    *,
    isotropic: bool,
    eps: float,
    gauss_floor: float,
    decompose: bool,
) -> Tensor:
    """``L_rec`` (spec §4.2) in log space (§9.1) -> 0-dim."""
    q = _sq_distance(features, mu, s, isotropic=isotropic, decompose=decompose)
    # clamping log G instead of G gives the same values/zero gradients without float32 underflow
    log_kernel = (-0.5 * q).clamp(min=_log(gauss_floor))
    log_mass = torch.nn.functional.logsigmoid(logits) + log_kernel
    has_pos = pos.any(1, keepdim=True)
    neg_inf = torch.full_like(log_mass, -math.inf)
    # rows without a positive get the constant below; feeding them unmasked keeps their (unused)
    # logsumexp finite so that no NaN reaches the backward pass
    num_mask = pos | ~has_pos
    den_mask = num_mask if known is None else (known | ~has_pos)
    log_num = torch.where(num_mask, log_mass, neg_inf).logsumexp(1)
    log_den = (log_mass if known is None else torch.where(den_mask, log_mass, neg_inf)).logsumexp(1)
    cap = -_log(eps)
    per_row = torch.where(
        has_pos.squeeze(1), (log_den - log_num).clamp(max=cap), torch.full_like(log_num, cap)
    )
    return per_row.mean()


# --------------------------------------------------------------------------------------------
# term (c): kernel contrastive


def _label_overlap(pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``|Y_i ∩ Y_j|`` and ``|Y_i ∪ Y_j|`` as ``[B, B]`` tensors of ``dtype`` (exact integers)."""
    y = pos.to(dtype)
    inter = y @ y.T
    count = y.sum(1)
    return inter, count[:, None] + count[None, :] - inter


def _bhattacharyya_dense(mu: Tensor, s: Tensor) -> Tensor:
    """``S[i, j, c] = sum_d ½ log((s_i² + s_j²) / (2 s_i s_j)) + ¼ (mu_i - mu_j)² / (s_i² + s_j²)``.

    ``mu, s: [B, C, D]`` -> ``[B, B, C]``; BD is ``kappa * S``.
    """
    w = s.square()[:, None] + s.square()[None, :]
    ratio = w / (2 * s[:, None] * s[None, :])
    return (0.5 * ratio.log() + 0.25 * (mu[:, None] - mu[None, :]).square() / w).sum(-1)


def _pair_terms(mu_t: Tensor, s_t: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, ...]:
    """Pairwise pieces for anchor entries ``(b_n, c_n)`` against every partner k.

    ``mu_t, s_t: [C, B, D]`` contiguous (class-major, so that gathering the partners of an anchor
    copies one contiguous ``[B, D]`` block). Returns ``s_a [n, 1, D]`` and the ``[n, B, D]`` tensors
    ``s_k``, ``w = s_a² + s_k²``, ``delta = mu_k - mu_a`` and ``r = delta / w``.
    """
    s_a = s_t[c, b][:, None]
    s_k = s_t.index_select(0, c)
    w = torch.addcmul(s_a.square(), s_k, s_k)
    delta = mu_t.index_select(0, c).sub_(mu_t[c, b][:, None])
    return s_a, s_k, w, delta, delta / w


class _AnchorBhattacharyya(torch.autograd.Function):
    """``S[n, k]`` of :func:`_bhattacharyya_dense` for anchor entries ``(b_n, c_n)`` against every k.

    Inputs ``mu, s: [B, C, D]``, anchors ``b, c: [N]``; output ``[N, B]``. Anchors are processed
    ``chunk`` at a time. The backward is analytic: it keeps ``w`` and ``r`` of each chunk when all of
    them together have at most ``keep`` elements, and recomputes them otherwise, so memory stays
    at a few ``[chunk, B, D]`` temporaries whatever N is.
    """

    @staticmethod
    def forward(ctx: Any, mu: Tensor, s: Tensor, b: Tensor, c: Tensor, chunk: int, keep: int) -> Tensor:
        mu_t, s_t = mu.transpose(0, 1).contiguous(), s.transpose(0, 1).contiguous()
        ctx.save_for_backward(mu_t, s_t, b, c)
        ctx.chunk = chunk
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.kept = [] if needs_grad and b.shape[0] * s_t[0].numel() <= keep else None
        out = mu.new_empty(b.shape[0], mu.shape[0])
        for start in range(0, b.shape[0], chunk):
            sl = slice(start, start + chunk)
            s_a, s_k, w, delta, r = _pair_terms(mu_t, s_t, b[sl], c[sl])
            # log((s_a² + s_k²) / (2 s_a s_k)) per element: accurate when the kernels nearly coincide
            term = s_k.mul_(2 * s_a)
            torch.div(w, term, out=term).log_()
            # ½ log ratio + ¼ (mu_a - mu_k)² / w  =  ½ (log ratio + ½ delta r)
            term.addcmul_(delta, r, value=0.5)
            out[sl] = 0.5 * term.sum(-1)
            if ctx.kept is not None:
                ctx.kept.append((w, r))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        mu_t, s_t, b, c = ctx.saved_tensors
        grad_mu = torch.zeros_like(mu_t)
        # acc[c, k, d] collects g (1/w - r²/2) of every pair that involves kernel (k, c), so that
        # dS/ds_x = s_x (1/w - r²/2) - 1/(2 s_x) needs s_x once per kernel rather than once per pair
        acc = torch.zeros_like(s_t)
        for i, start in enumerate(range(0, b.shape[0], ctx.chunk)):
            sl = slice(start, start + ctx.chunk)
            bb, cc = b[sl], c[sl]
            if ctx.kept is not None:
                w, r = ctx.kept[i]
            else:
                _, _, w, _, r = _pair_terms(mu_t, s_t, bb, cc)
            g = grad[sl, :, None]
            # dS/dmu_a = -r/2, dS/dmu_k = r/2
            g_mu = r * (0.5 * g)
            grad_mu.index_put_((cc, bb), -g_mu.sum(1), accumulate=True)
            grad_mu.index_add_(0, cc, g_mu)
            u = w.reciprocal_().sub_(r.square_(), alpha=0.5).mul_(g)
            acc.index_put_((cc, bb), u.sum(1), accumulate=True)
            acc.index_add_(0, cc, u)
        ctx.kept = None
        # the separable part -1/(2 s_x) needs the sum of g over every pair that involves (k, c)
        g_sum = grad.new_zeros(s_t.shape[:2]).index_add_(0, c, grad)
        g_sum.index_put_((c, b), grad.sum(1), accumulate=True)
        grad_s = acc.mul_(s_t).sub_(g_sum[..., None] / (2 * s_t))
        return grad_mu.transpose(0, 1), grad_s.transpose(0, 1), None, None, None, None


def _kmcl_term_dense(
    mu: Tensor, s: Tensor, pos: Tensor, *, kappa: float, temperature: float, log_eps: float
) -> Tensor:
    """``L_kmcl`` (spec §4.3, log space §9.1) on the full ``[B, B, C]`` grid; ``mu, s: [B, C, D]``."""
    batch = mu.shape[0]
    bd = kappa * _bhattacharyya_dense(mu, s)  # [anchor i, partner j, class c]
    a = torch.exp(-bd) / temperature
    eye = torch.eye(batch, dtype=torch.bool, device=mu.device)
    lse = a.masked_fill(eye[:, :, None], -math.inf).logsumexp(1, keepdim=True)
    inter, union = _label_overlap(pos, mu.dtype)
    partner = (inter > 0) & ~eye
    log_j = torch.where(partner, inter.clamp(min=1).log() - union.clamp(min=1).log(), torch.zeros_like(inter))
    ell = torch.logaddexp(log_j[:, :, None] + a - lse, a.new_tensor(_log(log_eps)))
    pair = pos[:, None, :] & pos[None, :, :] & ~eye[:, :, None]
    per_anchor = torch.where(pair, ell, torch.zeros_like(ell)).sum((1, 2))
    return -(per_anchor / partner.sum(1).clamp(min=1)).sum() / batch


def _kmcl_term_fast(
    mu: Tensor,
    s: Tensor,
    pos: Tensor,
    *,
    kappa: float,
    temperature: float,
    log_eps: float,
    chunk_size: int | None,
) -> Tensor:
    """Same value and gradient as :func:`_kmcl_term_dense`, evaluated on anchor entries only."""
    batch, _, dim = mu.shape
    # (i, c) is an anchor entry iff y_ic = 1 and some other sample is positive for c; every other
    # entry has P_ijc = 0 for all j, so its row BD[i, :, c] never reaches the loss
    anchor = pos & (pos.sum(0, keepdim=True) >= 2)
    b, c = anchor.nonzero(as_tuple=True)
    chunk = chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // max(1, batch * dim))
    s_pair = _AnchorBhattacharyya.apply(mu, s, b, c, int(chunk), _KEEP_ELEMENTS)  # [N, B]
    a = torch.exp(-kappa * s_pair) / temperature
    self_mask = torch.arange(batch, device=mu.device)[None, :] == b[:, None]
    lse = a.masked_fill(self_mask, -math.inf).logsumexp(1, keepdim=True)
    inter, union = _label_overlap(pos, mu.dtype)
    pair = pos.T[c] & ~self_mask  # y_kc for partner k of anchor entry (b, c)
    log_j = torch.where(pair, inter[b].clamp(min=1).log() - union[b].clamp(min=1).log(), torch.zeros_like(a))
    ell = torch.logaddexp(log_j + a - lse, a.new_tensor(_log(log_eps)))
    per_entry = torch.where(pair, ell, torch.zeros_like(ell)).sum(1)
    n_partners = ((inter > 0).sum(1) - 1).to(mu.dtype)  # the diagonal counts itself as overlapping
    return -(per_entry / n_partners[b]).sum() / batch


# --------------------------------------------------------------------------------------------
# public function


def kmcl_loss(
    features: Tensor | None,
    logits: Tensor,
    mu: Tensor | None,
    var: Tensor | None,
    targets: Tensor,
    *,
    loss_case: str = "anisotropic",
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-7,
    temperature: float = 0.17,
    detach_focal_weight: bool = True,
    loss_opt: str = "all",
    unknown: str = "negative",
    aniso_dim_scale: bool = True,
    sd_eps: float = 1.4901161193847656e-08,
    gauss_floor: float = 1.17549e-38,
    log_eps: float = 1e-7,
    asl_weight: float = 1.0,
    rec_weight: float = 1.0,
    kmcl_weight: float = 1.0,
    impl: str = "fast",
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """KMCL loss (spec §4, contract §12.1).

    Args:
        features: embedding e ``[B, D]`` (may be None when ``loss_opt="asl_only"``).
        logits: class logits z ``[B, C]``.
        mu: kernel means, ``[B, C, D]`` (anisotropic) or ``[B, C]`` (isotropic).
        var: kernel variances (σ², not std), shaped like ``mu``; clamped at 1e-20 before the sqrt.
        targets: ``[B, C]`` in {1, 0, -1} (any dtype); only ``== 1`` counts as positive.
        unknown: ``"negative"`` (-1 is 0 everywhere) or ``"ignore"`` (-1 dropped from ASL and from the
            reconstruction denominator; the contrastive term only reads positives).
        impl: extension. ``"fast"`` (anchor entries only, chunked, analytic backward) or ``"dense"``
            (readable full-grid evaluation); equal up to rounding.
        chunk_size: extension. Anchor entries per chunk in the fast path (None: temporaries of at most
            ~4M elements).

    Returns:
        0-dim tensors ``"asl"``, ``"rec"``, ``"kmcl"`` (unweighted) and ``"loss"`` (weighted sum), in
        float64 for float64 inputs and float32 otherwise.
    """
    if loss_case not in _LOSS_CASES:
        raise ValueError(f"loss_case must be one of {_LOSS_CASES}, got {loss_case!r}")
    if unknown not in _UNKNOWN:
        raise ValueError(f"unknown must be one of {_UNKNOWN}, got {unknown!r}")
    if loss_opt not in _LOSS_OPTS:
        raise ValueError(f"loss_opt must be 'all' or 'asl_only', got {loss_opt!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    asl_only = _LOSS_OPTS[loss_opt] == "asl_only"
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(
            f"logits and targets must both be [B, C], got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )

    inputs = [logits] if asl_only else [features, logits, mu, var]
    if any(t is None for t in inputs):
        raise ValueError("features, mu and var are required unless loss_opt='asl_only'")
    dtype = logits.dtype
    for t in inputs[1:] if not asl_only else ():
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
        dtype = torch.float32  # half precision under/overflows here (spec Q2)

    pos = targets == 1
    known = (targets != -1) if unknown == "ignore" else None
    z = logits.to(dtype)
    asl = _asl_term(
        z,
        pos,
        known,
        gamma_neg=gamma_neg,
        gamma_pos=gamma_pos,
        clip=clip,
        eps=eps,
        detach_focal_weight=detach_focal_weight,
    )
    zero = z.new_zeros(())
    if asl_only:
        rec, kmcl = zero, zero.clone()
    else:
        isotropic = loss_case == "isotropic"
        expected_ndim = 2 if isotropic else 3
        if mu.ndim != expected_ndim:
            raise ValueError(
                f"loss_case={loss_case!r} needs mu of {expected_ndim} dims, got shape {tuple(mu.shape)}"
            )
        if var.shape != mu.shape:
            raise ValueError(f"var must be shaped like mu {tuple(mu.shape)}, got {tuple(var.shape)}")
        e, m = features.to(dtype), mu.to(dtype)
        # clamping keeps d sqrt / d var finite at var = 0 and changes nothing for var >= 1e-20
        s = var.to(dtype).clamp(min=1e-20).sqrt() + sd_eps
        rec = _rec_term(
            e,
            z,
            m,
            s,
            pos,
            known,
            isotropic=isotropic,
            eps=eps,
            gauss_floor=gauss_floor,
            decompose=impl == "fast",
        )
        if isotropic:
            # the isotropic kernel is N(mu * 1_D, s² I_D): one dim of the anisotropic formula, times D
            kappa, m3, s3 = float(e.shape[1]), m[..., None], s[..., None]
        else:
            kappa, m3, s3 = float(m.shape[-1]) if aniso_dim_scale else 1.0, m, s
        if m.shape[0] < 2:
            kmcl = zero.clone()
        elif impl == "dense":
            kmcl = _kmcl_term_dense(m3, s3, pos, kappa=kappa, temperature=temperature, log_eps=log_eps)
        else:
            kmcl = _kmcl_term_fast(
                m3, s3, pos, kappa=kappa, temperature=temperature, log_eps=log_eps, chunk_size=chunk_size
            )
    loss = asl_weight * asl + rec_weight * rec + kmcl_weight * kmcl
    return {"asl": asl, "rec": rec, "kmcl": kmcl, "loss": loss}


# --------------------------------------------------------------------------------------------
# plugin


@register_loss("kmcl")
class KMCL(LossPlugin):
    """KMCL on :class:`~mlcl.models.heads.KernelHead` outputs (features, logits, mu, var).

    ``loss_case`` must equal the head's (``head_kwargs["loss_case"]``, merged over
    ``default_head_kwargs`` as :meth:`build_head` does). With ``gather=True`` all inputs are
    concatenated over DDP ranks first, so the contrastive term sees the global batch (the reference
    uses the local one, spec Q13).
    """

    head = "kernel"
    unknown_policy = (
        "treated as negative by default (reference); unknown='ignore' drops them from ASL and from "
        "the reconstruction denominator (the contrastive term only uses positives)"
    )
    #: reference head: Linear(F, 128) projection, anisotropic kernels, one variance per class and dim
    default_head_kwargs: ClassVar[dict[str, Any]] = {
        "embed_dim": 128,
        "loss_case": "anisotropic",
        "var_mode": "per_class",
    }

    #: hyper-parameters declared once (types, ranges, defaults; mlcl.config.validate reads them)
    hyperparams = {
        "loss_case": Choice("anisotropic", "anisotropic", "isotropic"),
        "gamma_neg": Float(4.0, ge=0),
        "gamma_pos": Float(0.0, ge=0),
        "clip": Float(0.05, ge=0, lt=1),
        "eps": Float(1e-7, gt=0, lt=1),
        "temperature": Float(0.17, gt=0),
        "detach_focal_weight": Bool(True),
        "loss_opt": Choice("all", "all", "asl_only"),
        "unknown": Choice("negative", "negative", "ignore"),
        "aniso_dim_scale": Bool(True),
        "sd_eps": Float(1.4901161193847656e-08, gt=0),
        "gauss_floor": Float(1.17549e-38, ge=0),
        "log_eps": Float(1e-7, gt=0),
        "asl_weight": Float(1.0, ge=0),
        "rec_weight": Float(1.0, ge=0),
        "kmcl_weight": Float(1.0, ge=0),
        "impl": Choice("fast", "fast", "dense"),
        "chunk_size": Int(None, ge=1, nullable=True),
    }
    head_hyperparams = {
        "embed_dim": Int(128, ge=1, nullable=True),
        "loss_case": Choice("anisotropic", "anisotropic", "isotropic"),
        "var_mode": Choice("per_class", "per_class", "shared_dim", "shared_scalar"),
        "var_offset": Float(2.0000001000000003, gt=0),
        "init": Choice("reference", "reference", "default"),
    }

    hyperparams_as_keywords = True

    def __init__(self, **kwargs: Any) -> None:
        """``LossPlugin``'s keywords (num_classes, feature_dim, ...) plus the declared hyper-parameters."""
        super().__init__(**kwargs)  # checks the hyper-parameters and sets them as attributes
        head_case = self.head_kwargs["loss_case"]
        if head_case != self.loss_case:
            raise ValueError(
                f"KMCL: loss.loss_case={self.loss_case!r} does not match loss.head_kwargs.loss_case="
                f"{head_case!r}; the kernel head and the loss must use the same loss case"
            )

    @property
    def loss_kwargs(self) -> dict[str, Any]:
        """Keywords of :func:`kmcl_loss`: every declared hyper-parameter, as currently set."""
        return {name: getattr(self, name) for name in self.hyperparams}

    def forward(self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext) -> dict[str, Tensor]:
        """Loss terms on head outputs; keys ``loss``, ``asl``, ``rec``, ``kmcl``."""
        names = ("features", "logits", "mu", "var")
        present = [k for k in names if outputs.get(k) is not None]
        gathered = self.all_gather(*(outputs[k] for k in present), targets)
        args = dict.fromkeys(names)
        args.update(zip(present, gathered[:-1]))
        return kmcl_loss(
            args["features"], args["logits"], args["mu"], args["var"], gathered[-1], **self.loss_kwargs
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss_case={self.loss_case}"
