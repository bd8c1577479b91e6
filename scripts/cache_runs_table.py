"""Markdown table of the runs of scripts/cache_runs.sh (or any `zotune train` run directories).

For each run directory DIR: test metric before -> after (the best dev checkpoint), the best dev
and its step, the training loss (mean of the first and last 10% of steps), steps, CPU time
(user + system from ``DIR.time``, written by ``/usr/bin/time -v -o``) and wall-clock.

    python scripts/cache_runs_table.py /work/runs/cache14/final/*/
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _time_file(run: Path) -> dict[str, float]:
    path = run.parent / f"{run.name}.time"
    if not path.exists():
        return {}
    text = path.read_text()
    out = {}
    for key, pattern in (("user", r"User time \(seconds\): ([\d.]+)"), ("sys", r"System time \(seconds\): ([\d.]+)"),
                         ("cpu_pct", r"Percent of CPU this job got: (\d+)%")):
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        parts = [float(x) for x in m.group(1).split(":")]
        out["wall"] = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    return out


def row(run: Path) -> list[str] | None:
    results_path = run / "results.json"
    if not results_path.exists():
        return None
    r = json.loads(results_path.read_text())
    c = r["config"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["kind"] == "train"]
    tenth = max(len(losses) // 10, 1)
    evals = [(x["step"], x.get("dev_accuracy")) for x in lines if x["kind"] == "eval" and "dev_accuracy" in x]
    best = max(evals, key=lambda e: (e[1], -e[0])) if evals else (None, None)
    t = _time_file(run)
    cpu = t.get("user", 0) + t.get("sys", 0)
    mode = c["peft"] + (f" {c['lora_layers']}" if c.get("lora_layers") else "")
    test_b, test_a = r["before"].get("test", {}).get("accuracy"), r["after"].get("test", {}).get("accuracy")
    return [c["task"], mode, f"{r['trainable_params']:,}", f"{c['lr']:g}", str(r["steps"]),
            f"{test_b:.3f}" if test_b is not None else "-", f"**{test_a:.3f}**" if test_a is not None else "-",
            f"{r['before']['dev']['accuracy']:.3f} -> {best[1]:.3f} (step {best[0]})" if best[1] is not None else "-",
            f"{sum(losses[:tenth]) / tenth:.3f} -> {sum(losses[-tenth:]) / tenth:.3f}" if losses else "-",
            f"{cpu:.0f} s ({t.get('user', 0):.0f} + {t.get('sys', 0):.0f})" if t else "-",
            f"{t['wall'] / 60:.1f} min ({t.get('cpu_pct', 0):.0f}% CPU)" if "wall" in t else "-"]


def main() -> None:
    head = ["task", "mode", "trainable", "lr", "steps", "test before", "test after", "dev before -> best (step)",
            "train loss first -> last 10%", "CPU (user + sys)", "wall"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for arg in sys.argv[1:]:
        cells = row(Path(arg.rstrip("/")))
        if cells:
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
