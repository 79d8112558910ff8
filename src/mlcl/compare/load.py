"""Loading runs: every ``metrics.json`` below a directory plus the resolved ``config.yaml`` beside it.

One row per run. Columns: the run's config flattened to dotted keys (``optimizer.lr``,
``loss.gamma_neg``), short aliases (``loss data backbone method seed missing_rate tag``), the
metrics (``test.mAP``, ``val.mAP``, ``best_val``, ``chance_mAP``, ``representation.*``), the
per-class test APs (``per_class.AP``: a ``{class: AP}`` dict) and ``run_dir``.

A ``metrics.json`` that has an ancestor directory (below the root) with its own ``metrics.json`` is
skipped: it is a stage sub-run of a job that reports for itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mlcl.compare.errors import CompareError
from mlcl.stage_share import is_shared_result

RESULT_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
# alias -> config key it reads (first one present wins), falling back to metrics.json's "run" block
ALIASES: dict[str, tuple[str, ...]] = {
    "loss": ("loss_name",),
    "data": ("data_name",),
    "backbone": ("backbone.name",),
    "method": ("method_name",),
    "seed": ("seed",),
    "missing_rate": ("missing.rate",),
    "tag": ("tag",),
}
METRIC_PREFIXES = ("test.", "val.", "representation.", "label_stats.", "selections.")
METRIC_KEYS = ("best_val", "chance_mAP")
META_KEYS = ("run_dir", "per_class.AP", "per_class.positives")


def is_metric(column: str) -> bool:
    """Whether a column holds a result (as opposed to a config setting)."""
    return column.startswith(METRIC_PREFIXES) or column in METRIC_KEYS


def config_columns(df: pd.DataFrame) -> list[str]:
    """The setting columns of a run table: config keys and aliases (not metrics or bookkeeping)."""
    return [c for c in df.columns if not is_metric(c) and c not in META_KEYS]


def metric_columns(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if is_metric(c))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}``; lists stay whole (as a hashable string)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not tree and prefix:
            out[prefix[:-1]] = "{}"
        return out
    key = prefix[:-1]
    out[key] = json.dumps(tree) if isinstance(tree, list | tuple) else tree
    return out


def find_results(root: Path) -> list[Path]:
    """Every top-level ``metrics.json`` below ``root`` (none nested inside another run's directory, none of a
    stage shared by a sweep's jobs)."""
    root = Path(root)
    # a stage trained once for several jobs of a sweep is part of those jobs, not a run of its own
    found = [p for p in sorted(root.rglob(RESULT_FILE)) if not is_shared_result(p.relative_to(root))]
    dirs = {p.parent for p in found}
    keep = []
    for path in found:
        ancestors = path.parent.parents
        # only ancestors strictly below the root count: the root itself may be one run
        nested = any(a in dirs for a in ancestors if a != root and root in a.parents)
        if not nested:
            keep.append(path)
    return keep


def _metrics(res: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for split in ("test", "val", "representation"):
        for k, v in (res.get(split) or {}).items():
            row[f"{split}.{k}"] = _num(v)
    for k in METRIC_KEYS:
        row[k] = _num(res.get(k))
    # test metrics of a stage's extra checkpoints (method yaml ``_select_``), e.g. selections.dev_loss.mAP
    for name, metrics in (res.get("selections") or {}).items():
        for k, v in (metrics or {}).items():
            if k != "checkpoint":
                row[f"selections.{name}.{k}"] = _num(v)
    per_class = res.get("per_class") or {}
    if per_class.get("AP"):
        row["per_class.AP"] = {str(k): _num(v) for k, v in per_class["AP"].items()}
        row["per_class.positives"] = dict(per_class.get("positives") or {})
    return row


def _settings(res: dict[str, Any], config: dict[str, Any] | None) -> dict[str, Any]:
    flat = flatten(config) if config else {}
    run = res.get("run") or {}
    row = dict(flat)
    for alias, keys in ALIASES.items():
        value = next((flat[k] for k in keys if k in flat), None)
        row[alias] = value if value is not None else run.get(alias)
    if not config:  # older runs without config.yaml: the run block is all there is
        for k, v in run.items():
            if k not in row and not isinstance(v, dict | list):
                row[k] = v
    return row


def load_runs(root: Path) -> pd.DataFrame:
    """One row per run below ``root`` (see the module docstring for the columns)."""
    root = Path(root)
    if not root.is_dir():
        raise CompareError(f"{root} is not a directory; point mlcl-compare at a run or sweep directory")
    rows: list[dict[str, Any]] = []
    for path in find_results(root):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CompareError(
                f"cannot read {path} ({err}); fix or move that file, then re-run mlcl-compare"
            ) from None
        cfg_path = path.parent / CONFIG_FILE
        config = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None
        row = _settings(res, config)
        row.update(_metrics(res))
        row["run_dir"] = str(path.parent)
        rows.append(row)
    if not rows:
        raise CompareError(
            f"no {RESULT_FILE} below {root}; point mlcl-compare at a run or sweep directory "
            "(e.g. multirun/<date>) whose runs finished"
        )
    return pd.DataFrame(rows)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
