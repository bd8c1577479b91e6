"""Measure candidate settings for the README demo (SST-2 k=16, SmolLM2-135M) side by side.

Every configuration trains for the same number of steps from the same start and is scored on
the same test examples; the table (markdown) goes to stdout and --out. Usage:

    python scripts/demo_sweep.py --steps 60 --max-test 300 --out docs/demo_sweep.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from zotune.train import TrainConfig, train

CANDIDATES: list[dict] = [
    dict(template="sentiment", peft="final_norm", optimizer="zosgd", lr=5e-3, eps=1e-2),
    dict(template="sentiment", peft="final_norm", optimizer="zosgd", lr=2e-2, eps=1e-2),
    dict(template="sentiment", peft="final_norm", optimizer="hizoo", lr=2e-2, eps=1e-2),
    dict(template="sentiment", peft="final_norm", optimizer="zo-adam", lr=1e-2, eps=1e-2),
    dict(template="sentiment", peft="final_norm", optimizer="zo-adamu", lr=1e-2, eps=1e-2),
    dict(template="sentiment", peft="norms", optimizer="zosgd", lr=2e-3, eps=1e-2),
    dict(template="sentiment", peft="lora", optimizer="zosgd", lr=1e-3, eps=1e-2),
    dict(template="mezo", peft="final_norm", optimizer="zosgd", lr=2e-2, eps=1e-2),
    dict(template="mezo", peft="final_norm", optimizer="hizoo", lr=2e-2, eps=1e-2),
    dict(template="mezo", peft="final_norm", optimizer="zo-adam", lr=1e-2, eps=1e-2),
    dict(template="mezo", peft="norms", optimizer="zosgd", lr=2e-3, eps=1e-2),
    # HiZOO with the published alpha (1e-6) is ZO-SGD plus a forward; these make h matter
    dict(template="mezo", peft="final_norm", optimizer="hizoo", lr=2e-2, eps=1e-2,
         optimizer_args={"alpha": 0.1, "warmup_probes": 10}),
    dict(template="mezo", peft="final_norm", optimizer="zo-adam", lr=2e-2, eps=1e-2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-test", type=int, default=300)
    ap.add_argument("--only", type=int, nargs="*", help="indices of CANDIDATES to run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy machine)")
    ap.add_argument("--eval-every", type=int, default=0, help="dev evaluation every N steps (best one tested)")
    ap.add_argument("--runs-dir", default=None, help="keep the run directories here (for `zotune plot`)")
    args = ap.parse_args()
    rows = []
    baselines: dict[str, float] = {}
    for i, cand in enumerate(CANDIDATES):
        if args.only and i not in args.only:
            continue
        out = Path(args.runs_dir or tempfile.mkdtemp()) / f"{i:02d}-{cand['optimizer']}-{cand['peft']}"
        config = TrainConfig(task="sst2", steps=args.steps, batch_size=16, max_test=args.max_test, seed=0,
                             eval_before=cand["template"] not in baselines, progress=False, threads=args.threads,
                             eval_every=args.eval_every, overwrite=True, output_dir=str(out), **cand)
        t0 = time.time()
        res = train(config)
        if res["before"]:
            baselines[cand["template"]] = res["before"]["test"]["accuracy"]
        row = {**cand, "before": baselines[cand["template"]], "after": res["after"]["test"]["accuracy"],
               "dev_after": res["after"]["dev"]["accuracy"], "s_per_step": res["seconds_per_step"],
               "minutes": (time.time() - t0) / 60, "trainable": res["trainable_params"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"SST-2 k=16 (seed 42), SmolLM2-135M, batch 16, {args.steps} steps, test = first "
             f"{args.max_test} of GLUE dev\n",
             "| template | tuning | optimizer | options | lr | eps | trainable | test before | test after | "
             "dev after | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in r.get("optimizer_args", {}).items()) or "-"
        lines.append(f"| {r['template']} | {r['peft']} | {r['optimizer']} | {options} | {r['lr']:g} | "
                     f"{r['eps']:g} | {r['trainable']:,} | {r['before']:.3f} | {r['after']:.3f} | "
                     f"{r['dev_after']:.3f} | {r['s_per_step']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
