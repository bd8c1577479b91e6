"""Soak: a long CLI training run on a tiny model, watched from outside for leaks.

Trains a tiny random LLaMA (``zotune.testing``) for ``--steps`` steps with an evaluation and
a checkpoint every ``--every`` steps, in a ``zotune train`` subprocess, and samples its
resident memory (VmRSS) and open file descriptors from /proc while it runs. After the warm-up
(the first ``--warmup`` of the steps) resident memory must grow less than 1% and the open
files must not grow. Linux only. Usage:

    python scripts/soak.py --steps 5000 --every 50
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _sample(pid: int) -> tuple[int, int] | None:
    """(VmRSS in kB, open file descriptors) of a running process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def _step(metrics: Path) -> int:
    """The last training step logged so far (reads only the file's tail)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return 0
    steps = [int(part.split(",")[0]) for part in tail.split('"step": ')[1:] if part.split(",")[0].isdigit()]
    return steps[-1] if steps else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=50, help="evaluate and checkpoint every N steps")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps not measured")
    parser.add_argument("--optimizer", default="zo-adam")
    args = parser.parse_args()

    from zotune.testing import tiny_causal_lm, tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base, out = Path(tmp) / "base", Path(tmp) / "run"
        tok = tiny_tokenizer()
        tiny_causal_lm(vocab_size=len(tok)).save_pretrained(base)
        tok.save_pretrained(base)
        argv = [sys.executable, "-m", "zotune", "train", "--model", str(base), "--task", "sst2",
                "--optimizer", args.optimizer, "--steps", str(args.steps), "--eval-every", str(args.every),
                "--save-every", str(args.every), "--batch-size", "4", "--max-dev", "8", "--max-test", "8",
                "--lr", "1e-3", "--eps", "1e-2", "--no-progress", "--threads", "1", "--output-dir", str(out)]
        t0 = time.time()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[int, int, int]] = []  # (step, rss kB, fds)
        while proc.poll() is None:
            step, got = _step(out / "metrics.jsonl"), _sample(proc.pid)
            if got is not None and 0 < step < args.steps:
                samples.append((step, *got))
            time.sleep(0.5)
        err = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            print(err, file=sys.stderr)
            return proc.returncode
    start = int(args.steps * args.warmup)
    measured = [s for s in samples if s[0] >= start]
    if len(measured) < 2:
        print("too few samples after the warm-up; use more --steps", file=sys.stderr)
        return 1
    # compare the first and the last quarter of the measured run by their maxima: a sample may land
    # inside an evaluation or a checkpoint write (a transient buffer, one more open file)
    quarter = max(1, len(measured) // 4)
    head, tail = measured[:quarter], measured[-quarter:]
    rss0, rss1 = max(s[1] for s in head), max(s[1] for s in tail)
    fd0, fd1 = max(s[2] for s in head), max(s[2] for s in tail)
    growth = (rss1 - rss0) / rss0
    ok = growth < 0.01 and fd1 <= fd0
    print(f"soak: {args.optimizer}, {args.steps} steps, eval + checkpoint every {args.every}, "
          f"{time.time() - t0:.0f} s, {len(measured)} samples from step {measured[0][0]} to {measured[-1][0]}")
    print(f"max RSS, first quarter (steps {head[0][0]}-{head[-1][0]}): {rss0 / 1024:.1f} MiB; last quarter "
          f"(steps {tail[0][0]}-{tail[-1][0]}): {rss1 / 1024:.1f} MiB (growth {growth:+.2%}); "
          f"max open files {fd0} -> {fd1}")
    print("PASS" if ok else "FAIL: memory grew >= 1% or open files grew")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
