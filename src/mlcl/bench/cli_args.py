"""Argument types and options shared by the ``mlcl-bench`` subcommands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from mlcl.losses.base import list_losses


def _int_at_least(text: str, minimum: int, what: str) -> int:
    """``text`` as an integer >= ``minimum``; ``what`` names the kind in the argparse error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _nonneg_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes >= 2, got {text!r}")
    return values


def _loss_list(parser: argparse.ArgumentParser, text: str | None) -> list[str]:
    valid = list_losses()
    if text is None or text.strip() in ("", "all"):
        return valid
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        parser.error(f"unknown loss(es) {', '.join(unknown)}; registered losses: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--losses", default=None, help="comma-separated registry names (default: all)")
    parser.add_argument("--num-classes", type=_positive_int, default=80, help="C (default 80)")
    parser.add_argument(
        "--positives", type=float, default=2.9, help="mean positives per target row (default 2.9, COCO)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
