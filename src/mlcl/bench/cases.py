"""Bench cases: the inputs of each loss row (spec-style cases and the generic plugin path).

KMCL, CLML, MulCon, SupCon and MulSupCon call their pure loss function on inputs shaped like the spec's
(see ``SPEC_CASES``); every other registered plugin, including plugins added later, is built through its
class with default hyper-parameters and timed as ``plugin(outputs, targets, ctx)`` on the outputs of its
own head applied to random backbone features (head evaluated outside the timer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcl.losses.base import LossContext, get_loss_class

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_CASE_MARK = "MLCL_BENCH_CASE "
#: losses of the scaling table (rows come from their spec cases, or their plugin with --via plugin)
SCALING_LOSSES = ("kmcl", "clml", "mulcon", "supcon", "mulsupcon")
#: views a plugin is fed when it has no ``num_views`` class attribute (the specs' two-crop setting)
_KNOWN_VIEWS = {"supcon": 2, "mulsupcon": 2}


# ----------------------------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Setup:
    """Everything that defines the inputs of a case (sent as JSON to the memory subprocess)."""

    batch: int = 64
    classes: int = 80
    positives: float = 2.9
    #: backbone width for plugin rows and for KMCL anisotropic's projection input
    feature_dim: int = 2048
    kmcl_aniso_dim: int = 128
    kmcl_iso_dim: int = 2048
    kmcl_chunk: int | None = None
    clml_dim: int = 2048
    mulcon_dim: int = 128
    supcon_dim: int = 128
    mulsupcon_dim: int = 128
    queue: int = 256
    epoch: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    #: "spec": spec-style rows for the losses in SPEC_CASES; "plugin": every row through its plugin
    via: str = "spec"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass
class Prepared:
    """A ready-to-time case: ``fn()`` returns the 0-dim loss; ``params`` get ``.grad = None`` per call."""

    fn: Callable[[], Tensor]
    params: list[Tensor]
    inputs: str


def coco_targets(rows: int, classes: int, positives: float = 2.9, seed: int = 0) -> Tensor:
    """COCO-like multi-hot targets ``[rows, classes]`` (int64, {0, 1}): Bernoulli(positives / classes)
    per entry, then one random class switched on in rows that drew none."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(rows, classes, generator=g) < min(1.0, positives / classes)
    fallback = torch.randint(classes, (rows,), generator=g)
    empty = (~y.any(1)).nonzero().squeeze(1)
    y[empty, fallback[empty]] = True
    return y.long()


def _features(s: Setup, *shape: int, offset: int = 0) -> Tensor:
    """Post-ReLU-like backbone features |N(0, 1)| on the CPU in float32 (seeded per case)."""
    g = torch.Generator().manual_seed(s.seed + 1000 + offset)
    return torch.randn(*shape, generator=g).abs()


def _randn(s: Setup, *shape: int, offset: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(s.seed + 2000 + offset)
    return torch.randn(*shape, generator=g)


def _leaf(t: Tensor, s: Setup) -> Tensor:
    """A fresh leaf on the case's device and dtype that requires grad."""
    return t.detach().to(device=s.device, dtype=s.torch_dtype).clone().requires_grad_(True)


def _shape(t: Tensor) -> str:
    return "[" + ",".join(str(d) for d in t.shape) + "]"


# ------------------------------------------------------------------------------------------ spec cases
@dataclass(frozen=True)
class Case:
    """One benchmark row: ``key`` identifies it (also in the subprocess), ``build`` prepares it."""

    key: str
    loss: str
    label: str
    build: Callable[[Setup], Prepared]


def _kmcl(loss_case: str) -> Callable[[Setup], Prepared]:
    def build(s: Setup) -> Prepared:
        from mlcl.losses.kmcl import kmcl_loss

        cls = get_loss_class("kmcl")
        if loss_case == "anisotropic":
            in_features, head_kwargs = s.feature_dim, {"embed_dim": s.kmcl_aniso_dim, "loss_case": loss_case}
        else:  # the reference isotropic model reads the backbone features directly (no projection)
            in_features, head_kwargs = s.kmcl_iso_dim, {"embed_dim": None, "loss_case": loss_case}
        torch.manual_seed(s.seed)
        head = cls.build_head(in_features, s.classes, head_kwargs)
        with torch.no_grad():
            out = head(_features(s, s.batch, in_features))
        e, z, mu, var = (_leaf(out[k], s) for k in ("features", "logits", "mu", "var"))
        y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)
        pos = y == 1
        anchors = int((pos & (pos.sum(0, keepdim=True) >= 2)).sum())
        chunk = f", chunk {s.kmcl_chunk}" if s.kmcl_chunk else ""

        def fn() -> Tensor:
            return kmcl_loss(e, z, mu, var, y, loss_case=loss_case, chunk_size=s.kmcl_chunk)["loss"]

        return Prepared(
            fn, [e, z, mu, var], f"`kmcl_loss` mu, var {_shape(mu)}; {anchors} anchor entries{chunk}"
        )

    return build


def _clml(s: Setup) -> Prepared:
    from mlcl.losses.clml import clml_loss, correct_labels

    cls = get_loss_class("clml")
    torch.manual_seed(s.seed)
    head = cls.build_head(s.clml_dim, s.classes, None)
    with torch.no_grad():
        out = head(_features(s, s.batch, s.clml_dim))
    x = _leaf(out["features"], s)
    z = out["logits"].to(device=s.device, dtype=s.torch_dtype)  # read detached by the loss
    y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)
    corrected = int(((correct_labels(z, y, tau=0.75) == 1) & (y != 1)).sum()) if s.epoch >= 1 else 0
    state = f"correction on, {corrected} promoted" if s.epoch >= 1 else "correction off"

    def fn() -> Tensor:
        return clml_loss(x, z, y, epoch=s.epoch)["loss"]

    return Prepared(fn, [x], f"`clml_loss` features {_shape(x)}; {state}")


def _mulcon(s: Setup) -> Prepared:
    from mlcl.losses.mulcon import mulcon_loss

    feats = _leaf(_randn(s, s.batch, s.classes, s.mulcon_dim), s)
    logits = _leaf(_randn(s, s.batch, s.classes, offset=1), s)
    y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)

    def fn() -> Tensor:
        return mulcon_loss(feats, logits, y)["loss"]

    return Prepared(
        fn, [feats, logits], f"`mulcon_loss` z {_shape(feats)}; P = {int((y == 1).sum())} anchors"
    )


def _supcon(s: Setup) -> Prepared:
    from mlcl.losses.contrastive import supcon_loss

    feats = _leaf(F.normalize(_randn(s, s.batch, 2, s.supcon_dim), dim=-1), s)
    y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)

    def fn() -> Tensor:
        return supcon_loss(feats, y, positive_rule="exact")["loss"]

    return Prepared(fn, [feats], f"`supcon_loss` {_shape(feats)}, exact mask from {_shape(y)} multi-hot")


def _mulsupcon(s: Setup) -> Prepared:
    from mlcl.losses.contrastive import mulsupcon_loss

    q = _leaf(F.normalize(_randn(s, s.batch, s.mulsupcon_dim), dim=-1), s)
    # keys come from the momentum encoder and the queue: no gradient
    keys = F.normalize(_randn(s, s.batch + s.queue, s.mulsupcon_dim, offset=1), dim=-1)
    keys = keys.to(device=s.device, dtype=s.torch_dtype)
    y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)
    y_queue = coco_targets(s.queue, s.classes, s.positives, s.seed + 1).to(s.device)
    y_keys = torch.cat([y, y_queue])

    def fn() -> Tensor:
        return mulsupcon_loss(q, y, keys, y_keys)["loss"]

    rows = int((y == 1).sum())
    return Prepared(fn, [q], f"`mulsupcon_loss` q {_shape(q)}, {s.batch}+{s.queue} keys; {rows} anchor rows")


#: spec-style rows per registry name (the plugin path is used for every other loss)
SPEC_CASES: dict[str, Callable[[Setup], list[Case]]] = {
    "kmcl": lambda s: [
        Case("kmcl/anisotropic", "kmcl", f"kmcl (anisotropic D={s.kmcl_aniso_dim})", _kmcl("anisotropic")),
        Case("kmcl/isotropic", "kmcl", f"kmcl (isotropic D={s.kmcl_iso_dim})", _kmcl("isotropic")),
    ],
    "clml": lambda s: [Case("clml", "clml", f"clml (D={s.clml_dim})", _clml)],
    "mulcon": lambda s: [Case("mulcon", "mulcon", f"mulcon (d={s.mulcon_dim})", _mulcon)],
    "supcon": lambda s: [Case("supcon", "supcon", "supcon", _supcon)],
    "mulsupcon": lambda s: [Case("mulsupcon", "mulsupcon", f"mulsupcon (queue {s.queue})", _mulsupcon)],
}


# ---------------------------------------------------------------------------------------- plugin cases
class _StubModel(nn.Module):
    """What ``attach`` may look at: an identity ``backbone`` (inputs are already backbone features)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Identity()
        self.head = head

    def encode(self, x: Tensor) -> Tensor:
        from mlcl.models.backbones import pool

        return pool(self.backbone(x))


def plugin_views(name: str) -> int:
    """Views per sample a plugin is fed: its ``num_views`` class attribute, else the spec setting."""
    cls = get_loss_class(name)
    return int(getattr(cls, "num_views", 0) or _KNOWN_VIEWS.get(name, 1))


def _plugin(name: str) -> Callable[[Setup], Prepared]:
    def build(s: Setup) -> Prepared:
        cls = get_loss_class(name)
        views = plugin_views(name)
        rows = views * s.batch
        torch.manual_seed(s.seed)
        head = cls.build_head(s.feature_dim, s.classes, None)
        plugin = cls(num_classes=s.classes, feature_dim=head.out_features, num_samples=s.batch)
        shape = (rows, s.feature_dim, 7, 7) if cls.spatial else (rows, s.feature_dim)
        x = _features(s, *shape)
        with torch.no_grad():
            out = head(x)
        # the training module hands plugins float32 outputs (half precision is upcast first)
        dtype = torch.float64 if s.dtype == "float64" else torch.float32
        plugin.to(device=s.device, dtype=dtype).train()
        plugin.attach(_StubModel(head))
        y = coco_targets(s.batch, s.classes, s.positives, s.seed).to(s.device)
        plugin.on_train_targets(y)
        outputs = {
            k: v.detach().to(device=s.device, dtype=dtype).clone().requires_grad_(v.is_floating_point())
            if torch.is_tensor(v)
            else v
            for k, v in out.items()
        }
        ctx = LossContext(
            indices=torch.arange(s.batch, device=s.device).repeat(views),
            epoch=s.epoch,
            step=0,
            num_views=views,
            training=True,
            inputs=x.to(device=s.device, dtype=dtype),
        )
        y_rows = y.repeat(views, 1)

        def fn() -> Tensor:
            return plugin(outputs, y_rows, ctx)["loss"]

        leaves = [v for v in outputs.values() if torch.is_tensor(v) and v.requires_grad]
        shown = ", ".join(f"{k} {_shape(v)}" for k, v in outputs.items() if torch.is_tensor(v))
        where = f"{views}×{s.batch} rows, " if views > 1 else ""
        desc = f"plugin on `{cls.head}` head of {_shape(x)}: {where}{shown}"
        return Prepared(fn, leaves + list(plugin.parameters()), desc)

    return build


def cases_for(losses: Sequence[str], s: Setup) -> list[Case]:
    """Rows for the given registry names, in order (spec cases, else the plugin path)."""
    cases: list[Case] = []
    for name in losses:
        if s.via == "spec" and name in SPEC_CASES:
            cases.extend(SPEC_CASES[name](s))
        else:
            cases.append(Case(f"plugin/{name}", name, name, _plugin(name)))
    return cases


def _find_case(key: str, s: Setup) -> Case:
    if key.startswith("plugin/"):
        name = key.split("/", 1)[1]
        get_loss_class(name)  # a clear KeyError for unknown names
        return Case(key, name, name, _plugin(name))
    for case in SPEC_CASES.get(key.split("/")[0], lambda _: [])(s):
        if case.key == key:
            return case
    raise KeyError(f"unknown bench case {key!r}")
