"""``mlcl-bench`` command line: the loss table (default), ``train`` and ``loop`` subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence

import torch

from mlcl import cli
from mlcl.bench.budget import Budget
from mlcl.bench.cases import _DTYPES, SCALING_LOSSES, Setup, cases_for, coco_targets
from mlcl.bench.cli_args import _check_device, _common, _int_list, _loss_list, _nonneg_int, _positive_int
from mlcl.bench.measure import _CASE_MARK, _RETRY_MAX_S, BUSY_CORES, Row, _measure_row, run_case
from mlcl.bench.report import _emit, _footer, _notes, machine_info, main_table, scaling_table

#: default total wall time of one ``mlcl-bench`` run (loss and scaling tables; ~3 min on an idle 2-core CPU)
DEFAULT_BUDGET_S = 300.0


def _loss_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlcl-bench",
        description="Forward+backward time and extra peak memory of every registered loss "
        "(subcommand `train`: real training steps per loss; see `mlcl-bench train -h`).",
    )
    _common(p)
    p.add_argument("--batch-size", type=_positive_int, default=64, help="B (default 64)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32", help="input dtype (default float32)")
    p.add_argument("--calls", type=_positive_int, default=20, help="timed calls per row (default 20)")
    p.add_argument("--warmup", type=_nonneg_int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--feature-dim", type=_positive_int, default=2048, help="backbone width F (default 2048)")
    p.add_argument("--kmcl-aniso-dim", type=_positive_int, default=128, help="KMCL anisotropic D (128)")
    p.add_argument("--kmcl-iso-dim", type=_positive_int, default=2048, help="KMCL isotropic D (2048)")
    p.add_argument("--kmcl-chunk", type=_positive_int, default=None, help="KMCL anchor entries per chunk")
    p.add_argument("--clml-dim", type=_positive_int, default=2048, help="CLML feature width (2048)")
    p.add_argument("--mulcon-dim", type=_positive_int, default=128, help="MulCon projector width d (128)")
    p.add_argument("--supcon-dim", type=_positive_int, default=128, help="SupCon feature width (128)")
    p.add_argument("--mulsupcon-dim", type=_positive_int, default=128, help="MulSupCon feature width (128)")
    p.add_argument("--queue", type=_nonneg_int, default=256, help="MulSupCon queued keys (256)")
    p.add_argument(
        "--epoch", type=_nonneg_int, default=1, help="ctx.epoch (default 1: epoch-gated corrections are on)"
    )
    p.add_argument(
        "--via",
        choices=("spec", "plugin"),
        default="spec",
        help="spec: time KMCL/CLML/MulCon/SupCon/MulSupCon as the specs did (pure loss functions); "
        "plugin: time every row through its plugin (default spec)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument(
        "--memory",
        choices=("subprocess", "inprocess", "none"),
        default="subprocess",
        help="CPU memory: fresh subprocess per case (default), in this process (approximate), or none",
    )
    p.add_argument(
        "--retries",
        type=_nonneg_int,
        default=2,
        help=f"time a row again up to N times while other processes use > {BUSY_CORES} cores (default 2)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="total wall-time budget in seconds: no retries once it is short, rows left when it is spent "
        f"are marked skipped (default {DEFAULT_BUDGET_S:g}; 0 = unlimited)",
    )
    p.add_argument("--no-scaling", action="store_true", help="skip the batch-size scaling table")
    p.add_argument(
        "--no-diagnostics", action="store_true", help="skip the representation diagnostics table (10k rows)"
    )
    p.add_argument(
        "--scaling-batches",
        type=_int_list,
        default=[64, 256, 1024],
        help="B of the scaling table (64,256,1024)",
    )
    p.add_argument("--scaling-calls", type=_positive_int, default=5, help="timed calls per scaling row (5)")
    p.add_argument("--scaling-warmup", type=_nonneg_int, default=1, help="warm-up calls per scaling row (1)")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    return p


def _bench_losses(argv: Sequence[str]) -> int:
    parser = _loss_parser()
    args = parser.parse_args(argv)
    if args._case is not None:
        spec = json.loads(args._case)
        torch.set_num_threads(int(spec["threads"]))
        res = run_case(spec["key"], Setup(**spec["setup"]))
        print(_CASE_MARK + json.dumps(res), flush=True)
        return 0
    _check_device(parser, args.device)
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (contrastive terms need two samples)")
    if not 0 < args.positives <= args.num_classes:
        parser.error(f"--positives must be in (0, num_classes={args.num_classes}], got {args.positives}")
    losses = _loss_list(parser, args.losses)
    memory = "none" if args.no_memory else args.memory
    torch.set_num_threads(args.threads)
    setup = Setup(
        batch=args.batch_size,
        classes=args.num_classes,
        positives=args.positives,
        feature_dim=args.feature_dim,
        kmcl_aniso_dim=args.kmcl_aniso_dim,
        kmcl_iso_dim=args.kmcl_iso_dim,
        kmcl_chunk=args.kmcl_chunk,
        clml_dim=args.clml_dim,
        mulcon_dim=args.mulcon_dim,
        supcon_dim=args.supcon_dim,
        mulsupcon_dim=args.mulsupcon_dim,
        queue=args.queue,
        epoch=args.epoch,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        via=args.via,
    )
    started = time.perf_counter()
    budget = Budget(args.budget_s or None)
    y = coco_targets(setup.batch, setup.classes, setup.positives, setup.seed)
    mem_how = {
        "subprocess": "growth of peak RSS over one fwd+bwd, fresh subprocess per case "
        "(MALLOC_MMAP_THRESHOLD_=0, peak reset via /proc/self/clear_refs), after 2 warm-up calls",
        "inprocess": "growth of peak RSS over one fwd+bwd in this process (approximate)",
        "none": "not measured",
    }[memory]
    if setup.device.startswith("cuda") and memory != "none":
        mem_how = "torch.cuda.max_memory_allocated above the allocation before one fwd+bwd"
    head = [
        "## mlcl-bench: loss forward + backward",
        "",
        machine_info(setup.device),
        "",
        f"setup: B={setup.batch}, C={setup.classes}, device {setup.device}, dtype {setup.dtype}, "
        f"COCO-like targets (Bernoulli p={setup.positives:g}/{setup.classes}, ≥ 1 positive per row; "
        f"{float(y.sum()) / setup.batch:.2f} positives/row drawn), seed {setup.seed}, "
        f"ctx.epoch {setup.epoch}; "
        f"time = median of {args.calls} calls after {args.warmup} warm-up calls"
        + (" (fewer than the 20 the specs used)" if args.calls < 20 else "")
        + f"; extra peak memory = {mem_how}.",
        "",
        "Rows marked `plugin` are timed as `plugin(outputs, targets, ctx)` on the outputs of the plugin's "
        f"own head applied to |N(0,1)| backbone features of width F={setup.feature_dim} (head outside the "
        "timer, plugin parameters included in the backward). Speed-ups are against the fastest reference "
        "run the spec lists and are only computed where the row matches the spec's setting. 'other load' = "
        "cores used by other processes (incl. hypervisor steal) while the row was timed, from /proc/stat; "
        f"rows above {BUSY_CORES} were timed again up to {args.retries} times (if an attempt took at most "
        f"{_RETRY_MAX_S:g} s and the time budget allowed) and keep the least disturbed attempt, "
        f"`!` marks rows that stayed disturbed; {budget.text().split(' (')[0]}. "
        "Targets are for the 2-core CPU"
        + ("" if args.threads == 2 else f" (this run: threads={args.threads})")
        + ".",
        "",
    ]
    rows = [
        _measure_row(c, setup, args.calls, args.warmup, memory, args.threads, args.retries, budget)
        for c in cases_for(losses, setup)
    ]
    text = "\n".join(head) + "\n" + main_table(rows)
    notes = _notes(rows)
    scaled: list[Row] = []
    scaling_names = [n for n in SCALING_LOSSES if n in losses]
    if not args.no_scaling and scaling_names:
        done = {r.case.key: r for r in rows if r.error is None}
        for case in cases_for(scaling_names, setup):
            for b in args.scaling_batches:
                if b == setup.batch and case.key in done:  # measured above, with more calls
                    scaled.append(done[case.key])
                    continue
                s_b = dataclasses.replace(setup, batch=b)
                (case_b,) = [c for c in cases_for([case.loss], s_b) if c.key == case.key]
                scaled.append(
                    _measure_row(
                        case_b,
                        s_b,
                        args.scaling_calls,
                        args.scaling_warmup,
                        memory,
                        args.threads,
                        args.retries,
                        budget,
                    )
                )
        text += (
            "\n\n### Scaling with the (gathered) batch size\n\n"
            f"Same inputs at B ∈ {{{', '.join(map(str, args.scaling_batches))}}}; median of "
            f"{args.scaling_calls} calls after {args.scaling_warmup} warm-up (rows at B={setup.batch} are "
            "those of the table above). MulCon contrasts only the "
            "P ≈ 2.9·B positive entries (never a (B·C)² matrix); KMCL evaluates Bhattacharyya terms for "
            "anchor entries only, in chunks of ~4M-element temporaries (`--kmcl-chunk` bounds them further)."
            "\n\n" + scaling_table(scaled)
        )
        notes += _notes(scaled)
    if not args.no_diagnostics:
        text += "\n\n" + diagnostics_table(setup.device, budget)
    if notes:
        text += "\n\nNotes (`~` = measured in this process, approximate):\n" + "\n".join(dict.fromkeys(notes))
    text += _footer(started, budget)
    _emit(text, args.out)
    return 0


# what the diagnostics take on 10k rows, idle 2-core CPU: about 20 s (most of it retrieval over all rows)
_DIAGNOSTICS_COST_S = 30.0


def diagnostics_table(device: str, budget: Budget) -> str:
    """The representation diagnostics (``diagnostics=embeddings``) timed on 10k synthetic test rows, or a
    line saying they were skipped when the time budget has no room left for them."""
    head = "### Representation diagnostics (`diagnostics=embeddings`, 10,000 test rows)\n\n"
    if not budget.allows(_DIAGNOSTICS_COST_S):
        return head + f"skipped: {budget.text()} leaves no room for them (about {_DIAGNOSTICS_COST_S:g} s)"
    from mlcl.diagnostics.bench import bench_rows

    rows = bench_rows(device=device)
    lines = ["| diagnostic | inputs | wall time (s) |", "|---|---|---:|"]
    lines += [f"| {r['name']} | {r['shape']} | {r['seconds']:.2f} |" for r in rows]
    return head + "\n".join(lines)


@cli.guard
def main(argv: Sequence[str] | None = None) -> int:
    """``mlcl-bench [options]`` (loss table), ``mlcl-bench train [options]`` (training steps per loss) or
    ``mlcl-bench loop [options]`` (the whole training loop against a bare PyTorch loop)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from mlcl.bench.train_step import bench_train

        return bench_train(argv[1:])
    if argv and argv[0] == "loop":
        from mlcl.bench.loop_cli import bench_loop

        return bench_loop(argv[1:])
    if argv and argv[0] == "losses":
        argv = argv[1:]
    return _bench_losses(argv)
