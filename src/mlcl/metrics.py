"""Evaluation metrics for multi-label classification (``specs/baselines.md`` 4.2, 4.4, 4.5).

* :func:`mean_average_precision` — macro mAP in percent, ``-1`` targets dropped per class, tied
  scores grouped (sklearn/torchmetrics convention), classes without positives count as AP 0.
* :func:`multilabel_f1_scores` — ML-GCN's CP/CR/CF1/OP/OR/OF1 in percent with ``-1`` masked,
  zero divisions giving 0 and OP over the true number of predictions; optional top-k rule.
* :class:`MultilabelReport` — a torchmetrics ``Metric`` that stores every score and target and
  evaluates both functions on the whole evaluation set (DDP: states are concatenated over ranks).
* :func:`yeast_metrics` — MulSupCon's yeast numbers (in [0, 1], thresholds tuned on the test set).

All metrics are computed in float64 and returned as 0-dim tensors in the dtype of ``scores``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "MultilabelReport",
    "mean_average_precision",
    "multilabel_f1_scores",
    "per_class_results",
    "yeast_metrics",
]


def _check(scores: Tensor, targets: Tensor) -> None:
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(
            f"scores and targets must both be [N, C], got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )


def _div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 wherever ``den == 0``."""
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(num.dtype).tiny), torch.zeros_like(num))


def average_precision_per_class(scores: Tensor, targets: Tensor) -> Tensor:
    """AP of every class ``[C]`` (float64, in [0, 1]); see :func:`mean_average_precision`.

    ``AP_k = Σ_n (R_n − R_{n−1}) P_n`` over the distinct scores of class k in descending order.
    Unknown (``-1``) entries get weight 0 in the true/false-positive counts, which drops them.
    """
    _check(scores, targets)
    s = scores.detach().to(torch.float64)
    order = torch.argsort(s, dim=0, descending=True)
    s_sorted = s.gather(0, order)
    t_sorted = targets.detach().gather(0, order)
    tp = (t_sorted == 1).to(torch.float64).cumsum(0)
    fp = (t_sorted == 0).to(torch.float64).cumsum(0)
    # the last row of every run of equal scores is a threshold; ties are counted together
    is_end = torch.ones_like(s_sorted, dtype=torch.bool)
    is_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    tp_at_end = torch.where(is_end, tp, torch.zeros_like(tp))
    # tp is non-decreasing, so the running max over ends is tp at the latest threshold so far
    tp_prev = torch.cat([tp.new_zeros(1, tp.shape[1]), tp_at_end.cummax(0).values[:-1]])
    gain = tp_at_end - torch.where(is_end, tp_prev, torch.zeros_like(tp))
    precision = _div(tp, tp + fp)
    num_pos = tp[-1] if tp.shape[0] else tp.new_zeros(tp.shape[1])
    return _div((gain * precision).sum(0), num_pos)


def mean_average_precision(scores: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Macro mAP in percent: ``{"mAP": 100 · mean_k AP_k}``.

    ``scores`` ``[N, C]`` probabilities or logits (only the order within a class matters, so logits
    avoid float32 sigmoid saturation ties); ``targets`` ``[N, C]`` in ``{1, 0, -1}``. Entries with
    ``-1`` are dropped per class; tied scores form one threshold; a class without an observed
    positive has AP 0 and stays in the mean.
    """
    ap = average_precision_per_class(scores, targets)
    return {"mAP": (100.0 * ap.mean()).to(scores.dtype)}


def multilabel_f1_scores(
    scores: Tensor, targets: Tensor, threshold: float = 0.5, top_k: int | None = None
) -> dict[str, Tensor]:
    """ML-GCN per-class and overall precision/recall/F1 in percent (spec 4.4).

    ``scores`` ``[N, C]`` probabilities, ``targets`` ``[N, C]`` in ``{1, 0, -1}``. Predicted positive:
    ``score >= threshold`` and, if ``top_k`` is given, among the row's ``top_k`` largest scores (over
    all C classes). ``-1`` entries are excluded from every count. ``CP``/``CR`` average per-class
    ratios (0 for classes without predictions/positives); ``CF1``/``OF1`` are harmonic means;
    ``OP``/``OR`` use the totals. Any 0/0 gives 0. Returns keys ``CP CR CF1 OP OR OF1``.
    """
    _check(scores, targets)
    s = scores.detach()
    pred = s >= threshold
    if top_k is not None:
        if int(top_k) < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k}")
        top = s.topk(min(int(top_k), s.shape[1]), dim=1).indices
        pred = pred & torch.zeros_like(pred).scatter_(1, top, True)
    t = targets.detach()
    positive = t == 1
    n_correct = (pred & positive).sum(0).to(torch.float64)
    n_pred = (pred & (t != -1)).sum(0).to(torch.float64)
    n_true = positive.sum(0).to(torch.float64)

    cp = _div(n_correct, n_pred).mean()
    cr = _div(n_correct, n_true).mean()
    op = _div(n_correct.sum(), n_pred.sum())
    orr = _div(n_correct.sum(), n_true.sum())
    out = {
        "CP": cp,
        "CR": cr,
        "CF1": _div(2 * cp * cr, cp + cr),
        "OP": op,
        "OR": orr,
        "OF1": _div(2 * op * orr, op + orr),
    }
    return {k: (100.0 * v).to(scores.dtype) for k, v in out.items()}


def yeast_metrics(scores: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """MulSupCon's yeast metrics in [0, 1] (spec 4.5): ``mAP HA ebF1 miF1 maF1 p_at_1``.

    ``scores`` ``[N, C]`` probabilities (σ of the logits), ``targets`` ``[N, C]`` in ``{0, 1}``
    (a ``-1`` counts as 0 in the threshold metrics and is dropped by mAP).

    Caution: like the reference, ``HA``, ``ebF1``, ``miF1`` and ``maF1`` each report their own
    best value over the thresholds 0.1, 0.2, ..., 0.9 (prediction ``score >= t``) — the threshold
    is tuned on the evaluated (test) set itself, so these numbers are optimistic. ``p_at_1`` and
    ``mAP`` are threshold-free.
    """
    _check(scores, targets)
    s = scores.detach().to(torch.float64)
    y = targets.detach() == 1
    thresholds = torch.arange(1, 10, dtype=torch.float64, device=s.device) / 10
    pred = s.unsqueeze(0) >= thresholds[:, None, None]  # [T, N, C]
    hit = pred & y
    tp = hit.sum(2).to(torch.float64)  # per threshold and sample [T, N]
    size_sum = y.sum(1).to(torch.float64) + pred.sum(2).to(torch.float64)
    counted = size_sum > 0
    eb_f1 = _div((_div(2 * tp, size_sum) * counted).sum(1), counted.sum(1).to(torch.float64))

    tp_c = hit.sum(1).to(torch.float64)  # per threshold and class [T, C]
    fp_c = (pred & ~y).sum(1).to(torch.float64)
    fn_c = (~pred & y).sum(1).to(torch.float64)
    mi_f1 = _div(2 * tp_c.sum(1), 2 * tp_c.sum(1) + fp_c.sum(1) + fn_c.sum(1))
    ma_f1 = (2 * tp_c / (2 * tp_c + fp_c + fn_c + 1e-6)).mean(1)
    hamming_acc = 1.0 - (pred != y).to(torch.float64).mean(dim=(1, 2))

    p_at_1 = y.gather(1, s.argmax(1, keepdim=True)).to(torch.float64).mean()
    out = {
        "mAP": average_precision_per_class(s, targets).mean(),
        "HA": hamming_acc.max(),
        "ebF1": eb_f1.max(),
        "miF1": mi_f1.max(),
        "maF1": ma_f1.max(),
        "p_at_1": p_at_1,
    }
    return {k: v.to(scores.dtype) for k, v in out.items()}


class MultilabelReport(Metric):
    """mAP plus CP/CR/CF1/OP/OR/OF1 (and their top-k versions) over a whole evaluation set.

    ``update(scores, targets)`` stores ``[n, C]`` scores and ``{1, 0, -1}`` targets; ``compute()``
    concatenates everything (over DDP ranks too) and returns ``{"mAP", "CP", ..., "OF1",
    "CP_top{k}", ..., "OF1_top{k}"}`` in percent (no top-k keys when ``top_k`` is None).
    ``from_logits=True``: scores are logits — mAP ranks them directly, the thresholded metrics use
    their sigmoid.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        threshold: float = 0.5,
        top_k: int | None = 3,
        *,
        from_logits: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.threshold = float(threshold)
        self.top_k = None if top_k is None else int(top_k)
        self.from_logits = bool(from_logits)
        self.last_per_class: dict[str, Tensor] | None = None
        self.last_outputs: tuple[Tensor, Tensor] | None = None
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, targets: Tensor) -> None:  # type: ignore[override]
        _check(scores, targets)
        if scores.shape[1] != self.num_classes:
            raise ValueError(
                f"expected {self.num_classes} classes, got scores of shape {tuple(scores.shape)}"
            )
        self.scores.append(scores.detach())
        self.targets.append(targets.detach().to(torch.int8))

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        scores = dim_zero_cat(self.scores)
        targets = dim_zero_cat(self.targets)
        probs = scores.sigmoid() if self.from_logits else scores
        ap = average_precision_per_class(scores, targets)
        out = {"mAP": (100.0 * ap.mean()).to(scores.dtype)}
        # kept for per-class reports (metrics.json, W&B): AP in percent [C], observed positives [C],
        # and the evaluated scores / targets [N, C] (PR curves)
        self.last_per_class = {"AP": 100.0 * ap, "positives": (targets == 1).sum(0)}
        self.last_outputs = (scores, targets)
        out.update(multilabel_f1_scores(probs, targets, self.threshold))
        if self.top_k is not None:
            top = multilabel_f1_scores(probs, targets, self.threshold, top_k=self.top_k)
            out.update({f"{k}_top{self.top_k}": v for k, v in top.items()})
        return out


def per_class_results(per_class: dict[str, Tensor], class_names: list[str]) -> dict[str, dict[str, float]]:
    """``{"AP": {class: AP %}, "positives": {class: count}}`` for ``metrics.json`` from ``[C]`` tensors."""
    ap, pos = per_class["AP"].tolist(), per_class["positives"].tolist()
    return {
        "AP": {str(n): float(a) for n, a in zip(class_names, ap)},
        "positives": {str(n): int(p) for n, p in zip(class_names, pos)},
    }
