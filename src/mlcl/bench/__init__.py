"""``mlcl-bench``: speed and memory of every registered loss plugin, of real training steps, and of the
whole training loop.

    python -m mlcl.bench                      # one row per loss + a batch-size scaling table
    python -m mlcl.bench --losses kmcl,clml --device cuda --out bench.md
    python -m mlcl.bench train                # a few MLCLModule steps per loss (timm resnet18, 224²)
    python -m mlcl.bench loop                 # mlcl's training loop against a bare PyTorch loop

Modules: ``cases`` (inputs of each loss row), ``measure`` (timing, background load, memory), ``budget``
(the total wall-time budget), ``report`` (references, targets, tables), ``cli``/``cli_args`` (the loss
table command), ``train_step`` (``train``), ``loop``/``loop_cli`` (``loop``), ``load`` (background load).
"""

from mlcl.bench.budget import Budget
from mlcl.bench.cases import SPEC_CASES, Case, Setup, cases_for, coco_targets
from mlcl.bench.cli import main
from mlcl.bench.measure import Row, run_case

__all__ = ["SPEC_CASES", "Budget", "Case", "Row", "Setup", "cases_for", "coco_targets", "main", "run_case"]
