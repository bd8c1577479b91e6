"""``zotune race``: run a grid of ``zotune train`` cells and report who reaches what first."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from zotune.errors import UserError

DESCRIPTION = """\
Run a grid of ordinary `zotune train` runs (tasks x optimizers x tuning modes x lr grid x seeds,
one budget) and report, per task: the test metric of the lr chosen by dev (mean ± std over seeds),
time and forwards to a target dev metric, peak memory, and curves (report.md, summary.json,
cells.csv, race.png in the race directory). Finished cells are skipped: rerun the same command
to resume a killed race.

examples:
  zotune race --suite lmbff-k16 --budget-preset quick --optimizers zosgd,zoadam,hizoo,adamw --output-dir runs/race
  zotune race --config race.yaml --output-dir runs/race --jobs 2
  zotune race --tasks sst2,rte --optimizers zosgd,hizoo --seeds 13,42 --steps 100 --eval-every 20 \\
              --lr zosgd=1e-2,3e-2 --set batch_size=8 --output-dir runs/race
  zotune race --tasks sst2 --seeds 13 --peft lora,full --optimizers zosgd,zoadam --forwards 200 \
              --lr '*=x10,x100,x1000' --output-dir runs/probe    # 10-1000x each mode's default lr
  zotune race --tasks sst2,rte --seeds 13,21,42 --peft lora,full --optimizers zosgd,zoadam --forwards 200 \
              --lr-from runs/probe --output-dir runs/race        # each at the lr the probe chose on dev
  zotune race --suite superglue-1k --budget-preset full --optimizers zosgd,hizoo --output-dir runs/sg \\
              --print-commands > cells.sh        # one command per cell, for a job array
  zotune race --collect runs/sg                  # the report from finished directories
  zotune race --collect runs/probe runs/race --report-dir runs/all   # several races in one report
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="race grid as YAML (keys: suite, budget_preset, model, tasks, optimizers, "
                                         "peft, seeds, steps|forwards|seconds, eval_every, lr, baselines, "
                                         "eval_every_forwards, icl_demonstrations, target, train)")
    parser.add_argument("--suite", help="a paper protocol: lmbff-k16 or superglue-1k")
    parser.add_argument("--budget-preset", choices=("quick", "full"), help="the suite's budget (default quick)")
    parser.add_argument("--model", help="model of every cell (default smollm2-135m)")
    parser.add_argument("--tasks", help="comma-separated task names")
    parser.add_argument("--optimizers", help="comma-separated optimizer names (adamw: first-order baseline); "
                                             "NAME:KEY=VALUE[:KEY=VALUE] races a variant, e.g. "
                                             "zosgd:layer_fraction=0.5")
    parser.add_argument("--peft", help="comma-separated tuning modes (default final_norm)")
    parser.add_argument("--seeds", help="comma-separated seeds (data seed and direction seed of each run)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="budget: optimizer steps per cell")
    budget.add_argument("--forwards", type=int, help="budget: forward passes per cell")
    budget.add_argument("--seconds", type=float, help="budget: seconds inside optimizer steps per cell")
    parser.add_argument("--eval-every", type=int, help="dev evaluation every N steps (the curves' resolution)")
    parser.add_argument("--eval-every-forwards", type=int,
                        help="dev evaluation every N forwards, converted per optimizer to steps (FZOO: 9 forwards "
                             "a step, ZO-SGD 2), so that every curve is sampled at the same forwards")
    parser.add_argument("--lr", action="append", default=[], metavar="OPT=LR[,LR...]",
                        help="lr grid of one optimizer (repeatable; default: the documented grid); OPT * for "
                             "every optimizer without its own; xF for F times the optimizer's default lr of "
                             "the cell's mode, e.g. --lr '*=x10,x100'")
    parser.add_argument("--lr-from", metavar="DIR",
                        help="each optimizer and mode at the lr an earlier race (a probe) chose on dev: its "
                             "directory or summary.json (an --lr of an optimizer still wins)")
    parser.add_argument("--baselines", help="comma-separated: zeroshot, icl (with zeroshot, trained cells skip "
                        "their own evaluation before training)")
    parser.add_argument("--icl-demonstrations", type=int, help="solved examples in the ICL baseline's prompt")
    parser.add_argument("--target", help="time-to-target goal: an optimizer (its mean dev; default zosgd) or a number")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other `zotune train` option for every cell, e.g. --set batch_size=8 (repeatable)")
    parser.add_argument("--output-dir", help="the race directory (cells/, logs/, report)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run in parallel (default 1)")
    parser.add_argument("--threads", type=int, help="threads per cell (default: the cores split between --jobs)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the cells one after another in this process (no start-up cost per cell; "
                             "peak memory is then the race's, not each cell's)")
    parser.add_argument("--print-commands", action="store_true",
                        help="print one `zotune train` command per cell and exit (nothing runs)")
    parser.add_argument("--collect", metavar="DIR", nargs="+",
                        help="only build the report from the finished runs under DIR (several: one report "
                             "of them all, e.g. a probe and its race; a run found twice counts once)")
    parser.add_argument("--report-dir", help="where --collect writes the report (default: DIR; needed for several)")


def spec_from_args(args: argparse.Namespace):
    from zotune.config import load_config_file, parse_key_values
    from zotune.race.grid import build_spec

    file_values = load_config_file(args.config) if args.config else {}
    lr: dict[str, Any] = {}
    for item in args.lr:
        if "=" not in item:
            raise UserError(f"--lr expects OPTIMIZER=LR[,LR...], got {item!r}")
        name, values = item.rsplit("=", 1)  # the name may be a variant: zosgd:layer_fraction=0.5=1e-4
        try:  # xF (F times the mode's default lr) stays a string: the grid's check reads it
            lr[name.strip()] = [v.strip() if v.strip().lower().startswith("x") else float(v)
                                for v in values.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--lr {item!r}: learning rates must be numbers, or xF for F times the mode's "
                            "default lr") from None
    train = parse_key_values(args.set, "--set")
    flags = {"suite": args.suite, "budget_preset": args.budget_preset, "model": args.model, "tasks": args.tasks,
             "optimizers": args.optimizers, "peft": args.peft, "seeds": args.seeds, "steps": args.steps,
             "forwards": args.forwards, "seconds": args.seconds, "eval_every": args.eval_every,
             "eval_every_forwards": args.eval_every_forwards,
             "baselines": args.baselines, "icl_demonstrations": args.icl_demonstrations, "target": args.target,
             "lr": {**(file_values.get("lr") or {}), **lr} if lr else None,
             "train": {**(file_values.get("train") or {}), **train} if train else None}
    spec = build_spec(file_values, flags)
    if args.lr_from:  # an explicit --lr (or the YAML's lr:) of an optimizer wins over the probe's
        from zotune.race.grid import lrs_from_probe

        probe, evidence = lrs_from_probe(spec, Path(args.lr_from))  # only the optimizers without an lr
        spec.lr = {**probe, **spec.lr}
        spec.lr_probe = {key: v for name in probe for key, v in evidence[name].items()}
    return spec


def run(args: argparse.Namespace) -> int:
    from zotune.race.report import write_report
    from zotune.race.runner import print_commands, run_cells

    if args.collect:
        target = _target(args.target)
        summary = write_report([Path(d) for d in args.collect], Path(args.report_dir) if args.report_dir else None,
                               target)
        where = args.report_dir or args.collect[0]
        print(f"zotune race: report of {len(summary['rows'])} rows in {where}/report.md", file=sys.stderr)
        return 0
    if not args.output_dir:
        raise UserError("give the race directory with --output-dir (or --collect DIR for a report)")
    spec = spec_from_args(args)
    race_dir = Path(args.output_dir)
    if args.jobs < 1:
        raise UserError("--jobs must be >= 1")
    if args.print_commands:
        print_commands(spec, race_dir, args.threads)
        return 0
    failed = run_cells(spec, race_dir, jobs=args.jobs, threads=args.threads, in_process=args.in_process,
                       say=lambda m: print(m, file=sys.stderr, flush=True))
    summary = write_report(race_dir)
    cpu = summary.get("cpu_seconds_total")
    print(f"zotune race: report in {race_dir}/report.md"
          + (f" (cells' CPU time so far: {cpu / 60:.1f} min, user + sys)" if cpu is not None else ""),
          file=sys.stderr)
    if failed:
        print(f"zotune race: {len(failed)} cells failed: {', '.join(failed)} (logs in {race_dir}/logs)",
              file=sys.stderr)
        return 1
    return 0


def _target(value: str | None) -> str | float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        from zotune.train import resolve_optimizer

        resolve_optimizer(value)
        return value
