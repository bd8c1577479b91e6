"""``zotune bench``: benchmarks that print ratios measured side by side in one run.

Each benchmark is a module of this package exposing ``add_arguments(parser)`` and
``run(args) -> int``; add it to ``BENCHMARKS`` to make it a subcommand.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "step": ("zotune.bench.step", "step time / 2 forwards and peak memory / inference, per optimizer"),
    "functions": ("zotune.bench.functions", "trajectories of every optimizer on 2-D test functions"),
    "quadratic": ("zotune.bench.quadratic", "steps to 1% of the initial loss on diagonal quadratics"),
    "scale": ("zotune.bench.scale", "data-parallel throughput and bytes communicated per step"),
    "threads": ("zotune.bench.threads", "step time per (torch threads, engine workers) pair, optionally under load"),
    "gpu-check": ("zotune.bench.gpu_check", "every CUDA path on one GPU (CPU parts without one); JSON + markdown"),
    "cache": ("zotune.bench.cache", "step time with and without the frozen-bottom activation cache, per tuning mode"),
}

DESCRIPTION = "Benchmarks. Speed and memory are measured side by side in one run and printed as ratios."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_bench_module=module_name)
        try:
            importlib.import_module(module_name).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            p.set_defaults(_bench_missing=True)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "benchmark", None):
        print("usage: zotune bench {" + ",".join(BENCHMARKS) + "} ...  (see zotune bench --help)")
        return 2
    return int(importlib.import_module(args._bench_module).run(args) or 0)
