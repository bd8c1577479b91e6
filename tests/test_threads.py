"""Perturbation worker threads: when the engine uses them, and that they never change the result.

No wall-clock assertions: ``zotune bench threads`` prints the timings (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os

import torch

import zotune.optim as zo
from zotune.bench import threads as tb
from zotune.optim.sweep import MIN_ELEMENTS_PER_WORKER


def test_small_models_use_one_worker_large_ones_several():
    small = [torch.zeros(1000, 100, requires_grad=True)]  # 100k elements
    opt = zo.ZOSGD(small, lr=0.0)
    opt._prepare()
    assert opt._threads() == 1
    big = [torch.zeros(2 * MIN_ELEMENTS_PER_WORKER // 1000, 1000, requires_grad=True)]
    opt = zo.ZOSGD(big, lr=0.0)
    opt._prepare()
    assert opt._threads() == max(1, min(4, torch.get_num_threads(), os.cpu_count() or 1, 2))
    assert zo.ZOSGD(small, lr=0.0, num_threads=3)._threads() == 3  # an explicit count is used as given


def test_workers_run_without_autograd_on_plain_tensors():
    """Grad mode is per thread: worker threads must not track the in-place perturbation of a plain
    ``requires_grad`` tensor (this raised 'a view of a view ... modified inplace' before)."""
    results = []
    for workers in (1, 3):
        x = torch.zeros(600, 1000, requires_grad=True)  # three noise blocks: several workers get work
        opt = zo.ZOSGD([x], lr=1e-2, eps=1e-3, seed=5, num_threads=workers)
        opt.step(lambda x=x: (x.detach() - 1).pow(2).mean())
        results.append(x.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert results[0].abs().sum() > 0


def test_threads_benchmark_tiny(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    tb.add_arguments(parser)
    args = parser.parse_args(["--model-shapes", "tiny", "--batch", "1x8", "--rounds", "1", "--torch-threads", "1",
                              "--workers", "1", "auto", "--json", str(tmp_path / "t.json")])
    assert tb.run(args) == 0
    out = capsys.readouterr().out
    assert "vs best" in out and "auto (1)" in out  # a tiny model gets one worker
    import json

    data = json.loads((tmp_path / "t.json").read_text())
    rows = data["shapes"][0]["rows"]
    assert {r["workers"] for r in rows} == {1, "auto"}
    assert min(r["vs_best"] for r in rows) == 1.0 and all(r["vs_best"] >= 1.0 for r in rows)
