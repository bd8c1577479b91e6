"""Interleaved timing for ``zotune bench step``: F, every case's step and single perturbation passes.

Each round runs every task once in a shuffled order; ratios are taken per round (against the
F of the same round) and their medians reported. Every sample records how many cores other
processes used meanwhile, so contended rounds can be left out (see :data:`CLEAN_LOAD`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zotune.bench._common import measure_other_load, median, timed, wait_quiet
from zotune.bench.step_cases import NAIVE, REFERENCE, Case
from zotune.bench.step_model import param_count

CLEAN_LOAD = 0.3  # foreign cores above which a sample counts as contended

Task = tuple[str, str, Callable[[], Any]]  # (kind, key, function)


def _pass_fn(case: Case, sign: float) -> Callable[[], None]:
    """One perturbation pass over all parameters, by ``sign * eps`` along the same z."""
    runner = case.runner
    if case.optimizer == NAIVE:

        def naive_pass() -> None:
            runner.zo_random_seed = 123456789  # the +1 and -1 passes must draw the same z
            with torch.no_grad():
                runner.perturb(sign)

        return naive_pass

    def engine_pass() -> None:
        runner._prepare()
        runner._pending = {}
        with torch.no_grad():
            runner._displace(123456789, sign * runner.eps)
        runner._pending = {}

    return engine_pass


def _step_fn(case: Case, closure: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One step of the case, counting the passes over the weights it made (engine optimizers)."""
    runner = case.runner
    counts = getattr(runner, "pass_counts", None)

    def step() -> None:
        before = counts["passes"] if counts is not None else 0
        runner.step(closure)
        case.passes += (counts["passes"] - before) if counts is not None else 0
        case.steps += 1

    return step


def warm_up(closure: Callable[[], torch.Tensor], cases: list[Case], log: Callable[[str], None] = print) -> None:
    """One step of every case: allocates state, spins up worker pools, touches every code path.

    An optimizer that raises gets ``case.error`` (the run reports it and exits non-zero).
    """
    closure()
    for c in cases:
        if c.error is not None:
            continue
        try:
            c.runner.step(c.closure or closure)
        except Exception as e:  # recorded in the row; run() turns any error row into a failed run
            c.error = f"step failed: {type(e).__name__}: {e}"
            log(f"  {c.key}: {c.error}")


def build_tasks(closure: Callable[[], torch.Tensor], runnable: list[Case], passes: bool) -> list[Task]:
    """Two forwards, one step per case and (with ``passes``) a +/- pass of ZO-SGD and MeZO's code."""
    tasks: list[Task] = [("forward", "F", closure), ("forward", "F", closure)]
    tasks += [("step", c.key, _step_fn(c, c.closure or closure)) for c in runnable]
    if passes:
        for c in runnable:
            if c.optimizer in (NAIVE, REFERENCE) and not c.lazy:  # a lone pass would consume the deferred update
                tasks += [("pass", c.key, _pass_fn(c, +1.0)), ("pass", c.key, _pass_fn(c, -1.0))]
    return tasks


def run_rounds(tasks: list[Task], rounds: int, quiet_wait: float = 0.0, seed: int = 0,
               log: Callable[[str], None] = print) -> tuple[Samples, list[dict[str, Any]]]:
    """Run every task once per round in a shuffled order; return the samples and per-round info."""
    samples = Samples(rounds)
    round_info = []
    for r in range(rounds):
        waited, load = wait_quiet(CLEAN_LOAD, quiet_wait) if quiet_wait > 0 else (0.0, measure_other_load(0.2))
        order = list(tasks)
        random.Random(seed * 1000 + r).shuffle(order)
        t0 = time.perf_counter()
        for kind, key, fn in order:
            samples.add(kind, key, r, timed(fn))
        seconds = time.perf_counter() - t0
        round_info.append({"round": r, "seconds": seconds, "waited_s": waited, "load_before": load})
        log(f"  round {r + 1}/{rounds}: {seconds:.1f} s (other load before: {load:.2f} cores)")
    return samples, round_info


class Samples:
    """``(seconds, foreign cores)`` samples per task and round, and the statistics taken from them."""

    def __init__(self, rounds: int):
        self.rounds = rounds
        self.data: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}

    def add(self, kind: str, key: str, r: int, sample: tuple[float, float]) -> None:
        self.data.setdefault((kind, key), [[] for _ in range(self.rounds)])[r].append(sample)

    def per_round_mean(self, kind: str, key: str) -> list[float]:
        return [sum(w for w, _ in s) / len(s) if s else float("nan") for s in self.data[(kind, key)]]

    def loads(self, kind: str, key: str) -> list[float]:
        return [o for s in self.data[(kind, key)] for _, o in s]

    def round_load(self, kind: str, key: str) -> list[float]:
        return [max((o for _, o in s), default=float("nan")) for s in self.data[(kind, key)]]

    def clean_rounds(self, kind: str, key: str) -> list[int]:
        """Rounds in which this task's samples and the forwards ran uncontended."""
        f_clean = [x < CLEAN_LOAD for x in self.round_load("forward", "F")]
        return [r for r, x in enumerate(self.round_load(kind, key)) if f_clean[r] and x < CLEAN_LOAD]

    def used_rounds(self, kind: str, key: str) -> list[int]:
        """The clean rounds if there are at least two (or all rounds are clean), else all rounds."""
        clean = self.clean_rounds(kind, key)
        return clean if len(clean) >= min(2, self.rounds) else list(range(self.rounds))


def summarise(samples: Samples, runnable: list[Case], n_params: int) -> dict[str, Any]:
    """Median per-round ratios of every step and pass against the F of its round."""
    f_rounds = samples.per_round_mean("forward", "F")
    out: dict[str, Any] = {
        "forward": {"median_s": median(f_rounds), "per_round_s": f_rounds,
                    "other_load_median": median(samples.loads("forward", "F")),
                    "clean_rounds": sum(x < CLEAN_LOAD for x in samples.round_load("forward", "F"))},
        "cases": {}, "passes": {}, "clean_load": CLEAN_LOAD,
    }
    step_rounds = {c.key: samples.per_round_mean("step", c.key) for c in runnable}
    naive = step_rounds.get(NAIVE)
    for c in runnable:
        s, idx = step_rounds[c.key], samples.used_rounds("step", c.key)
        ref = step_rounds.get(f"{REFERENCE}/{c.distribution if c.optimizer != NAIVE else 'gaussian'}")
        out["cases"][c.key] = {
            "step_s": median(s[r] for r in idx),
            "per_round_s": s,
            "step_over_kF": median(s[r] / (c.forwards_per_step * f_rounds[r]) for r in idx),
            "step_over_2F": median(s[r] / (2 * f_rounds[r]) for r in idx),
            "vs_reference": median(s[r] / ref[r] for r in idx) if ref else None,
            "speedup_vs_naive": median(naive[r] / s[r] for r in idx) if naive else None,
            "other_load_median": median(samples.loads("step", c.key)),
            "other_load_max": max(samples.loads("step", c.key), default=float("nan")),
            "clean_rounds": len(samples.clean_rounds("step", c.key)),
            "rounds_used": idx,
            "passes_per_step": c.passes / c.steps if c.steps and c.optimizer != NAIVE else None,
        }
    for key in [c.key for c in runnable if ("pass", c.key) in samples.data]:
        p, idx = samples.per_round_mean("pass", key), samples.used_rounds("pass", key)
        out["passes"][key] = {
            "pass_s": median(p[r] for r in idx), "per_round_s": p,
            "pass_over_F": median(p[r] / f_rounds[r] for r in idx),
            "ns_per_param": median(p[r] for r in idx) * 1e9 / n_params,
            "other_load_median": median(samples.loads("pass", key)),
            "clean_rounds": len(samples.clean_rounds("pass", key)),
            "rounds_used": idx,
        }
    return out


def time_cases(model: nn.Module, closure: Callable[[], torch.Tensor], cases: list[Case], *, rounds: int,
               passes: bool = True, quiet_wait: float = 0.0, seed: int = 0,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Interleaved timing of F, every case's step and (optionally) single passes.

    Returns ``{"forward": {...}, "cases": {key: {...}}, "passes": {key: {...}}, "rounds": [...]}``
    with per-round samples ``(seconds, foreign cores)`` and median per-round ratios. Cases whose
    warm-up step raised get ``case.error`` and are not timed.
    """
    warm_up(closure, cases, log)
    runnable = [c for c in cases if c.error is None]
    samples, round_info = run_rounds(build_tasks(closure, runnable, passes), rounds, quiet_wait, seed, log)
    return {**summarise(samples, runnable, param_count(model)), "rounds": round_info}
