"""``zotune bench scale``: data-parallel throughput and bytes communicated per step.

For every process count in ``--nproc`` the benchmark starts that many local processes with
torchrun's environment (gloo on the CPU), trains each optimizer for ``--steps`` steps on a
fixed global batch split between the ranks, and reports global examples/s and what zotune's
collectives sent per step (counted by :data:`zotune.distributed.COMM_STATS`, the payload each
rank contributes). The CPU cores are divided between the processes (``torch.set_num_threads``),
so on a small machine more processes are *not* faster: the point is the plumbing and the
communication volume, which does not depend on the model size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from zotune.errors import UserError

SHAPES = {
    "mlp": "MLP 256-512-512-10 on random features (no transformers import)",
    "tiny": "random Llama, hidden 32, 2 layers, 32 tokens per example",
    "small": "random Llama, hidden 256, 4 layers, 64 tokens per example",
}
_MARK = "ZOTUNE_SCALE_RESULT "


@dataclass
class Row:
    """One (process count, optimizer) measurement."""

    nproc: int
    optimizer: str
    steps: int
    global_batch: int
    threads_per_process: int
    seconds_per_step: float
    examples_per_s: float
    bytes_per_step: float
    collectives_per_step: float
    check_bytes_per_step: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", default="1,2", help="comma-separated process counts (default: 1,2)")
    parser.add_argument("--optimizers", default="zo-sgd,zo-adam", help="comma-separated optimizer names")
    parser.add_argument(
        "--model-shape", choices=sorted(SHAPES), default="tiny", help="; ".join(f"{k}: {v}" for k, v in SHAPES.items())
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=10,
        help="timed steps per optimizer; the median step time is reported (default: 10)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--batch", type=int, default=16, help="global batch, divisible by every --nproc (default: 16)")
    parser.add_argument(
        "--check-every",
        type=int,
        default=0,
        help="replica check every K steps (its bytes are reported separately; default: off)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process (default 0: the CPU cores divided by the process count)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per process count")


def _parse_nprocs(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--nproc must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"--nproc needs positive process counts, got {text!r}")
    return values


def measure(
    nprocs: list[int],
    optimizers: list[str],
    shape: str = "tiny",
    steps: int = 10,
    batch: int = 16,
    warmup: int = 2,
    check_every: int = 0,
    timeout_s: float = 600.0,
    threads: int = 0,
) -> list[Row]:
    """Launch the workers for each process count and collect one :class:`Row` per optimizer."""
    import zotune.optim as zo
    from zotune.distributed import launch_local

    if shape not in SHAPES:
        raise UserError(f"unknown --model-shape {shape!r}; choose one of {sorted(SHAPES)}")
    if steps < 1 or warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    names = [zo.get(name).__name__ for name in optimizers]  # UserError for unknown names
    for n in nprocs:
        if batch % n:
            raise UserError(f"--batch {batch} is not divisible by --nproc {n}")
    rows: list[Row] = []
    for n in nprocs:
        spec = dict(
            optimizers=names,
            shape=shape,
            steps=steps,
            batch=batch,
            warmup=warmup,
            check_every=check_every,
            threads=threads or _threads(n),
        )
        argv = [sys.executable, "-m", "zotune.bench.scale", json.dumps(spec)]
        results = launch_local(argv, n, timeout_s=timeout_s, env={"OMP_NUM_THREADS": str(spec["threads"])})
        failed = [r for r in results if not r.ok]
        if failed:
            r = failed[0]
            state = "killed at the deadline" if r.killed else f"exit status {r.returncode}"
            raise RuntimeError(f"bench worker rank {r.rank} of {n} failed ({state}):\n{r.stderr[-4000:]}")
        line = next(ln for ln in results[0].stdout.splitlines() if ln.startswith(_MARK))
        rows.extend(Row(**d) for d in json.loads(line[len(_MARK) :]))
    return rows


def run(args: argparse.Namespace) -> int:
    nprocs = _parse_nprocs(args.nproc)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    rows = measure(
        nprocs,
        optimizers,
        args.model_shape,
        args.steps,
        args.batch,
        args.warmup,
        args.check_every,
        args.timeout,
        args.threads,
    )
    print(format_table(rows))
    return 0


def format_table(rows: list[Row]) -> str:
    base = {r.optimizer: r.examples_per_s for r in rows if r.nproc == min(x.nproc for x in rows)}
    head = (
        f"{'nproc':>5} {'threads':>7} {'optimizer':<18} {'ms/step':>9} {'examples/s':>11} {'vs first':>8} "
        f"{'bytes/step':>10} {'collectives/step':>16} {'check bytes/step':>16}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r.examples_per_s / base[r.optimizer] if base.get(r.optimizer) else float("nan")
        lines.append(
            f"{r.nproc:>5} {r.threads_per_process:>7} {r.optimizer:<18} {1e3 * r.seconds_per_step:>9.2f} "
            f"{r.examples_per_s:>11.1f} {ratio:>7.2f}x {r.bytes_per_step:>10.0f} {r.collectives_per_step:>16.1f} "
            f"{r.check_bytes_per_step:>16.1f}"
        )
    cores = os.cpu_count() or 1
    lines += [
        "",
        f"bytes/step: payload of zotune's loss all-reduces per rank and step (fp64 scalars); it does not grow with "
        f"the model. The {cores} CPU core(s) of this machine are shared by all processes, so more processes are "
        "not faster here (and multi-threaded processes suffer badly when the machine is busy: compare with "
        "--threads 1); on a multi-GPU node each rank has its own GPU, throughput grows with the number of ranks "
        "and the traffic stays a few bytes per step.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- worker
def _threads(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def _model_and_loss(shape: str, rows: list[int], batch: int):
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    if shape == "mlp":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10))
        x, y = torch.randn(batch, 256, generator=g)[rows], torch.randint(0, 10, (batch,), generator=g)[rows]
        return model, lambda: nn.functional.cross_entropy(model(x), y)
    from zotune.testing import tiny_causal_lm

    hidden, layers, seq = (32, 2, 32) if shape == "tiny" else (256, 4, 64)
    model = tiny_causal_lm("llama", hidden_size=hidden, num_layers=layers)
    ids = torch.randint(5, 256, (batch, seq), generator=g)[rows]
    return model, lambda: model(input_ids=ids, labels=ids).loss


def bench_rows(ctx: Any, spec: dict[str, Any]) -> list[Row]:
    """Time ``spec["steps"]`` steps per optimizer on this rank (collective when ``ctx`` is a
    :class:`~zotune.distributed.DistContext`; ``None``: one process). Rank 0's rows are the result."""
    import torch

    from zotune.distributed import COMM_STATS
    from zotune.optim import create

    nproc = ctx.world_size if ctx else 1
    threads = int(spec.get("threads") or _threads(nproc))
    torch.set_num_threads(threads)
    rows = ctx.shard(list(range(spec["batch"]))) if ctx else list(range(spec["batch"]))
    out = []
    for name in spec["optimizers"]:
        model, closure = _model_and_loss(spec["shape"], rows, spec["batch"])
        opt = create(
            name, model, lr=1e-5, comm=ctx.comm(check_every=spec.get("check_every", 0)) if ctx else None
        )
        for _ in range(spec.get("warmup", 0)):
            opt.step(closure)
        if ctx:
            ctx.barrier()
        COMM_STATS.reset()
        times = []
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            opt.step(closure)  # ends with the loss all-reduce: every rank waits for the slowest
            times.append(time.perf_counter() - t0)
        if ctx:
            ctx.barrier()
        seconds = statistics.median(times)  # robust to other load on a shared machine
        stats = COMM_STATS.snapshot()
        loss_calls, loss_bytes = stats.get("loss_all_reduce", (0, 0))
        out.append(
            Row(
                nproc=nproc,
                optimizer=name,
                steps=spec["steps"],
                global_batch=spec["batch"],
                threads_per_process=threads,
                seconds_per_step=seconds,
                examples_per_s=spec["batch"] / seconds,
                bytes_per_step=loss_bytes / spec["steps"],
                collectives_per_step=loss_calls / spec["steps"],
                check_bytes_per_step=stats.get("replica_check", (0, 0))[1] / spec["steps"],
            )
        )
    return out


def _worker(spec_json: str) -> int:
    from zotune.distributed import init_distributed

    ctx = init_distributed(backend="gloo")
    rows = bench_rows(ctx, json.loads(spec_json))
    if ctx is None or ctx.is_main:
        print(_MARK + json.dumps([asdict(r) for r in rows]), flush=True)
    if ctx:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
