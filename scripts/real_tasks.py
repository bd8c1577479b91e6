"""Zeroth-order fine-tuning runs of the embedded SmolLM2-135M on several real tasks, as CLI commands.

Every row is one ``zotune train`` command (printed exactly as it ran) from the pretrained model;
the table gives the test metric before and after, the best dev evaluation, and the cost. The
markdown goes to stdout and to --out. Usage (about 30 minutes on 2 CPU cores):

    python scripts/real_tasks.py --out docs/real_tasks_table.md
    python scripts/real_tasks.py --only rte copa           # some rows
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path

from zotune.cli import main as zotune

#: one recipe for every task (the demo's: final-norm tuning, ZO-SGD, lr 2e-2, eps 1e-2); task -> the
#: arguments of its ``zotune train`` command (besides --output-dir)
RECIPE = ["--peft", "final_norm", "--optimizer", "zosgd", "--lr", "2e-2", "--eps", "1e-2"]
RUNS: dict[str, list[str]] = {
    "sst2": ["--task", "sst2", "--template", "mezo", *RECIPE, "--steps", "60", "--eval-every", "20",
             "--max-test", "500"],
    "rte": ["--task", "rte", *RECIPE, "--steps", "60", "--eval-every", "20", "--max-test", "277"],
    "copa": ["--task", "copa", *RECIPE, "--steps", "60", "--eval-every", "20", "--max-test", "100"],
    "squad": ["--task", "squad", *RECIPE, "--steps", "40", "--batch-size", "8", "--max-train", "200",
              "--max-dev", "16", "--max-test", "100", "--max-length", "384", "--eval-batch-size", "8"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS), help="tasks to run (default: all)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--runs-dir", default=None, help="keep the run directories here (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.runs_dir or tempfile.mkdtemp(prefix="zotune-real-"))
    rows = []
    for task, argv in RUNS.items():
        if args.only and task not in args.only:
            continue
        out = root / task
        command = ["train", *argv, "--output-dir", str(out), "--overwrite", "--no-progress"]
        t0 = time.time()
        code = zotune(command)
        if code != 0:
            raise SystemExit(f"{task}: zotune exited with {code}")
        res = json.loads((out / "results.json").read_text())
        metric = "f1" if "f1" in res["after"]["test"] else "accuracy"
        row = {"task": task, "command": "zotune " + shlex.join(["train", *argv]), "metric": metric,
               "before": res["before"]["test"][metric], "after": res["after"]["test"][metric],
               "dev_before": res["before"]["dev"][metric], "dev_after": res["after"]["dev"][metric],
               "best_step": res["best_step"] or res["steps"], "n_test": len_split(res, "test"),
               "trainable": res["trainable_params"],
               "s_per_step": res["seconds_per_step"], "minutes": (time.time() - t0) / 60,
               "peft": res["peft"], "optimizer": res["optimizer"], "steps": res["steps"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| task | tuning (trainable) | optimizer, steps | test metric | before | after | dev before -> best "
             "| s/step | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['peft']} ({r['trainable']:,}) | {r['optimizer']}, {r['steps']} | "
                     f"{r['metric']} ({r['n_test']} examples) | {r['before']:.3f} | {r['after']:.3f} | "
                     f"{r['dev_before']:.3f} -> {r['dev_after']:.3f} (step {r['best_step']}) | "
                     f"{r['s_per_step']:.1f} | {r['minutes']:.1f} |")
    lines += ["", "Commands (each from the pretrained model, with `--output-dir DIR` added):", ""]
    lines += [f"    {r['command']}" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def len_split(results: dict, split: str) -> int | None:
    """Examples in a split, from the metrics' ``n`` if the task reports it."""
    n = results["after"].get(split, {}).get("n")
    return int(n) if n is not None else None


if __name__ == "__main__":
    main()
