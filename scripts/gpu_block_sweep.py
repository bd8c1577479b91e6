"""ZO-SGD step time on a CUDA device by noise block size, beside MeZO's reference step.

Each row: median of 5 steps (after one warm-up step) of ZO-SGD with ``block_size`` 2**18 ... 2**24
(Gaussian; Rademacher at 2**22) and of MeZO's reference step, with the forward F of the same batch
(16 x 64 tokens) and the peak allocated memory. Measured once on an H200 (docs/gpu.md). Usage:

    PYTHONPATH=src python3 scripts/gpu_block_sweep.py opt-125m opt-1.3b
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import zotune.optim as zo
from zotune.bench.step_model import NaiveMeZO, build_model, make_batch, make_closure


def timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def makers(model: torch.nn.Module) -> dict[str, Callable[[], Any]]:
    rows: dict[str, Callable[[], Any]] = {
        f"2^{k}": (lambda k=k: zo.ZOSGD(model, lr=1e-7, seed=0, block_size=1 << k)) for k in (18, 20, 22, 24)}
    rows["radem 2^22"] = lambda: zo.ZOSGD(model, lr=1e-7, seed=0, block_size=1 << 22, distribution="rademacher")
    rows["mezo-ref"] = lambda: NaiveMeZO(model, lr=1e-7, seed=0)
    return rows


def main() -> None:
    for shape in sys.argv[1:] or ["opt-125m", "opt-1.3b"]:
        for dtype in (torch.float32, torch.bfloat16):
            model = build_model(shape, 0, device="cuda", dtype=dtype)
            closure = make_closure(model, make_batch(model.config.vocab_size, 16, 64, 1, device="cuda"))
            closure()
            forward = statistics.median(timed(closure) for _ in range(5))
            cells = []
            for name, make in makers(model).items():
                opt = make()
                opt.step(closure)
                torch.cuda.reset_peak_memory_stats()
                step = functools.partial(opt.step, closure)
                ms = statistics.median(timed(step) for _ in range(5)) * 1e3
                gib = torch.cuda.max_memory_allocated() / 2**30
                cells.append(f"{name}: {ms:.1f} ms ({ms / (2e3 * forward):.2f}x2F, {gib:.2f} GiB)")
                del opt
            print(f"{shape} {str(dtype)[6:]}: F {forward * 1e3:.2f} ms | " + " | ".join(cells), flush=True)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
