"""Peak memory for ``zotune bench step``: one fresh subprocess per case, peak RSS (``VmHWM``).

The subprocess (``python -m zotune.bench.step --memory-case CASE``) imports torch and
transformers, builds the model, resets the peak RSS (by writing 5 to
``/proc/self/clear_refs``), runs 2 forwards (inference) or 2 optimizer steps, and reports
``VmHWM``. glibc's mmap threshold is pinned at its default 128 KiB there unless
``--malloc-default`` is given (see :func:`run_memory_subprocess`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zotune.bench._common import fmt, median
from zotune.bench.step_cases import Case, make_runner, state_bytes
from zotune.bench.step_model import build_model, make_batch, make_closure, param_count
from zotune.memory import reset_peak_memory, status_kb

MEMORY_MARK = "ZOTUNE_MEMORY "
MMAP_THRESHOLD = 128 * 1024  # glibc's default M_MMAP_THRESHOLD, pinned in the memory subprocesses


def memory_case(case: str, shape: str, batch: int, seq: int, steps: int = 2, seed: int = 0) -> dict[str, Any]:
    """Measure one memory case in *this* process (meant for a fresh subprocess).

    ``case``: ``"import"`` (torch, transformers' OPT classes and zotune imported, nothing built),
    ``"inference"`` (``steps`` forwards), ``NAIVE`` or ``"opt:NAME:DISTRIBUTION"`` (``steps``
    optimizer steps). The model is built before the peak is reset, so its one-off
    initialisation transient is not counted.
    """
    from transformers import OPTConfig, OPTForCausalLM  # noqa: F401  (the import baseline: model code too)

    import zotune.optim  # noqa: F401

    out: dict[str, Any] = {"case": case, "rss_after_import_mb": status_kb("VmRSS") / 1024}
    if case == "import":
        out["peak_mb"] = status_kb("VmHWM") / 1024
        return out
    model = build_model(shape, seed)
    batch_t = make_batch(model.config.vocab_size, batch, seq, seed + 1)
    closure = make_closure(model, batch_t)
    out["params"] = param_count(model)
    out["rss_after_model_mb"] = status_kb("VmRSS") / 1024
    out["peak_reset"] = reset_peak_memory()
    if case == "inference":
        for _ in range(steps):
            closure()
    else:
        runner = make_runner(Case.from_memory_case(case), model, seed)
        for _ in range(steps):
            runner.step(closure)
        out["state_bytes"] = state_bytes(runner)
    out["peak_mb"] = status_kb("VmHWM") / 1024
    return out


def run_memory_subprocess(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`memory_case` in a fresh interpreter and return its report."""
    import zotune

    src = str(Path(zotune.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not getattr(args, "malloc_default", False):
        # pin glibc's mmap threshold at its default 128 KiB: with the dynamic threshold, freed large
        # blocks stay in the heap and identical runs' peaks scatter by 50-200 MB (opt-125m)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    cmd = [sys.executable, "-m", "zotune.bench.step", "--memory-case", case, "--model-shape", args.model_shape,
           "--batch", args.batch, "--threads", str(args.threads), "--seed", str(args.seed),
           "--memory-steps", str(args.memory_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MEMORY_MARK):
            return json.loads(line[len(MEMORY_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"case": case, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def measure_memory(cases: list[Case], args: argparse.Namespace, param_bytes: int,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Peak memory of the import baseline, inference and every case (fresh processes)."""
    reps = max(1, int(args.memory_reps))

    def peak(case: str) -> dict[str, Any]:
        reports = [run_memory_subprocess(case, args) for _ in range(reps)]
        good = [r for r in reports if "peak_mb" in r]
        if not good:
            return {"error": reports[-1].get("error", "no report")}
        return {"peak_mb": median(r["peak_mb"] for r in good), "peaks_mb": [r["peak_mb"] for r in good],
                "peak_reset": all(r.get("peak_reset", True) for r in good),
                **({"state_bytes": good[0]["state_bytes"]} if "state_bytes" in good[0] else {})}

    t0 = time.perf_counter()
    todo = [c for c in cases if c.error is None]
    names = ["import", "inference", *(c.memory_case for c in todo)]
    reports: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max(1, int(getattr(args, "memory_jobs", 1)))) as pool:
        for name, report in zip(names, pool.map(peak, names)):
            reports[name] = report
            log(f"  memory: {name}: peak {fmt(report.get('peak_mb'), '.0f')} MB"
                + (f" ({report['error']})" if "error" in report else ""))
    base, inference = reports["import"], reports["inference"]
    out: dict[str, Any] = {"import": base, "inference": inference, "cases": {}, "param_mb": param_bytes / 2**20}
    for c in todo:
        r = reports[c.memory_case]
        if "peak_mb" in r and "peak_mb" in base and "peak_mb" in inference:
            above_inf = inference["peak_mb"] - base["peak_mb"]
            r["peak_over_inference"] = (r["peak_mb"] - base["peak_mb"]) / above_inf if above_inf > 0 else None
            r["extra_mb"] = r["peak_mb"] - inference["peak_mb"]
            r["extra_params"] = r["extra_mb"] * 2**20 / param_bytes
            if "state_bytes" in r:  # exact, from the optimizer's tensors; the rest is engine/allocator overhead
                r["state_params"] = r["state_bytes"] / param_bytes
                r["overhead_mb"] = r["extra_mb"] - r["state_bytes"] / 2**20
        out["cases"][c.key] = r
    out["seconds"] = time.perf_counter() - t0
    return out
