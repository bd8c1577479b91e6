"""``zotune bench step``: step time against 2 forwards and peak memory against inference.

On a randomly initialised OPT-shaped causal LM (no weights are downloaded) and a batch of
random token ids, one interleaved run measures

* **F**, the time of one forward pass returning the causal-LM loss (``inference_mode``,
  eval mode, dropout 0);
* the step time of every registered optimizer (with its own default z: Gaussian, FZOO
  Rademacher; both for ZO-SGD, or for all with ``--distribution both``), printed as ``step / (forwards_per_step * F)``,
  ``step / 2F`` and relative to ZO-SGD's step with the same distribution;
* the step time of **MeZO's reference code** (:class:`NaiveMeZO`: ``torch.manual_seed``,
  per-parameter ``torch.normal``, out-of-place ``p.data = p.data + s * z * eps``, a separate
  update pass), so the table shows the speed-up over it;
* unless ``--no-passes``: the cost P of one perturbation pass over all parameters (the
  engine's ``_displace`` for each distribution, and MeZO's reference pass), as P/F.

Each round runs every case once in a shuffled order; ratios are per round (against the F
measured in the same round) and the medians over rounds are printed. Every sample also
records how many cores other processes used meanwhile (the "load" columns), because the
machine may be shared: read ratios taken under load > 0.3 cores with care.

Peak memory is measured in a **fresh subprocess per case** (``python -m zotune.bench.step
--memory-case CASE``): it imports torch and transformers, builds the model, resets the
peak RSS (``VmHWM``, by writing 5 to ``/proc/self/clear_refs``), runs 2 forwards (inference)
or 2 optimizer steps, and reports ``VmHWM``. glibc's mmap threshold is pinned at its default
128 KiB there (``MALLOC_MMAP_THRESHOLD_``; ``--malloc-default`` leaves it dynamic), so that freed
large blocks go back to the OS and identical runs give the same peak to ~1 MB (with the dynamic
threshold they scatter by 50-200 MB on opt-125m). The table shows the peak above the
import-only baseline relative to inference's, and the extra memory of each method
(step peak - inference peak) as a multiple of the fp32 parameter bytes, next to the number
of parameter-sized state buffers the method declares.

The code is split by concern: :mod:`zotune.bench.step_model` (shapes, model, batch, MeZO's
reference step), :mod:`zotune.bench.step_cases` (the rows), :mod:`zotune.bench.step_timing`
and :mod:`zotune.bench.step_memory`; this module holds the CLI, the targets and the report.
An optimizer that raises is recorded in its row and makes the run exit with status 1.

Example::

    zotune bench step --model-shape opt-125m --batch 16x64 --rounds 3 --json step.json
    zotune bench step --model-shape tiny --rounds 1 --no-memory
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from zotune.bench._common import DASH, find_optimizer, fmt, machine_info, markdown_table, module_main, write_json
from zotune.bench.step_cases import (
    NAIVE,
    REFERENCE,
    Case,
    declared_state,
    make_runner,
    select_cases,
    state_bytes,
)
from zotune.bench.step_memory import MEMORY_MARK, MMAP_THRESHOLD, measure_memory, memory_case, run_memory_subprocess
from zotune.bench.step_model import SHAPES, NaiveMeZO, build_model, make_batch, make_closure, param_count
from zotune.bench.step_timing import CLEAN_LOAD, time_cases
from zotune.errors import UserError

#: re-exported: the pieces of the benchmark, importable from here as before the split
__all__ = [
    "CLEAN_LOAD",
    "MEMORY_MARK",
    "MMAP_THRESHOLD",
    "NAIVE",
    "REFERENCE",
    "SHAPES",
    "Case",
    "NaiveMeZO",
    "add_arguments",
    "build_model",
    "evaluate_targets",
    "format_report",
    "main",
    "make_batch",
    "make_closure",
    "make_runner",
    "measure_memory",
    "memory_case",
    "param_count",
    "run",
    "run_benchmark",
    "run_memory_subprocess",
    "select_cases",
    "state_bytes",
    "time_cases",
]

DESCRIPTION = __doc__.split("\n\n")[0]

#: (what, value key, limit, case key) -- the targets of the performance issues (opt-125m, 16x64)
TARGETS: list[tuple[str, str, float, str]] = [
    ("ZO-SGD Gaussian step / 2F", "step_over_2F", 1.4, "ZOSGD/gaussian"),
    ("ZO-SGD Rademacher step / 2F", "step_over_2F", 1.15, "ZOSGD/rademacher"),
    ("ZO-SGD Gaussian peak / inference peak", "peak_over_inference", 1.02, "ZOSGD/gaussian"),
    ("ZO-SGD layer_fraction=0.25 Gaussian step / 2F", "step_over_2F", 1.05, "ZOSGD[layer_fraction=0.25]/gaussian"),
    ("ZO-SGD lazy Gaussian step / 2F", "step_over_2F", 1.15, "ZOSGD[lazy_update=True]/gaussian"),
    ("ZO-SGD lazy Rademacher step / 2F", "step_over_2F", 1.06, "ZOSGD[lazy_update=True]/rademacher"),
    ("ZO-SGD lazy layer_fraction=0.25 Gaussian step / 2F", "step_over_2F", 1.05,
     "ZOSGD[layer_fraction=0.25,lazy_update=True]/gaussian"),
    ("HiZOO step / ZO-SGD step", "vs_reference", 1.35, "HiZOO/gaussian"),
    ("HiZOO hessian_every=2 step / ZO-SGD step", "vs_reference", 1.35, "HiZOO[hessian_every=2]/gaussian"),
    ("HiZOO optimizer state (x params, exact)", "state_params", 1.0, "HiZOO/gaussian"),
    ("HiZOO extra memory (x params)", "extra_params", 1.0, "HiZOO/gaussian"),
    ("HiZOO-L extra memory (x params)", "extra_params", 0.05, "HiZOOLowRank/gaussian"),
]




# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="opt-125m",
                        help="OPT shape to build with random weights (default: opt-125m)")
    parser.add_argument("--batch", default="16x64", metavar="BxS",
                        help="batch size x sequence length of random token ids (default: 16x64)")
    parser.add_argument("--optimizers", nargs="+", metavar="NAME", default=None,
                        help="optimizer names or aliases (default: every registered one); "
                             f"{REFERENCE} is always timed as the reference")
    parser.add_argument("--distribution", choices=("gaussian", "rademacher", "both"), default=None,
                        help="z distribution of every method (default: each method's own, Gaussian unless "
                             "it says otherwise, plus both for ZO-SGD)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write every figure to this JSON file")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-reps", type=int, default=1,
                        help="fresh processes per memory case; the median peak is used (default: 1)")
    parser.add_argument("--memory-jobs", type=int, default=1,
                        help="memory subprocesses run at once (peaks are per process, so this is safe; "
                             "default: 1)")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's dynamic mmap threshold in the memory subprocesses (by default it "
                             "is pinned at 128 KiB via MALLOC_MMAP_THRESHOLD_ so that peaks are reproducible)")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure only peak memory (no timing; memory does not depend on the load)")
    parser.add_argument("--no-passes", action="store_true", help="skip timing single perturbation passes")
    parser.add_argument("--no-naive", action="store_true", help="skip MeZO's reference code")
    parser.add_argument("--lazy", choices=("reference", "all", "none"), default="reference",
                        help="which methods that support lazy_update also get a lazy row (2 passes per step; "
                             "each on its own copy of the model): ZO-SGD (default), all, none")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                        help=f"before each round wait up to this long for other processes to use < "
                             f"{CLEAN_LOAD} cores (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, batch and shuffles")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-steps", type=int, default=2, help=argparse.SUPPRESS)


def parse_batch(text: str) -> tuple[int, int]:
    """``"16x64"`` -> ``(16, 64)``."""
    try:
        b, s = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--batch must look like 16x64 (batch x sequence length), got {text!r}") from None
    if b < 1 or s < 1:
        raise UserError(f"--batch sizes must be positive, got {text!r}")
    return b, s



# ---------------------------------------------------------------------- report
def evaluate_targets(rows: dict[str, dict[str, Any]], applies: bool = True) -> list[dict[str, Any]]:
    """The issue's targets against the measured rows.

    ``met`` is ``None`` where a value was not measured or the targets do not apply (they are
    defined for the opt-125m shape at batch 16x64).
    """
    out = []
    for what, key, limit, case_key in TARGETS:
        name, _, variant = case_key.split("/")[0].partition("[")
        cls_name = find_optimizer(name)
        row = rows.get(f"{cls_name}{'[' + variant if variant else ''}/{case_key.split('/')[1]}") if cls_name else None
        value = row.get(key) if row else None
        out.append({"target": what, "limit": limit, "value": value, "applies": applies,
                    "met": None if value is None or not applies else bool(value <= limit)})
    return out


def format_report(result: dict[str, Any]) -> str:
    """The readable tables printed at the end of a run."""
    cfg, timing = result["config"], result["timing"]
    mem = result.get("memory") or {}
    f = timing["forward"]["median_s"]
    lines = [
        f"zotune bench step: {cfg['model_shape']} ({cfg['params']:,} parameters, "
        f"{cfg['param_bytes'] / 2**20:.1f} MiB fp32), batch {cfg['batch']}x{cfg['seq']}, "
        f"{cfg['threads']} threads, {cfg['rounds']} rounds",
        f"{result['machine']['cpu']}, torch {result['machine']['torch']}",
        f"F (one forward) = {fmt(f, '.3f')} s (median of rounds; other processes used "
        f"{fmt(timing['forward']['other_load_median'], '.2f')} cores during forwards; "
        f"{timing['forward'].get('clean_rounds', 0)}/{cfg['rounds']} rounds clean)",
        "",
    ]
    headers = ["method", "z", "fwd", "state", "passes", "step s", "step/kF", "step/2F", "vs ZO-SGD",
               "x faster than MeZO ref", "peak/inf", "extra xP", "state xP", "overhead MB", "load", "clean"]
    rows = []
    for row in result["rows"]:
        t = row.get("timing") or {}
        m = row.get("memory") or {}
        name = row.get("name", row["optimizer"])
        if row.get("error") and not t:
            rows.append([name, row["distribution"][:5], fmt(row["forwards_per_step"], ".3g"),
                         len(row["state_buffers"]), DASH, "FAILED: " + row["error"][:60], *([DASH] * 10)])
            continue
        rows.append([
            name, row["distribution"][:5], fmt(row["forwards_per_step"], ".3g"), len(row["state_buffers"]),
            fmt(t.get("passes_per_step"), ".2f"), fmt(t.get("step_s"), ".2f"), fmt(t.get("step_over_kF"), ".2f", "x"),
            fmt(t.get("step_over_2F"), ".2f", "x"), fmt(t.get("vs_reference"), ".2f", "x"),
            fmt(t.get("speedup_vs_naive"), ".2f", "x"), fmt(m.get("peak_over_inference"), ".3f", "x"),
            fmt(m.get("extra_params"), ".3f"), fmt(m.get("state_params"), ".3f"), fmt(m.get("overhead_mb"), ".1f"),
            fmt(t.get("other_load_median"), ".2f"), f"{t.get('clean_rounds', 0)}/{cfg['rounds']}",
        ])
    lines.append(markdown_table(headers, rows))
    lines += [
        "",
        "fwd: forwards per step (k); state: parameter-sized buffers the method declares; passes: sweeps over "
        "the weights per timed step (3 for an eager ZO-SGD step, 2 with lazy_update); step/kF and "
        "step/2F: step time over k or 2 forwards of the same round; vs ZO-SGD: step time over ZO-SGD's "
        "(same z); peak/inf: peak RSS above the import baseline over inference's; extra xP: (step peak - "
        "inference peak) / fp32 parameter bytes; state xP: bytes of the optimizer's state tensors and cached "
        "factors / parameter bytes (exact); overhead MB: extra memory beyond that state (noise buffers, block "
        "temporaries, allocator); load: cores other processes used meanwhile (median); "
        f"clean: rounds in which the step and the forwards ran with other load < {CLEAN_LOAD} cores (ratios "
        "use only those when there are at least two).",
    ]
    if timing.get("passes"):
        lines += ["", "One perturbation pass over all parameters (P):", ""]
        lines.append(markdown_table(
            ["pass", "P s", "P/F", "ns/param", "load", "clean"],
            [[k, fmt(v["pass_s"], ".3f"), fmt(v["pass_over_F"], ".3f"), fmt(v["ns_per_param"], ".2f"),
              fmt(v["other_load_median"], ".2f"), f"{v.get('clean_rounds', 0)}/{cfg['rounds']}"]
             for k, v in timing["passes"].items()]))
    if mem:
        base, inf = mem["import"].get("peak_mb"), mem["inference"].get("peak_mb")
        lines += ["", f"Peak RSS: import baseline (torch, transformers' OPT, zotune) {fmt(base, '.0f')} MB, inference "
                      f"{fmt(inf, '.0f')} MB ({fmt(None if base is None or inf is None else inf - base, '.0f')} "
                      f"MB above import); parameters {mem['param_mb']:.1f} MiB"]
    applies = all(t.get("applies", True) for t in result["targets"])
    lines += ["", "Targets (issue; defined for opt-125m at 16x64" + ("" if applies else ": not applicable here") + "):",
              ""]
    lines.append(markdown_table(
        ["target", "limit", "measured", "met"],
        [[t["target"], f"{t['limit']:g}", fmt(t["value"], ".3f"),
          ("n/a" if not t.get("applies", True) else DASH) if t["met"] is None else ("yes" if t["met"] else "no")]
         for t in result["targets"]]))
    passes = timing.get("passes", {}).get(f"{REFERENCE}/gaussian")
    if passes and f == f:
        p = passes["pass_s"]
        lines += ["", f"Floor of a 3-forward method with ZO-SGD's three passes: (3F + 3P) / (2F + 3P) = "
                      f"{(3 * f + 3 * p) / (2 * f + 3 * p):.2f}x ZO-SGD's step (F = {f:.3f} s, Gaussian P = {p:.3f} s)"]
    return "\n".join(lines)


def construct(cases: list[Case], model: torch.nn.Module, seed: int, log: Callable[[str], None] = print,
              batch: dict[str, torch.Tensor] | None = None) -> None:
    """Build every case's optimizer; one that raises gets ``case.error`` (the run then fails).

    A lazy row gets its own copy of the model (and a closure on it) when ``batch`` is given.
    """
    for c in cases:
        try:
            own = model
            if c.lazy and batch is not None:
                own = copy.deepcopy(model)
                c.closure = make_closure(own, batch)
            c.runner = make_runner(c, own, seed)
            c.state_buffers = declared_state(c.runner, c)
            c.forwards_per_step = getattr(c.runner, "forwards_per_step", c.forwards_per_step)  # options may change it
        except Exception as e:  # recorded in the row; run() turns any error row into a failed run
            c.error = f"construction failed: {type(e).__name__}: {e}"
            log(f"  {c.key}: {c.error}")


def failures(result: dict[str, Any]) -> list[str]:
    """Every optimizer that raised (construction, warm-up step or memory subprocess): defects, not skips."""
    out = [f"{row['key']}: {row['error']}" for row in result["rows"] if row.get("error")]
    for row in result["rows"]:
        mem = row.get("memory") or {}
        if "error" in mem:
            out.append(f"{row['key']} (memory subprocess): {mem['error']}")
    return out


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole benchmark and return the result dictionary (also written by ``--json``)."""
    batch, seq = parse_batch(args.batch)
    torch.set_num_threads(max(1, int(args.threads)))
    if args.rounds < 1:
        raise UserError("--rounds must be >= 1")
    if args.memory_only and args.no_memory:
        raise UserError("--memory-only and --no-memory exclude each other")
    cases = select_cases(args.optimizers, args.distribution, naive=not args.no_naive, lazy=args.lazy)
    model = build_model(args.model_shape, args.seed)
    batch_t = make_batch(model.config.vocab_size, batch, seq, args.seed + 1)
    closure = make_closure(model, batch_t)
    n = param_count(model)
    log(f"zotune bench step: {args.model_shape}, {n:,} parameters, batch {batch}x{seq}, "
        f"{torch.get_num_threads()} threads; cases: {', '.join(c.key for c in cases)}")
    construct(cases, model, args.seed, log, batch=batch_t)
    if args.memory_only:
        timing: dict[str, Any] = {"forward": {"median_s": float("nan"), "other_load_median": float("nan")},
                                  "cases": {}, "passes": {}, "rounds": []}
    else:
        timing = time_cases(model, closure, cases, rounds=args.rounds, passes=not args.no_passes,
                            quiet_wait=args.quiet_wait, seed=args.seed, log=log)
    for c in cases:
        c.runner = c.closure = None  # free optimizer state (and lazy rows' model copies) before the memory subprocesses
    gc.collect()
    memory = None if args.no_memory else measure_memory(cases, args, 4 * n, log=log)
    rows = []
    flat: dict[str, dict[str, Any]] = {}
    for c in cases:
        t = timing["cases"].get(c.key)
        m = (memory or {}).get("cases", {}).get(c.key) if memory else None
        rows.append({"key": c.key, "name": c.name, "optimizer": c.optimizer, "options": c.options,
                     "distribution": c.distribution,
                     "forwards_per_step": c.forwards_per_step, "state_buffers": list(c.state_buffers),
                     "summary": c.summary, "error": c.error, "timing": t, "memory": m})
        flat[c.key] = {**(t or {}), **(m or {})}
    result = {
        "benchmark": "step",
        "argv": list(sys.argv),
        "machine": machine_info(),
        "config": {"model_shape": args.model_shape, "batch": batch, "seq": seq, "threads": torch.get_num_threads(),
                   "rounds": args.rounds, "params": n, "param_bytes": 4 * n, "seed": args.seed,
                   "attn_implementation": getattr(model.config, "_attn_implementation", None),
                   "memory_steps": args.memory_steps, "memory_reps": args.memory_reps,
                   "malloc_mmap_threshold": None if args.malloc_default else MMAP_THRESHOLD},
        "timing": timing,
        "memory": memory,
        "rows": rows,
        "targets": evaluate_targets(flat, applies=(args.model_shape, batch, seq) == ("opt-125m", 16, 64)),
    }
    return result


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zotune bench step`` (and of the memory subprocesses)."""
    if getattr(args, "memory_case", None):
        torch.set_num_threads(max(1, int(args.threads)))
        batch, seq = parse_batch(args.batch)
        report = memory_case(args.memory_case, args.model_shape, batch, seq, args.memory_steps, args.seed)
        print(MEMORY_MARK + json.dumps(report), flush=True)
        return 0
    result = run_benchmark(args)
    print()
    print(format_report(result))
    if args.json:
        path = write_json(args.json, result)
        print(f"\nwrote {path}")
    failed = failures(result)
    if failed:
        print(f"\n{len(failed)} optimizer(s) raised (exit status 1):", *failed, sep="\n  ", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m zotune.bench.step ...`` (same options as ``zotune bench step``)."""
    return module_main("step", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
