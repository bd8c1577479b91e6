"""``zotune bench quadratic``: steps and forwards to 1% of the initial loss on diagonal quadratics.

Problem: f(x) = 1/2 sum_i D_i x_i^2 with D log-spaced from 1 to ``cond`` (d = 2, 10, 100;
cond = 100, 1000), x0_i = 1/sqrt(D_i) so every coordinate carries the same loss, f0 = d/2.
Parameters are float64, shaped as a near-square matrix (d = 10: 2x5, d = 100: 10x10) so that
HiZOO-L's row/column factors are exercised (log-spaced D is exactly rank one in that layout);
every other method is element-wise and does not see the shape.

A second family, ``--problems lowrank``, is a matrix least-squares problem whose solution has
low rank: W is rows x cols (the same near-square layout, d >= 4), f(W) = 1/2 tr(E S E^T) with
E = W - W*, S = Q diag(D) Q^T a rotated column covariance (Q a fixed random rotation, D
log-spaced from 1 to ``cond``), W* = sum_{i<2} a_i b_i^T of rank 2 (fixed random orthonormal
a_i, b_i, scaled so that f0 = f(0) = d/2), and x0 = W0 = 0. Its gradient (W - W*) S is rank 2
at the start and no coordinate system diagonalises it: where the matrix-structured methods'
assumption (a low-rank gradient) holds and the diagonal-Hessian methods' does not.

Every registered optimizer is run (``zotune.optim.available()``); HiZOO also as one row per
option (published default, trace correction, abs-after-EMA, clamping, warm start, harmonic
alpha schedule, n_samples = 4, hessian_every = 2) and over an alpha grid. For each row and problem:

1. **screen** (median of seeds 0-2; seed 2 runs only when 0 and 1 disagree, otherwise the
   worse of the two): hill-climb over a half-decade learning-rate grid (per alpha), starting
   from a per-method guess. A run stops
   at the threshold, at divergence (f > 1e3 f0), or when it is still above 10% of f0 at a
   checkpoint (every max_steps / 8) and its rate since the previous checkpoint predicts more
   than 3x the remaining steps ("abandoned": not reached);
2. **confirm**: the best screened setting with ``--seeds`` seeds (directions differ, x0 is
   fixed), then up to ``--confirm`` - 1 more that reached in screening (within 1.5x of the
   best once a median is finite); the reported setting has the lowest median steps. A
   candidate is cut at twice the best median so far and dropped once half its seeds fail
   (neither changes a median that could win).

Reported per cell: median steps to f <= 0.01 f0 over the seeds (not reached counts as
infinite), median forwards (closure calls) to the same point, and the chosen lr (alpha).

Example::

    zotune bench quadratic --quick
    zotune bench quadratic --jobs 2 --json runs/quadratic.json --markdown runs/quadratic.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from zotune.bench._common import DASH, machine_info, markdown_table, resolve_optimizers, write_json

DESCRIPTION = __doc__.split("\n\n")[0]

THRESHOLD = 0.01  # target: f <= THRESHOLD * f0
DIVERGED = 1e3  # a run stops as diverged when f > DIVERGED * f0
#: a run is abandoned (not reached) at a checkpoint (every max_steps / 8) only if f > ABANDON_ABOVE f0
#: and its rate since the previous checkpoint predicts more than 3x the remaining steps
ABANDON_ABOVE = 0.1

#: the learning-rate grid: half decades from 1e-7 to 100 (HiZOO's h grows to ~(d+2)/2 H, so its
#: best lr can be O(1) or more)
LR_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-14, 5))
#: HiZOO's Hessian smoothing alpha grid
ALPHA_GRID: tuple[float, ...] = (1e-1, 1e-2, 1e-3)


def _sgd_like(d: int, cond: float) -> float:
    return 1.0 / ((d + 2) * cond)


#: where the lr search starts, per method (unknown methods start at 1e-3); a guess only
LR_START: dict[str, Callable[[int, float], float]] = {
    "ZOSGD": _sgd_like,
    "ZOSGDMomentum": lambda d, c: 0.1 * _sgd_like(d, c),
    "ZOSGDConservative": _sgd_like,
    "ZOSGDSign": lambda d, c: 1e-2,
    "ZOAdam": lambda d, c: 1e-2,
    "ZOAdaMU": lambda d, c: 1e-2,
    "HiZOO": lambda d, c: 1e-1,
    "HiZOOLowRank": lambda d, c: 1e-1,
    "HELENE": _sgd_like,
    "LOZO": lambda d, c: 0.5 * _sgd_like(d, c),  # E ||U V^T||^2 is r = 2 times a dense z's
    "LOZOM": lambda d, c: 0.5 * _sgd_like(d, c),
    "SubZero": _sgd_like,
    "ZOMuon": lambda d, c: 1e-2,  # the size of an orthogonal step
}

#: the benchmark's problems are one tensor; ZO-Muon's vector rule (lr * 1e-5, for biases and
#: norms beside matrices) would only rescale its lr on d = 2, so vectors use the matrix lr here
_ZO_MUON_BENCH = {"vector_lr_scale": 1.0}


@dataclass(frozen=True)
class Row:
    """One line of the table: a method with fixed options (and an alpha grid for HiZOO)."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    alphas: tuple[float | None, ...] = (None,)


def default_rows(methods: Sequence[str], alphas: Sequence[float], max_steps: int) -> list[Row]:
    """The benchmark rows for these registered class names."""
    rows: list[Row] = []
    a = tuple(alphas)
    for name in methods:
        if name == "HiZOO":
            rows += [
                Row("HiZOO (published)", name, {}, a),
                Row("HiZOO trace_correction", name, {"trace_correction": True}, a),
                Row("HiZOO trace + abs_after_ema", name, {"trace_correction": True, "abs_after_ema": True}, a),
                Row("HiZOO clamped [1e-4, 1e4]", name, {"h_min": 1e-4, "h_max": 1e4}, a),
                Row("HiZOO warm start (10 probes)", name, {"warmup_probes": 10}, a),
                Row("HiZOO harmonic alpha", name, {"alpha_schedule": "harmonic"}, a),
                Row("HiZOO n_samples=4", name, {"n_samples": 4}, a),
                Row("HiZOO hessian_every=2", name, {"hessian_every": 2}, a),
                Row("HiZOO trace + abs_after_ema + harmonic", name,
                    {"trace_correction": True, "abs_after_ema": True, "alpha_schedule": "harmonic"}, a),
            ]
        elif name == "HiZOOLowRank":
            rows.append(Row("HiZOO-L (published)", name, {}, a))
        elif name == "ZOAdaMU":
            # the paper's proportions: T1 = 1024 of 20K steps (~5%), T2 = 80%, T3 = the run length
            rows.append(Row("ZOAdaMU (T1, T3 = 5%, 100% of max steps)", name,
                            {"total_steps": max_steps, "t1": max(1, round(0.05 * max_steps))}))
        elif name == "SubZero":
            rows += [Row("SubZero (published r 24, T 1000)", name),
                     Row("SubZero r=2, T=100", name, {"rank": 2, "interval": 100})]
        elif name == "ZOMuon":
            rows += [Row("ZOMuon (published r 64, N 4, K 100)", name, dict(_ZO_MUON_BENCH)),
                     Row("ZOMuon r=2", name, {**_ZO_MUON_BENCH, "rank": 2})]
        else:
            rows.append(Row(name, name))
    return rows


# ---------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Problem:
    d: int
    cond: float
    kind: str = "diagonal"  # or "lowrank"

    def shape(self) -> tuple[int, int]:
        r = max(k for k in range(1, math.isqrt(self.d) + 1) if self.d % k == 0)
        return r, self.d // r

    def diagonal(self) -> torch.Tensor:
        return torch.logspace(0.0, math.log10(self.cond), self.d, dtype=torch.float64)

    def start_and_loss(self) -> tuple[torch.Tensor, Callable[[torch.Tensor], float]]:
        """x0 (float64, in the problem's shape) and f(x)."""
        if self.kind == "diagonal":
            diag = self.diagonal()
            return (1.0 / diag.sqrt()).view(self.shape()), lambda x: 0.5 * float(torch.dot(x.view(-1) ** 2, diag))
        rows, cols = self.shape()
        g = torch.Generator().manual_seed(1234 + self.d)
        q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
        root = q * torch.logspace(0.0, math.log10(self.cond), cols, dtype=torch.float64).sqrt()  # S = root root^T
        a, _ = torch.linalg.qr(torch.randn(rows, 2, generator=g, dtype=torch.float64))
        b, _ = torch.linalg.qr(torch.randn(cols, 2, generator=g, dtype=torch.float64))
        target = a @ torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64)) @ b.T
        target *= math.sqrt(0.5 * self.d / (0.5 * float(((target @ root) ** 2).sum())))  # f0 = d / 2

        def loss(x: torch.Tensor) -> float:
            return 0.5 * float((((x - target) @ root) ** 2).sum())

        return torch.zeros(rows, cols, dtype=torch.float64), loss

    @property
    def label(self) -> str:
        return f"{self.kind} d={self.d} cond={self.cond:g}"


@dataclass
class RunResult:
    steps: float  # steps to threshold, inf if not reached
    forwards: float  # closure calls to threshold, inf if not reached
    final_ratio: float  # f / f0 where the run stopped
    status: str  # reached | diverged | abandoned | capped | max_steps


def run_once(method: str, options: dict[str, Any], lr: float, alpha: float | None, problem: Problem,
             seed: int, cap: int, max_steps: int, eps: float) -> RunResult:
    """One run from x0 with one seed, at most ``cap`` steps."""
    import zotune.optim as zo

    x0, loss = problem.start_and_loss()
    x = torch.nn.Parameter(x0.clone())
    f0 = 0.5 * problem.d
    kw = dict(options, lr=lr, eps=eps, seed=seed, num_threads=1)
    if alpha is not None:
        kw["alpha"] = alpha
    opt = zo.create(method, [x], **kw)

    def closure() -> float:
        return loss(x.data)

    window = max(1, max_steps // 8)
    history = {0: 1.0}
    ratio = 1.0
    for step in range(1, cap + 1):
        opt.step(closure)
        ratio = loss(x.data) / f0
        if not math.isfinite(ratio) or ratio > DIVERGED:
            return RunResult(math.inf, math.inf, ratio, "diverged")
        if ratio <= THRESHOLD:
            return RunResult(step, float(opt.zo_state["forwards"]), ratio, "reached")
        if step % window == 0:
            history[step] = ratio
            rate = math.log(history[step - window] / ratio) / window  # recent log-decrease per step
            needed = math.log(ratio / THRESHOLD)
            if ratio > ABANDON_ABOVE and (rate <= 0 or needed / rate > 3 * (cap - step)):
                return RunResult(math.inf, math.inf, ratio, "abandoned")
    return RunResult(math.inf, math.inf, ratio, "max_steps" if cap >= max_steps else "capped")


def _median(values: Sequence[float]) -> float:
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return math.inf
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ---------------------------------------------------------------------- search
def _score(r: RunResult, lr: float) -> tuple[int, float]:
    """Lower is better: reached (by steps) < unreached at max steps (by final f) < cut short
    < diverged (by lr: a smaller lr is closer to stable)."""
    if r.status == "reached":
        return 0, r.steps
    if r.status in ("max_steps", "abandoned"):
        return 1, r.final_ratio
    if r.status == "capped":
        return 2, r.final_ratio
    return 3, lr


def search_cell(row: Row, problem: Problem, seeds: int, max_steps: int, eps: float,
                confirm: int = 3) -> dict[str, Any]:
    """Screen the (alpha, lr) grid with a median of 3 seeds, confirm the best with all seeds."""
    # Longer than our ~80-line guideline on purpose: the screening closures share one cache of
    # runs (screened, caps, best_steps) with the confirmation pass, and splitting them apart would
    # mean threading that state through four functions for no gain in clarity.
    t0 = time.perf_counter()
    start = LR_START.get(row.method, lambda d, c: 1e-3)(problem.d, problem.cond)
    i_start = min(range(len(LR_GRID)), key=lambda i: abs(math.log(LR_GRID[i] / start)))
    screened: dict[tuple[float | None, int], list[RunResult]] = {}
    caps: dict[tuple[float | None, int], int] = {}
    best_steps = math.inf
    runs = 0

    def worst(key: tuple[float | None, int]) -> RunResult:
        """The screening score's run: the median seed of 3 (an upper bound of it when the third
        seed was not needed)."""
        ordered = sorted(screened[key], key=lambda r: _score(r, LR_GRID[key[1]]))
        return ordered[1] if len(ordered) == 3 else ordered[-1]

    def rank(key: tuple[float | None, int]) -> tuple[int, float]:
        return _score(worst(key), LR_GRID[key[1]])

    def screen(alpha: float | None, i: int) -> tuple[int, float]:
        nonlocal best_steps, runs
        key = (alpha, i)
        if key not in screened:
            cap = int(min(max_steps, 3 * best_steps))
            results: list[RunResult] = []
            for seed in range(min(3, seeds)):
                reached = sum(r.status == "reached" for r in results)
                if len(results) == 2 and reached != 1:
                    break  # both reached (the worse bounds the median of 3) or both failed
                r = run_once(row.method, row.options, LR_GRID[i], alpha, problem, seed, cap, max_steps, eps)
                runs += 1
                results.append(r)
            screened[key], caps[key] = results, cap
            best_steps = min(best_steps, worst(key).steps)
        return rank(key)

    for alpha in row.alphas:
        best = i_start
        screen(alpha, best)
        for direction in (+1, -1):  # hill-climb: move while the score improves
            i = best + direction
            while 0 <= i < len(LR_GRID) and screen(alpha, i) < screen(alpha, best):
                best, i = i, i + direction
            if best != i_start:
                break
        i_start = best  # next alpha starts from here

    ranked = sorted(screened, key=rank)
    top = worst(ranked[0])
    best_median, chosen, confirmed = math.inf, None, 0
    for key in ranked:
        if confirmed >= confirm:
            break
        # after the best: only settings that reached in screening, and (once a median is finite)
        # only those that screened within 1.5x of the best
        if chosen is not None and not (rank(key)[0] == 0 and (
                not math.isfinite(best_median) or worst(key).steps <= 1.5 * top.steps)):
            continue
        alpha, i = key
        cap = int(min(max_steps, 2 * best_median))
        results: list[RunResult] = []
        for seed in range(seeds):
            if seed < len(screened[key]) and caps[key] == cap:  # the screening run is this run
                r = screened[key][seed]
            else:
                r = run_once(row.method, row.options, LR_GRID[i], alpha, problem, seed, cap, max_steps, eps)
                runs += 1
            results.append(r)
            if sum(x.status != "reached" for x in results) * 2 >= seeds:
                break  # half failed: the median is infinite / cannot win
        confirmed += 1
        steps = [x.steps for x in results] + [math.inf] * (seeds - len(results))
        med = _median(steps)
        if chosen is None or med < best_median:
            fwd = [x.forwards for x in results] + [math.inf] * (seeds - len(results))
            best_median = med
            chosen = {
                "lr": LR_GRID[i], "alpha": alpha, "median_steps": med, "median_forwards": _median(fwd),
                "reached": sum(x.status == "reached" for x in results), "seeds": seeds,
                "steps": steps, "status": [x.status for x in results],
                "median_final_ratio": _median([x.final_ratio for x in results]),
            }
    assert chosen is not None
    return {
        "row": row.label, "method": row.method, "options": row.options, "d": problem.d, "cond": problem.cond,
        "problem": problem.kind,
        **chosen,
        "screened": [{"alpha": a, "lr": LR_GRID[i], "status": [r.status for r in rs],
                      "steps": [r.steps for r in rs], "final_ratio": [r.final_ratio for r in rs]}
                     for (a, i), rs in screened.items()],
        "confirmed": confirmed, "runs": runs, "seconds": time.perf_counter() - t0,
    }


def _job(args: tuple[Row, Problem, int, int, float, int]) -> dict[str, Any]:
    torch.set_num_threads(1)
    return search_cell(*args)


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 10, 100], help="dimensions d")
    parser.add_argument("--conds", type=float, nargs="+", default=[100.0, 1000.0], help="condition numbers")
    parser.add_argument("--problems", nargs="+", choices=("diagonal", "lowrank"), default=["diagonal", "lowrank"],
                        help="problem families (lowrank: matrix least squares with a rank-2 solution, d >= 4)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per confirmed setting (median)")
    parser.add_argument("--max-steps", type=int, default=4000, help="steps before a run counts as not reached")
    parser.add_argument("--eps", type=float, default=1e-3, help="perturbation scale")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHA_GRID), help="HiZOO alpha grid")
    parser.add_argument("--optimizers", nargs="*", default=None, help="names or aliases (default: all registered)")
    parser.add_argument("--rows", nargs="*", default=None,
                        help="only rows whose label contains one of these (case-insensitive)")
    parser.add_argument("--confirm", type=int, default=3,
                        help="at most this many screened settings are confirmed with all seeds")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (cells run in parallel)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke version: d = 2, 10, cond 100, 3 seeds, 300 steps, alpha 0.1, confirm 1")
    parser.add_argument("--json", default=None, help="write all results (with the screened grid) here")
    parser.add_argument("--markdown", default=None, help="write the tables here")


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return DASH
    if not math.isfinite(result["median_steps"]):
        return f"not reached ({result['reached']}/{result['seeds']})"
    return f"{result['median_steps']:g} / {result['median_forwards']:g}"


def _setting(result: dict[str, Any] | None) -> str:
    if result is None or not math.isfinite(result["median_steps"]):
        return DASH
    text = f"{result['lr']:.0e}"
    return text if result["alpha"] is None else f"{text}, α {result['alpha']:g}"


def render(results: list[dict[str, Any]], rows: list[Row], dims: Sequence[int], conds: Sequence[float],
           header: str) -> str:
    """Markdown: one table per condition number, cells 'median steps / median forwards'."""
    out = [header]
    index = {(r.get("problem", "diagonal"), r["row"], r["d"], r["cond"]): r for r in results}
    for kind in dict.fromkeys(r.get("problem", "diagonal") for r in results):
        kind_dims = [d for d in dims if any(k[0] == kind and k[2] == d for k in index)]
        for cond in conds:
            title = "diagonal quadratic" if kind == "diagonal" else "low-rank matrix least squares"
            out.append(f"\n### {title}, cond = {cond:g}: median steps / forwards to 1% of f0 (lr, α)\n")
            headers = ["method"] + [h for d in kind_dims for h in (f"d={d}", "lr, α")]
            table = []
            for row in rows:
                if not any((kind, row.label, d, cond) in index for d in kind_dims):
                    continue
                line = [row.label]
                for d in kind_dims:
                    res = index.get((kind, row.label, d, cond))
                    line += [_cell(res), _setting(res)]
                table.append(line)
            out.append(markdown_table(headers, table))
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.dims, args.conds, args.seeds, args.max_steps, args.alphas = [2, 10], [100.0], 3, 300, [0.1]
        args.confirm = 1
    methods = resolve_optimizers(args.optimizers)
    rows = default_rows(methods, args.alphas, args.max_steps)
    if args.rows:
        rows = [r for r in rows if any(s.lower() in r.label.lower() for s in args.rows)]
    problems = [Problem(d, c, kind) for kind in args.problems for c in args.conds for d in args.dims
                if kind == "diagonal" or d >= 4]
    jobs = [(row, p, args.seeds, args.max_steps, args.eps, args.confirm) for p in problems for row in rows]
    jobs.sort(key=lambda j: -j[1].d)  # big cells first
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []

    def done(res: dict[str, Any]) -> None:
        results.append(res)
        print(f"[{time.perf_counter() - t0:7.1f}s] {res['row']:<40} {res['problem']:<8} d={res['d']:<4} "
              f"cond={res['cond']:<6g} "
              f"{_cell(res):<24} {_setting(res):<16} ({res['runs']} runs, {res['seconds']:.1f}s)",
              file=sys.stderr, flush=True)

    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(args.jobs, os.cpu_count() or 1)) as pool:
            for res in pool.imap_unordered(_job, jobs):
                done(res)
    else:
        for job in jobs:
            done(_job(job))
    wall = time.perf_counter() - t0
    command = " ".join(["zotune", *sys.argv[1:]])
    header = (f"Quadratics ({', '.join(args.problems)}), float64, eps {args.eps:g}, {args.seeds} seeds, "
              f"max {args.max_steps} steps "
              f"({wall / 60:.1f} min wall, {args.jobs} jobs).")
    text = render(results, rows, args.dims, args.conds, header)
    print(text)
    if args.markdown:
        from pathlib import Path

        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if args.json:
        write_json(args.json, {"command": command.strip(), "machine": machine_info(), "wall_seconds": wall,
                               "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                               "results": results})
    return 0
