"""ZO-SGD step / 2F, eager vs ``lazy_update=True``, in *process CPU time*, on the OPT-125m shape.

CPU time does not count the time a process waits for a core, so on a shared, saturated machine
it still compares the two schedules (wall-clock ratios from ``zotune bench step`` do not). One
thread; every row steps its own copy of the model (a lazy row must not be flushed by another
row's forward); F and the steps are interleaved in a shuffled order per round. Usage:

    python scripts/lazy_cpu_time.py --rounds 3 --json lazy_cpu.json     # 8 min under load
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import torch

import zotune.optim as zo
from zotune.bench.step_model import build_model, make_batch, make_closure

ROWS = [("gaussian", 1.0), ("gaussian", 0.25), ("rademacher", 1.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", default="opt-125m", help="a zotune bench step model shape (tiny: a smoke test)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = build_model(args.shape, 0)
    batch = make_batch(base.config.vocab_size, 16, 64, 1)
    forward = make_closure(base, batch)
    rows = {}
    for dist, lf in ROWS:
        for lazy in (False, True):
            model = copy.deepcopy(base)
            opt = zo.create("zosgd", model, distribution=dist, layer_fraction=lf, lazy_update=lazy)
            rows[f"{dist}/layer_fraction={lf}/{'lazy' if lazy else 'eager'}"] = (opt, make_closure(model, batch))
    for opt, closure in rows.values():
        opt.step(closure)  # warm-up; a lazy row now holds its first deferred update
    samples: dict[str, list[float]] = {k: [] for k in rows}
    f_rounds = []
    for r in range(args.rounds):
        tasks = ["F", *rows, "F"]
        random.Random(r).shuffle(tasks)
        fs = []
        for key in tasks:
            t0 = time.process_time()
            if key == "F":
                forward()
                fs.append(time.process_time() - t0)
            else:
                rows[key][0].step(rows[key][1])
                samples[key].append(time.process_time() - t0)
        f_rounds.append(sum(fs) / len(fs))
        print(f"round {r + 1}/{args.rounds}: F = {f_rounds[-1]:.3f} s CPU", flush=True)
    out = {"F_cpu_s": f_rounds, "rows": {}}
    print("| row | passes/step | step CPU s (sum of rounds) | step / 2F (median of rounds) |\n|---|---:|---:|---:|")
    for key, s in samples.items():
        opt = rows[key][0]
        ratio = statistics.median(x / (2 * f) for x, f in zip(s, f_rounds))
        warm_up = 2 if opt.lazy_update else 3  # passes of the warm-up step
        passes = (opt.pass_counts["passes"] - warm_up) / len(s)
        out["rows"][key] = {"step_cpu_s": s, "step_over_2F": ratio, "passes_per_step": passes}
        print(f"| {key} | {passes:.0f} | {sum(s):.2f} | {ratio:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
