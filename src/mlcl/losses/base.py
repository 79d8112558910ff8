"""Loss-plugin protocol and the loss registry.

A loss plugin is a small ``nn.Module`` that

* declares which head it needs (``head``: a name in :mod:`mlcl.models.heads`) and whether that
  head reads the backbone's spatial feature map (``spatial``);
* receives the head's output dict (every row of every view, view-major), the targets in
  ``{1, 0, -1}`` (``-1`` = unobserved) and a :class:`LossContext` (sample indices, epoch, ...);
* returns a dict of 0-dim tensors with key ``"loss"`` (the differentiable total) plus one key per
  term; the training module logs every key.

The maths lives in pure functions (one family per file); a plugin is the thin adapter that turns
head outputs into their arguments. Plugins may own parameters (projection heads, per-sample label
estimates) or buffers (queues); those are trained and checkpointed with the module.

Adding a loss = one file with ``@register_loss("name")`` on a ``LossPlugin`` subclass, plus
``conf/loss/name.yaml`` whose ``_target_`` points at it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mlcl import distributed
from mlcl.config.params import Param, check_all

LOSSES: dict[str, type[LossPlugin]] = {}


def register_loss(name: str) -> Callable[[type[LossPlugin]], type[LossPlugin]]:
    """Class decorator: make a plugin selectable as ``loss=<name>`` and visible to the bench."""

    def wrap(cls: type[LossPlugin]) -> type[LossPlugin]:
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"loss name {name!r} is registered twice ({LOSSES[name]} and {cls})")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return wrap


def list_losses() -> list[str]:
    """Names of every registered loss plugin (imports the loss modules first)."""
    import mlcl.losses  # noqa: F401  (registers the built-in plugins)

    return sorted(LOSSES)


def get_loss_class(name: str) -> type[LossPlugin]:
    """Look a plugin class up by registry name; unknown names list the valid ones."""
    valid = list_losses()
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; valid losses: {', '.join(valid)}")
    return LOSSES[name]


@dataclass
class LossContext:
    """What a plugin may need besides head outputs and targets.

    ``indices`` are dataset indices of the rows (``[V*B]``, repeated per view), so stateful
    losses can keep per-sample state. ``inputs`` are the raw model inputs of all rows (only for
    plugins that run their own encoder, e.g. a momentum key encoder).
    """

    indices: Tensor
    epoch: int = 0
    step: int = 0
    num_views: int = 1
    training: bool = True
    inputs: Tensor | None = None


class LossPlugin(nn.Module):
    """Base class of every loss plugin (see module docstring)."""

    name: ClassVar[str] = "?"
    #: head built for this loss: a key of ``mlcl.models.heads.HEADS``
    head: ClassVar[str] = "linear"
    #: the head reads the backbone feature map ``[B, F, H, W]`` instead of the pooled ``[B, F]``
    spatial: ClassVar[bool] = False
    #: how unobserved (-1) targets are treated, shown in docs and ``mlcl-bench``
    unknown_policy: ClassVar[str] = "treated as negative"
    #: views per training sample the loss needs when ``data.num_views`` is left null (two-view losses: 2)
    num_views: ClassVar[int] = 1
    #: head keyword arguments used unless the YAML's ``head_kwargs`` overrides them
    default_head_kwargs: ClassVar[dict[str, Any]] = {}
    #: the plugin's hyper-parameters (name -> Param: type, range, default), declared once: read by
    #: :meth:`set_hyperparams` and by :func:`mlcl.config.validate` before anything is built
    hyperparams: ClassVar[dict[str, Param]] = {}
    #: the same for the keys of ``head_kwargs`` (checked by the validator; the head checks its own)
    head_hyperparams: ClassVar[dict[str, Param]] = {}
    #: the base constructor takes the hyper-parameters as keywords (checked, stored as attributes);
    #: plugins with their own explicit constructor leave this off
    hyperparams_as_keywords: ClassVar[bool] = False

    @classmethod
    def build_head(
        cls, in_features: int, num_classes: int, head_kwargs: dict[str, Any] | None = None
    ) -> nn.Module:
        """Build this loss's head: ``HEADS[cls.head](in_features, num_classes, **kwargs)``."""
        from mlcl.models.heads import HEADS

        kwargs = {**cls.default_head_kwargs, **(head_kwargs or {})}
        return HEADS[cls.head](in_features, num_classes, **kwargs)

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        num_samples: int = 0,
        head_kwargs: dict[str, Any] | None = None,
        gather: bool = False,
        **hyperparams: Any,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.num_samples = int(num_samples)
        # the head actually built: class defaults overridden by the config's head_kwargs
        self.head_kwargs = {**self.default_head_kwargs, **dict(head_kwargs or {})}
        #: all-gather (with gradients) across DDP ranks before batch-coupled terms
        self.gather = bool(gather)
        if self.hyperparams_as_keywords:
            self.set_hyperparams(hyperparams)
        elif hyperparams:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(hyperparams)}"
            )

    @classmethod
    def hyperparam_defaults(cls) -> dict[str, Any]:
        """Default of every hyper-parameter: from :attr:`hyperparams`, else the constructor's keywords."""
        if cls.hyperparams:
            return {k: p.default for k, p in cls.hyperparams.items()}
        base = {"num_classes", "feature_dim", "num_samples", "head_kwargs", "gather"}
        return {k: v for k, v in (cls.__init__.__kwdefaults__ or {}).items() if k not in base}

    def set_hyperparams(self, given: dict[str, Any]) -> None:
        """Check ``given`` against :attr:`hyperparams` (defaults filled in) and store each as an attribute."""
        unknown = sorted(set(given) - set(self.hyperparams))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(unknown)}; "
                f"its hyper-parameters: {', '.join(self.hyperparams) or 'none'}"
            )
        for key, value in check_all(self.hyperparams, given, "loss").items():
            setattr(self, key, value)

    # ------------------------------------------------------------------ hooks
    def forward(  # noqa: D401
        self, outputs: dict[str, Tensor], targets: Tensor, ctx: LossContext
    ) -> dict[str, Tensor]:
        """Return ``{"loss": total, <term>: value, ...}`` (0-dim tensors)."""
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        """Called once the module has built backbone and head (e.g. to copy a key encoder)."""

    def on_train_targets(self, targets: Tensor) -> None:
        """Called once before training with the (missing-label-masked) training targets ``[N, C]``."""

    def on_train_epoch_start(self, epoch: int) -> None:
        """Called at the start of every training epoch with the 0-based epoch index."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups for the plugin's own parameters; ``lr_mult`` scales the base lr."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr_mult": 1.0}] if params else []

    # ------------------------------------------------------------------ helpers
    def all_gather(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Concatenate tensors over DDP ranks (gradients flow back) when ``gather`` is on."""
        if not self.gather:
            return tensors
        return tuple(distributed.all_gather_cat(t) for t in tensors)

    @staticmethod
    def first_view(t: Tensor, num_views: int) -> Tensor:
        """Rows of the first view of a view-major ``[V*B, ...]`` tensor."""
        return t[: t.shape[0] // num_views] if num_views > 1 else t

    def extra_repr(self) -> str:
        return f"name={self.name}, head={self.head}, gather={self.gather}"


def positives(targets: Tensor) -> Tensor:
    """Boolean ``[B, C]`` mask of observed positives (targets == 1) for any target dtype."""
    return targets == 1


def as_float_targets(targets: Tensor, dtype: torch.dtype) -> Tensor:
    """Targets in ``{1, 0, -1}`` of any dtype as a float tensor of ``dtype``."""
    return targets.to(dtype)


def flatten_params(groups: Iterable[dict[str, Any]]) -> list[Tensor]:
    """All parameters of a list of optimiser groups."""
    return [p for g in groups for p in g["params"]]
