"""``zotune bench threads``: ZO-SGD's step time for every (torch threads, engine workers) pair.

Two kinds of threads run a CPU step: torch's intra-op threads (OpenMP; every forward and every
elementwise op of a perturbation pass) and the engine's perturbation workers (Python threads,
each generating and applying its share of the noise blocks, each with its *own* OpenMP team
of torch's size). On a busy machine they can oversubscribe the cores: an OpenMP parallel
region waits for its slowest thread, and a thread that lost its core costs a scheduler
time slice per region.

For each ``--model-shapes`` entry the benchmark builds the OPT-shaped model of
``zotune bench step``, then times one ZO-SGD step (Gaussian z) for every pair of
``--torch-threads`` x ``--workers`` (``auto`` = the engine's default for that model), all
pairs interleaved in a shuffled order per round. It prints each pair's median step time
relative to the best pair of the same run, and the engine default's ratio. ``--load N``
starts N background processes (two OpenMP threads each, small matrix products in a loop,
like other test runs on a shared machine) for the duration of the measurement, so the
loaded case can be reproduced; they are stopped at the end.

Example::

    zotune bench threads --model-shapes tiny opt-125m --batch 4x64 --rounds 5 --load 2
"""

from __future__ import annotations

import argparse
import contextlib
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from zotune.bench._common import fmt, machine_info, markdown_table, median, module_main, write_json
from zotune.bench.step_model import SHAPES, build_model, make_batch, make_closure, param_count
from zotune.errors import UserError

DESCRIPTION = __doc__.split("\n\n")[0]
AUTO = "auto"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "opt-125m"],
                        help="OPT shapes with random weights (default: tiny opt-125m)")
    parser.add_argument("--batch", default="4x64", metavar="BxS", help="batch x sequence length (default: 4x64)")
    parser.add_argument("--torch-threads", nargs="+", type=int, default=None, metavar="T",
                        help="torch intra-op thread counts (default: 1 and torch's default here)")
    parser.add_argument("--workers", nargs="+", default=["1", "2", "4", AUTO], metavar="W",
                        help=f"engine worker counts, or '{AUTO}' for the engine's default (default: 1 2 4 auto)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians over them (default: 5)")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="background processes to start meanwhile, 2 OpenMP threads each (default: 0)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write every figure to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and batch")
    parser.add_argument("--hog", type=float, default=None, help=argparse.SUPPRESS)


def _hog(seconds: float) -> None:
    """Busy loop of small matrix products on 2 OpenMP threads (the background load)."""
    torch.set_num_threads(2)
    a = torch.randn(64, 64)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(100):
            (a @ a).add_(1.0).relu_()


@contextlib.contextmanager
def background_load(n: int, seconds: float = 3600.0) -> Iterator[None]:
    """Run ``n`` hog processes while the block runs; stop exactly those processes afterwards."""
    procs = [subprocess.Popen([sys.executable, "-m", "zotune.bench.threads", "--hog", str(seconds)])
             for _ in range(n)]
    try:
        if procs:
            time.sleep(2.0)  # let them import torch and start spinning
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def _parse_workers(values: list[str]) -> list[int | None]:
    out: list[int | None] = []
    for v in values:
        if v == AUTO:
            out.append(None)
        elif v.isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise UserError(f"--workers takes positive integers or '{AUTO}', got {v!r}")
    return out


def measure_shape(shape: str, batch: int, seq: int, torch_threads: list[int], workers: list[int | None],
                  rounds: int, seed: int = 0) -> dict[str, Any]:
    """Median ZO-SGD step time per (torch threads, workers) pair, all pairs interleaved."""
    import zotune.optim as zo

    model = build_model(shape, seed)
    closure = make_closure(model, make_batch(model.config.vocab_size, batch, seq, seed + 1))
    opts = {w: zo.create("zosgd", model, seed=seed, num_threads=w) for w in workers}
    pairs = [(t, w) for t in torch_threads for w in workers]
    auto_workers: dict[int, int] = {}
    samples: dict[tuple[int, int | None], list[float]] = {p: [] for p in pairs}
    forward: dict[int, list[float]] = {t: [] for t in torch_threads}
    for r in range(-1, rounds):  # round -1 warms up every pair (pools, generators, OpenMP teams)
        order = list(pairs)
        random.Random(seed * 1000 + r).shuffle(order)
        for t, w in order:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            opts[w].step(closure)
            if r >= 0:
                samples[(t, w)].append(time.perf_counter() - t0)
            if w is None:
                auto_workers[t] = opts[w]._threads()
            if r >= 0 and w == workers[0]:
                t0 = time.perf_counter()
                closure()
                forward[t].append(time.perf_counter() - t0)
    med = {p: median(v) for p, v in samples.items()}
    best = min(med.values())
    rows = [{"torch_threads": t, "workers": AUTO if w is None else w,
             "workers_used": auto_workers.get(t) if w is None else w, "step_s": med[(t, w)],
             "vs_best": med[(t, w)] / best, "samples_s": samples[(t, w)]} for t, w in pairs]
    return {"shape": shape, "params": param_count(model), "batch": batch, "seq": seq, "rows": rows,
            "forward_s": {str(t): median(v) for t, v in forward.items()}, "best_s": best}


def format_report(result: dict[str, Any]) -> str:
    """One table per shape: step time and ratio to the best pair."""
    lines = [f"zotune bench threads: {result['machine']['cpu']}, {result['machine']['cpu_count']} cores, "
             f"torch {result['machine']['torch']}; background load: {result['config']['load']} processes; "
             f"{result['config']['rounds']} rounds", ""]
    for shape in result["shapes"]:
        fwd = ", ".join(f"{t} threads {fmt(s * 1e3, '.1f')} ms" for t, s in shape["forward_s"].items())
        lines += [f"{shape['shape']} ({shape['params']:,} parameters), batch {shape['batch']}x{shape['seq']}; "
                  f"F: {fwd}", ""]
        lines.append(markdown_table(
            ["torch threads", "workers", "step ms", "vs best"],
            [[r["torch_threads"], f"{r['workers']}" + (f" ({r['workers_used']})" if r["workers"] == AUTO else ""),
              fmt(r["step_s"] * 1e3, ".1f"), fmt(r["vs_best"], ".2f", "x")] for r in shape["rows"]]))
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zotune bench threads``."""
    if args.hog is not None:
        _hog(args.hog)
        return 0
    from zotune.bench.step import parse_batch

    batch, seq = parse_batch(args.batch)
    if args.rounds < 1 or args.load < 0:
        raise UserError("--rounds must be >= 1 and --load >= 0")
    workers = _parse_workers(args.workers)
    default_threads = torch.get_num_threads()
    torch_threads = sorted(set(args.torch_threads or [1, default_threads]))
    if min(torch_threads) < 1:
        raise UserError("--torch-threads must be >= 1")
    result: dict[str, Any] = {"benchmark": "threads", "argv": list(sys.argv), "machine": machine_info(),
                              "config": {"batch": batch, "seq": seq, "rounds": args.rounds, "load": args.load,
                                         "torch_default_threads": default_threads}, "shapes": []}
    try:
        with background_load(args.load):
            for shape in args.model_shapes:
                print(f"  measuring {shape} ...", flush=True)
                result["shapes"].append(measure_shape(shape, batch, seq, torch_threads, workers, args.rounds,
                                                      args.seed))
    finally:
        torch.set_num_threads(default_threads)
    print(format_report(result))
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m zotune.bench.threads ...`` (same options as ``zotune bench threads``)."""
    return module_main("threads", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
