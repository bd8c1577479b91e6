"""``zotune bench cache``: ZO step time with and without the frozen-bottom activation cache.

For each tuning mode, one model is loaded and one optimizer built; the same steps (same
batches, same seeds) are timed alternately with the cache switched off and on, in rounds, so
both columns see the same machine load. The cached column is the steady state: every training
example was run through the bottom once before timing (the ``fill`` column: one pass over the
training set). The ratio is median cached step / median uncached step, in wall-clock and in
process CPU time (user + system of this process: with ``--threads 1`` it does not grow with
the load of other processes, so on a shared machine the CPU columns are the ones to read).

    zotune bench cache                                  # SmolLM2-135M, SST-2 (MeZO template), 5 modes
    zotune bench cache --model tiny --steps 2 --rounds 1   # tiny random Llama (seconds)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from zotune.bench._common import fmt, machine_info, markdown_table, median, timed, write_json

DEFAULT_MODES = ("final_norm", "top:1", "top:2", "top:4", "lora:top:2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded model, local directory, or 'tiny' (random 8-block Llama)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help="comma-separated tuning modes; lora:top:K is LoRA on the last K blocks")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--template", default="mezo")
    parser.add_argument("--batch", type=int, default=16, help="examples per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and setting")
    parser.add_argument("--rounds", type=int, default=2, help="alternations off/on")
    parser.add_argument("--optimizer", default="zosgd")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")


def _load(model_name: str, mode: str) -> Any:
    from zotune.models import apply_peft, load_model

    if model_name == "tiny":
        from zotune.testing import tiny_causal_lm, tiny_tokenizer

        tok = tiny_tokenizer(["great", "terrible"])
        model = tiny_causal_lm("llama", vocab_size=256, hidden_size=64, num_layers=8)
    else:
        model, tok = load_model(model_name)
    if mode.startswith("lora:"):
        return apply_peft(model, "lora", lora_layers=mode.split(":", 1)[1]), tok
    return apply_peft(model, mode), tok


def measure_mode(args: argparse.Namespace, mode: str, task: Any) -> dict[str, Any]:
    """Time ``args.steps`` ZO steps per round with the cache off and on, for one tuning mode."""
    import torch

    import zotune.optim as zo
    from zotune.models import ActivationCache, depth_split
    from zotune.tasks import make_objective
    from zotune.train import batch_indices

    model, tok = _load(args.model, mode)
    split = depth_split(model)
    objective = make_objective(model, tok, task, max_length=256)
    optimizer = zo.create(args.optimizer, model, lr=1e-7, eps=1e-3, seed=0)
    cache = ActivationCache(model, max_mb=4096)
    n = len(task.train)

    def batch(step: int) -> list[Any]:
        return [task.train[i] for i in batch_indices(n, args.batch, step, 0)]

    with torch.no_grad():
        fill, _ = timed(lambda: [objective(task.train[i:i + args.batch]) for i in range(0, n, args.batch)])
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    loads: list[float] = []
    step = 0
    for _ in range(args.rounds):
        for enabled in (False, True):
            cache.enabled = enabled
            for _ in range(args.steps):
                b = batch(step)
                c0 = time.process_time()
                wall, load = timed(lambda b=b: optimizer.step(lambda: objective(b)))
                cpu[enabled].append(time.process_time() - c0)
                times[enabled].append(wall)
                loads.append(load)
                step += 1
    stats = dict(cache.stats)
    cache.close()
    off, on = median(times[False]), median(times[True])
    cpu_off, cpu_on = median(cpu[False]), median(cpu[True])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"mode": mode, "trainable": trainable, "lowest_block": split.block, "blocks": split.num_layers,
            "refusal": split.refusal, "uncached_s": off, "cached_s": on, "ratio": on / off if off else float("nan"),
            "uncached_cpu_s": cpu_off, "cached_cpu_s": cpu_on,
            "cpu_ratio": cpu_on / cpu_off if cpu_off else float("nan"), "fill_s": fill,
            "cache_mb": stats["bytes"] / 2**20, "examples": n, "other_load": median(loads),
            "bottom_rows": stats["bottom_rows"]}


def run(args: argparse.Namespace) -> int:
    import torch

    from zotune.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task, template=args.template)
    info = machine_info()
    print(f"# zotune bench cache: {args.model}, {args.task} ({len(task.train)} train examples, template "
          f"{args.template}), batch {args.batch}, {args.optimizer}, {args.steps} steps x {args.rounds} rounds "
          f"per setting; {info['cpu']}, {info['torch_threads']} threads, load {info.get('loadavg')}")
    rows = []
    t0 = time.perf_counter()
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        row = measure_mode(args, mode, task)
        rows.append(row)
        print(f"#   {mode}: {fmt(row['uncached_s'], '.3f')} s -> {fmt(row['cached_s'], '.3f')} s per step "
              f"(x{fmt(row['ratio'], '.3f')}); CPU {fmt(row['uncached_cpu_s'], '.3f')} s -> "
              f"{fmt(row['cached_cpu_s'], '.3f')} s (x{fmt(row['cpu_ratio'], '.3f')})", flush=True)
    print(markdown_table(
        ["mode", "trainable", "lowest block", "uncached s/step", "cached s/step", "cached / uncached",
         "uncached CPU s/step", "cached CPU s/step", "CPU cached / uncached", "fill s (one pass)", "cache MB",
         "other load (cores)"],
        [[r["mode"], f"{r['trainable']:,}", f"{r['lowest_block']} of {r['blocks']}", fmt(r["uncached_s"], ".3f"),
          fmt(r["cached_s"], ".3f"), fmt(r["ratio"], ".3f") + "x", fmt(r["uncached_cpu_s"], ".3f"),
          fmt(r["cached_cpu_s"], ".3f"), fmt(r["cpu_ratio"], ".3f") + "x", fmt(r["fill_s"], ".1f"),
          fmt(r["cache_mb"], ".1f"), fmt(r["other_load"], ".2f")] for r in rows]))
    print(f"# {time.perf_counter() - t0:.0f} s in all")
    if args.json:
        write_json(args.json, {"machine": info, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                               "rows": rows})
    return 0
