"""``mlcl-bench train``: a few real MLCLModule training steps per loss, and the loss's share of a step."""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mlcl.bench.budget import Budget
from mlcl.bench.cases import coco_targets, plugin_views
from mlcl.bench.cli_args import _check_device, _common, _loss_list, _nonneg_int, _positive_int
from mlcl.bench.measure import BUSY_CORES, background_load
from mlcl.bench.report import _emit, _escape, _fmt_ms, _footer, machine_info
from mlcl.losses.base import get_loss_class, list_losses
from mlcl.threads import cpu_snapshot


# ---------------------------------------------------------------------------------------------- train
def _kv_json(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, payload = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{name}: invalid JSON {payload!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{name}: expected a JSON object, got {payload!r}")
    return name.strip(), value


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlcl-bench train",
        description="A few training steps of the real MLCLModule per loss (random images and COCO-like "
        "targets): steps/s and the loss's share of the step against BCE.",
    )
    _common(p)
    p.add_argument("--batch-size", type=_positive_int, default=None, help="B per view (cpu 8, cuda 64)")
    p.add_argument("--steps", type=_positive_int, default=None, help="timed steps (cpu 10, cuda 30)")
    p.add_argument("--warmup", type=_nonneg_int, default=None, help="untimed steps first (cpu 2, cuda 5)")
    p.add_argument("--backbone", default="resnet18", help="timm model name (default resnet18, random init)")
    p.add_argument("--image-size", type=_positive_int, default=224)
    p.add_argument("--precision", default=None, help="Lightning precision (cpu 32-true, cuda bf16-mixed)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument(
        "--retries",
        type=_nonneg_int,
        default=1,
        help=f"repeat a loss's run while other processes use > {BUSY_CORES} cores (default 1)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="total wall-time budget: no repeats once it is short, losses left when it is spent are "
        "marked skipped (default 600; 0 = unlimited)",
    )
    p.add_argument(
        "--head-kwargs",
        type=_kv_json,
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="head keyword arguments for one loss, e.g. mulcon='{\"embed_dim\": 256}' (repeatable)",
    )
    p.add_argument(
        "--loss-kwargs",
        type=_kv_json,
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="hyper-parameters for one loss, e.g. kmcl='{\"chunk_size\": 64}' (repeatable)",
    )
    return p


@dataclass
class TrainRow:
    loss: str
    views: int
    head: str = ""
    steps: list[float] = field(default_factory=list)
    loss_fwd: list[float] = field(default_factory=list)
    skipped: int = 0
    error: str | None = None
    baseline: bool = False
    #: cores used by other processes during the fit (None: unknown)
    background: float | None = None

    @property
    def busy(self) -> bool:
        return self.background is not None and self.background > BUSY_CORES

    @property
    def step_ms(self) -> float | None:
        return statistics.median(self.steps) if self.steps else None


def _head_text(head: nn.Module) -> str:
    extra = head.extra_repr()
    return f"{type(head).__name__}" + (f"({extra})" if extra else "")


class _RandomImages(torch.utils.data.Dataset):
    """``{"input", "target", "index"}`` items: a small pool of random images, COCO-like targets."""

    def __init__(self, targets: Tensor, views: int, size: int, pool: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        shape = (pool, views, 3, size, size) if views > 1 else (pool, 3, size, size)
        self.images = torch.randn(*shape, generator=g)
        self.targets = targets

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input": self.images[i % self.images.shape[0]], "target": self.targets[i], "index": i}


def _train_one(name: str, views: int, args: argparse.Namespace, extra: dict[str, dict]) -> TrainRow:
    import lightning as L

    from mlcl.models.module import MLCLModule

    row = TrainRow(name, views)
    cls = get_loss_class(name)
    loss_cfg: dict[str, Any] = {
        "_target_": f"{cls.__module__}.{cls.__qualname__}",
        **extra["loss"].get(name, {}),
    }
    if name in extra["head"]:
        loss_cfg["head_kwargs"] = extra["head"][name]
    total = args.warmup + args.steps
    n = args.batch_size * total
    targets = coco_targets(n, args.num_classes, args.positives, args.seed)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    try:
        torch.manual_seed(args.seed)
        module = MLCLModule(
            backbone={"name": args.backbone, "pretrained": None},
            loss=loss_cfg,
            optimizer={"_target_": "torch.optim.AdamW", "lr": args.lr},
            scheduler={"name": "none"},
            num_classes=args.num_classes,
            num_samples=n,
            num_views=views,
            on_nonfinite="skip",
        )
        module.loss_fn.on_train_targets(targets)
        row.head = _head_text(module.head)
        fwd: list[float] = []
        starts: list[float] = []

        def before_loss(*_: Any) -> None:
            sync()
            starts.append(time.perf_counter())

        def after_loss(*_: Any) -> None:
            sync()
            fwd.append((time.perf_counter() - starts[-1]) * 1e3)

        module.loss_fn.register_forward_pre_hook(before_loss)
        module.loss_fn.register_forward_hook(after_loss)

        class StepTimer(L.Callback):
            def on_train_batch_start(self, *_: Any) -> None:
                sync()
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, *_: Any) -> None:
                sync()
                row.steps.append((time.perf_counter() - self.t0) * 1e3)

        data = _RandomImages(targets, views, args.image_size, pool=2 * args.batch_size, seed=args.seed)
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False, drop_last=True)
        trainer = L.Trainer(
            accelerator="gpu" if device.startswith("cuda") else "cpu",
            devices=[int(device.split(":")[1])] if device.startswith("cuda:") else 1,
            precision=args.precision,
            max_steps=total,
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[StepTimer()],
        )
        start = cpu_snapshot()
        trainer.fit(module, train_dataloaders=loader)
        row.background = background_load(start)
        row.skipped = int(module.skipped_steps)
    except Exception as err:
        row.error = f"{type(err).__name__}: {err}".replace("\n", " ")[:200]
        return row
    row.steps = row.steps[args.warmup :]
    row.loss_fwd = fwd[args.warmup :]
    return row


def train_table(rows: Sequence[TrainRow]) -> str:
    lines = [
        "| loss | views | head | median step (ms) | steps/s | loss forward (ms) | Δ step vs BCE (ms) "
        "| loss share of step | other load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    bce = {r.views: r.step_ms for r in rows if r.loss == "bce" and r.step_ms}
    for r in rows:
        label = r.loss + (" (baseline)" if r.baseline else "")
        if r.error or not r.step_ms:
            lines.append(
                f"| {label} | {r.views} | {_escape(r.head)} | error: {_escape(r.error or 'no steps')} "
                "| — | — | — | — | — |"
            )
            continue
        fwd = _fmt_ms(statistics.median(r.loss_fwd)) if r.loss_fwd else "—"
        base = bce.get(r.views)
        if base is None or r.loss == "bce":
            delta, share = ("0", "0 %") if r.loss == "bce" else ("—", "—")
        else:
            d = r.step_ms - base
            delta, share = f"{d:+.0f}", f"{100 * d / r.step_ms:+.0f} %"
        skipped = f" ({r.skipped} non-finite steps skipped)" if r.skipped else ""
        lines.append(
            f"| {label}{skipped} | {r.views} | {_escape(r.head)} | {_fmt_ms(r.step_ms)} | "
            f"{1e3 / r.step_ms:.2f} | {fwd} | {delta} | {share} | "
            + (
                "—"
                if r.background is None
                else f"{r.background:.2f}" + (" !" if r.background > BUSY_CORES else "")
            )
            + " |"
        )
    return "\n".join(lines)


def bench_train(argv: Sequence[str]) -> int:
    parser = _train_parser()
    args = parser.parse_args(argv)
    _check_device(parser, args.device)
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (64 if cuda else 8)
    args.steps = args.steps or (30 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (contrastive terms need two samples)")
    if not 0 < args.positives <= args.num_classes:
        parser.error(f"--positives must be in (0, num_classes={args.num_classes}], got {args.positives}")
    losses = _loss_list(parser, args.losses)
    extra = {"head": dict(args.head_kwargs), "loss": dict(args.loss_kwargs)}
    for kind, given in extra.items():
        bad = [n for n in given if n not in list_losses()]
        if bad:
            parser.error(f"--{kind}-kwargs for unknown loss(es) {', '.join(bad)}")
    try:
        import timm

        if not timm.is_model(args.backbone):
            parser.error(f"--backbone {args.backbone!r} is not a timm model name")
    except ImportError:
        parser.error("mlcl-bench train needs timm")
    torch.set_num_threads(args.threads)
    import lightning  # noqa: F401  (it sets its loggers to INFO on import; quieten them afterwards)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    started = time.perf_counter()
    budget = Budget(args.budget_s or None)
    info = machine_info(args.device)
    # BCE at every view count in use comes first: the baseline of the "share" columns
    views = {name: plugin_views(name) for name in losses}
    order = [("bce", v, views.get("bce") != v) for v in sorted(set(views.values()))]
    order += [(n, views[n], False) for n in losses if n != "bce"]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the first fit of a process pays one-time costs (fresh memory pages, kernel caches) that
        # would otherwise be charged to the BCE baseline
        _train_one("bce", 1, argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1}), extra)
        for name, v, baseline in order:
            row = None
            if budget.spent:
                rows.append(TrainRow(name, v, error=f"skipped: {budget.text()} spent", baseline=baseline))
                continue
            for _ in range(args.retries + 1):
                t0 = budget.elapsed()
                cand = _train_one(name, v, args, extra)
                busy = cand.background is not None and cand.background > BUSY_CORES
                if row is None or (busy, cand.step_ms or math.inf) < (row.busy, row.step_ms or math.inf):
                    row = cand
                print(
                    f"[mlcl-bench train] {name} (views {v}): {_fmt_ms(cand.step_ms or math.nan)} ms/step"
                    + (f" ({cand.error})" if cand.error else "")
                    + (f", other processes used {cand.background:.2f} cores" if busy else ""),
                    file=sys.stderr,
                    flush=True,
                )
                if not busy or cand.error or not budget.allows(2 * (budget.elapsed() - t0)):
                    break
            row.baseline = baseline
            rows.append(row)
    head = [
        "## mlcl-bench train: MLCLModule steps per loss",
        "",
        info,
        "",
        f"setup: backbone {args.backbone} (random init), {args.image_size}² random images, "
        f"B={args.batch_size} per view, C={args.num_classes}, "
        f"COCO-like targets (p={args.positives:g}/{args.num_classes}), "
        f"AdamW lr {args.lr:g}, precision {args.precision}, device {args.device}; median of {args.steps} "
        f"steps after {args.warmup} warm-up steps (forward, loss, backward and optimiser step; data loading "
        "excluded). Two-view losses get 2·B rows and are compared with BCE on the same 2·B rows. "
        "'loss forward' is the plugin call alone; 'Δ step vs BCE' is the whole extra cost of the loss "
        "(head, projector, key encoder, backward included); the share is Δ / step. Logit-only losses, whose "
        "forward takes well under 1 ms, show the run-to-run noise of a step. "
        "'other load' = cores used by other processes "
        f"during the run; runs above {BUSY_CORES} were repeated up to {args.retries} times and keep the "
        "least disturbed one (`!`: still disturbed).",
        "",
    ]
    custom = [f"{n}: head_kwargs {json.dumps(k)}" for n, k in extra["head"].items()]
    custom += [f"{n}: loss kwargs {json.dumps(k)}" for n, k in extra["loss"].items()]
    text = "\n".join(head) + "\n" + train_table(rows)
    if custom:
        text += "\n\nNon-default settings: " + "; ".join(custom)
    text += _footer(started, budget)
    _emit(text, args.out)
    return 0
