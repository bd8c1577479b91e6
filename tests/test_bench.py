"""The ``zotune bench step`` and ``zotune bench functions`` benchmarks, on tiny settings.

No wall-clock thresholds: the machine may be shared; only structure and sanity of the
figures are checked.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

import zotune.optim as zo
from zotune.bench import functions as fb
from zotune.bench import step as sb
from zotune.bench import step_memory
from zotune.bench.step_cases import default_distribution


def step_args(tmp_path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sb.add_arguments(parser)
    return parser.parse_args(["--model-shape", "tiny", "--batch", "2x16", "--rounds", "1",
                              "--json", str(tmp_path / "step.json"), *argv])


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------- step
def test_step_tiny_end_to_end(tmp_path, capsys):
    args = step_args(tmp_path, "--no-memory")
    assert sb.run(args) == 0
    out = capsys.readouterr().out
    assert "step/2F" in out and "Targets" in out
    data = json.loads((tmp_path / "step.json").read_text())
    assert {"machine", "config", "timing", "rows", "targets", "memory"} <= set(data)
    assert {"cpu", "torch", "torch_threads"} <= set(data["machine"])
    assert data["config"]["params"] > 0 and data["config"]["threads"] == 2
    assert positive(data["timing"]["forward"]["median_s"])
    keys = {row["key"] for row in data["rows"]}
    # every registered optimizer with its own default z (FZOO: Rademacher), ZO-SGD with both, MeZO's reference
    own = {f"{name}/{default_distribution(zo.get(name))}" for name in zo.available()}
    assert "FZOO/rademacher" in own and "LOZO/gaussian" in own
    assert own | {"ZOSGD/gaussian", "ZOSGD/rademacher", sb.NAIVE} <= keys
    for row in data["rows"]:
        assert row["forwards_per_step"] >= 1
        assert row["error"] is None, row  # every registered method must run with its defaults
        t = row["timing"]
        for key in ("step_s", "step_over_kF", "step_over_2F", "vs_reference", "speedup_vs_naive"):
            assert positive(t[key]), (row["key"], key, t[key])
    by_key = {row["key"]: row for row in data["rows"]}
    assert by_key["ZOSGD/gaussian"]["timing"]["vs_reference"] == pytest.approx(1.0)
    lezo = "ZOSGD[layer_fraction=0.25]"  # ZOSGD.bench_variants: its passes cover a quarter of the layers
    assert set(data["timing"]["passes"]) == {sb.NAIVE, "ZOSGD/gaussian", "ZOSGD/rademacher", f"{lezo}/gaussian",
                                             f"{lezo}/rademacher"}
    for p in data["timing"]["passes"].values():
        assert positive(p["pass_over_F"])
    # the targets are defined for opt-125m at 16x64 only
    assert all(t["met"] is None for t in data["targets"])


def test_step_fails_when_an_optimizer_raises(tmp_path, monkeypatch, capsys):
    """A crashing optimizer is a defect: its row records the exception and the run exits 1."""

    def broken(self, closure):
        raise RuntimeError("boom")

    monkeypatch.setattr(zo.get("ZOSGDSign"), "_zo_step", broken)
    args = step_args(tmp_path, "--no-memory", "--no-passes", "--no-naive", "--optimizers", "ZOSGDSign")
    assert sb.run(args) == 1
    captured = capsys.readouterr()
    assert "ZOSGDSign/gaussian: step failed: RuntimeError: boom" in captured.err
    rows = {row["key"]: row for row in json.loads((tmp_path / "step.json").read_text())["rows"]}
    assert rows["ZOSGDSign/gaussian"]["error"] == "step failed: RuntimeError: boom"
    assert rows["ZOSGDSign/gaussian"]["timing"] is None
    assert rows["ZOSGD/gaussian"]["error"] is None and rows["ZOSGD/gaussian"]["timing"]["step_s"] > 0


def test_select_cases_distributions():
    both = sb.select_cases(["zo-adam"], "both")
    lezo = "ZOSGD[layer_fraction=0.25]"  # ZOSGD.bench_variants
    # ZO-SGD's rows also come lazy (lazy_update=True: 2 passes per step), each on its own model copy
    lazy, lezo_lazy = "ZOSGD[lazy_update=True]", "ZOSGD[layer_fraction=0.25,lazy_update=True]"
    assert [c.key for c in both] == [sb.NAIVE, "ZOSGD/gaussian", f"{lezo}/gaussian", f"{lazy}/gaussian",
                                     f"{lezo_lazy}/gaussian", "ZOSGD/rademacher", f"{lezo}/rademacher",
                                     f"{lazy}/rademacher", f"{lezo_lazy}/rademacher", "ZOAdam/gaussian",
                                     "ZOAdam/rademacher"]
    default = sb.select_cases(None, None, naive=False)
    assert [c.key for c in default if c.distribution == "rademacher"] == [
        "ZOSGD/rademacher", f"{lezo}/rademacher", f"{lazy}/rademacher", f"{lezo_lazy}/rademacher",
        "FZOO/rademacher"]  # FZOO's own default
    assert {c.optimizer for c in default} == set(zo.available())
    every = {c.key for c in sb.select_cases(["zo-adam", "hizoo"], "gaussian", naive=False, lazy="all")}
    assert "ZOAdam[lazy_update=True]/gaussian" in every  # lazy-capable
    assert not any("lazy" in k for k in every if k.startswith("HiZOO"))  # not lazy-capable: no twin
    none = sb.select_cases(["zo-adam"], "gaussian", naive=False, lazy="none")
    assert not any(c.lazy for c in none)


def test_lazy_rows_step_their_own_model_and_report_passes():
    """A lazy row gets its own copy of the model (another row's forward would flush it through the
    hooks), and its timed steps make 2 passes each against the eager row's 3."""
    cases = sb.select_cases(["zosgd"], "gaussian", naive=False)
    model = sb.build_model("tiny")
    batch = sb.make_batch(model.config.vocab_size, 2, 8)
    sb.construct(cases, model, 0, log=lambda *_: None, batch=batch)
    lazy = next(c for c in cases if c.key == "ZOSGD[lazy_update=True]/gaussian")
    assert lazy.runner.module is not model and lazy.closure is not None
    timing = sb.time_cases(model, sb.make_closure(model, batch), cases, rounds=1, passes=False, log=lambda *_: None)
    assert timing["cases"]["ZOSGD/gaussian"]["passes_per_step"] == 3
    assert timing["cases"]["ZOSGD[lazy_update=True]/gaussian"]["passes_per_step"] == 2


def test_variant_rows_and_exact_state_accounting():
    cases = {c.key: c for c in sb.select_cases(["hizoo"], None, naive=False)}
    variant = cases["HiZOO[hessian_every=2]/gaussian"]
    assert variant.options == {"hessian_every": 2}
    assert sb.Case.from_memory_case(variant.memory_case) == sb.Case("HiZOO", "gaussian", options={"hessian_every": 2})
    model = sb.build_model("tiny")
    params = 4 * sb.param_count(model)
    runner = sb.make_runner(variant, model)
    assert runner.hessian_every == 2 and runner.forwards_per_step == 2.5
    assert sb.state_bytes(runner) == params  # h: exactly one fp32 buffer the size of the parameters
    assert sb.state_bytes(sb.make_runner(cases["ZOSGD/gaussian"], model)) == 0
    assert sb.state_bytes(sb.make_runner(sb.Case("ZOAdam"), model)) == 2 * params
    assert 0 < sb.state_bytes(sb.make_runner(sb.Case("HiZOOLowRank"), model)) < 0.05 * params


def test_memory_subprocess_tiny():
    args = argparse.Namespace(model_shape="tiny", batch="2x16", threads=1, seed=0, memory_steps=1)
    report = sb.run_memory_subprocess("opt:ZOSGD:gaussian", args)
    assert "error" not in report, report
    assert report["params"] > 0 and report["state_bytes"] == 0
    assert report["peak_mb"] >= report["rss_after_import_mb"] > 0


def test_memory_table_arithmetic(monkeypatch):
    """Ratios from fake subprocess reports: peak above import / inference's, extra / params."""
    peaks = {"import": 100.0, "inference": 300.0, "opt:ZOSGD:gaussian": 302.0, "opt:ZOAdam:gaussian": 340.0}
    monkeypatch.setattr(step_memory, "run_memory_subprocess", lambda case, args: {"case": case, "peak_mb": peaks[case]})
    cases = [sb.Case("ZOSGD"), sb.Case("ZOAdam")]
    args = argparse.Namespace(memory_reps=1, memory_jobs=2)
    mem = sb.measure_memory(cases, args, param_bytes=20 * 2**20, log=lambda s: None)
    assert mem["cases"]["ZOSGD/gaussian"]["peak_over_inference"] == pytest.approx(202 / 200)
    assert mem["cases"]["ZOAdam/gaussian"]["extra_params"] == pytest.approx(2.0)


def test_naive_mezo_restores_with_zero_lr():
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(5, 4)
    naive = sb.NaiveMeZO(model, lr=0.0)
    naive.step(lambda: model(x).pow(2).mean())
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- functions
@pytest.mark.parametrize("name", list(fb.FUNCTIONS))
def test_function_minimum(name):
    func = fb.FUNCTIONS[name]
    for mx, my in func.minimisers:
        assert float(func(mx, my)) == pytest.approx(func.f_min, abs=1e-9)
        # torch (the optimizer's closure) and numpy (the contours) agree
        t = func(torch.tensor(mx, dtype=torch.float64), torch.tensor(my, dtype=torch.float64))
        assert float(t) == pytest.approx(func.f_min, abs=1e-9)
        # a local minimum: nothing lower on a small ring around it
        ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        ring = func(mx + 1e-3 * np.cos(ang), my + 1e-3 * np.sin(ang))
        assert np.all(ring >= func.f_min - 1e-12)
    # no grid point in the plotted range is below the stated global minimum
    gx, gy = np.meshgrid(np.linspace(*func.xlim, 201), np.linspace(*func.ylim, 201))
    assert func(gx, gy).min() >= func.f_min - 1e-9
    assert func.initial_gap > 0
    assert func.xlim[0] < func.start[0] < func.xlim[1] and func.ylim[0] < func.start[1] < func.ylim[1]


def test_functions_benchmark_writes_png_and_table(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    fb.add_arguments(parser)
    args = parser.parse_args(["--functions", "quadratic", "rosenbrock", "--optimizers", "zo-sgd", "zo-adam",
                              "--steps", "20", "--lrs", "1e-3", "1e-2", "--out", str(tmp_path / "out"),
                              "--figure", str(tmp_path / "fig" / "trajectories.png")])
    assert fb.run(args) == 0
    out = tmp_path / "out"
    for name in ("trajectories.png", "quadratic.png", "rosenbrock.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "fig" / "trajectories.png").exists()
    table = (out / "table.md").read_text()
    assert "| method" in table and "ZOSGD" in table and "ZOAdam" in table
    data = json.loads((out / "results.json").read_text())
    assert set(data["functions"]) == {"quadratic", "rosenbrock"}
    for entry in data["functions"].values():
        for method in ("ZOSGD", "ZOAdam"):
            res = entry["methods"][method]
            assert res["lr"] in (1e-3, 1e-2)
            assert math.isfinite(res["final_gap"]) and res["final_gap"] >= 0
            assert len(res["trajectory"]) == 21 and res["trajectory"][0] == entry["start"]


def test_best_run_prefers_lowest_final_gap():
    func = fb.FUNCTIONS["quadratic"]
    runs = [fb.run_one(func, "ZOSGD", lr, 30) for lr in (1e-4, 1e-2, 10.0)]
    assert runs[2].diverged or runs[2].final_gap > runs[1].final_gap
    best = fb.best_run(runs)
    assert best.final_gap == min(r.final_gap for r in runs)
    assert best.gaps[0] == pytest.approx(func.initial_gap)
