"""``zotune bench functions``: trajectories of every optimizer on 2-D test functions.

Every registered optimizer starts from the same point with the same seed and runs
``--steps`` steps of ``opt.step(closure)`` on a 2-element float64 parameter, for each
learning rate of a small grid (default :data:`LR_GRID`); the learning rate with the best
final gap ``f(theta_T) - f*`` is kept per method and function. The benchmark writes

* ``trajectories.png``: one panel per function, the kept trajectory of every method over
  log-spaced contours of ``f - f*``, with the start (black circle) and the known minima
  (stars);
* ``<function>.png``: the same panel alone, with the learning rates in the legend;
* ``table.md`` and ``results.json``: final gap and the number of steps until the gap first
  falls to 1e-2 of the initial gap ("—" if never), per method and function.

Example::

    zotune bench functions --steps 500 --out runs/bench-functions
    zotune bench functions --functions rosenbrock beale --optimizers zo-sgd zo-adam --steps 200
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zotune.bench._common import (
    DASH,
    fmt,
    machine_info,
    markdown_table,
    module_main,
    resolve_optimizers,
    write_json,
)
from zotune.errors import UserError

DESCRIPTION = __doc__.split("\n\n")[0]

#: learning rates tried per method and function (log grid, half-decade steps)
LR_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
#: a run stops (and counts as diverged) when a coordinate leaves this box
DIVERGED = 1e6
THRESHOLD = 1e-2  # "steps to threshold": first step with gap <= THRESHOLD * initial gap
#: hyperparameters (other than lr), as a function of ``--steps``, for the methods whose LM
#: defaults are off-scale on a 2-D problem; methods not listed use their class defaults.
METHOD_KW: dict[str, Callable[[int], dict[str, Any]]] = {
    # the paper's schedule (T1 = 1024 of T3 = 20000 steps) scaled to --steps
    "ZOAdaMU": lambda steps: {"total_steps": steps, "t1": max(1, round(steps * 1024 / 20000))},
}
#: hyperparameters searched jointly with lr. HiZOO's alpha: the LM default 1e-6 would keep h ~ 1
#: (ZO-SGD) for ~1e6 steps, and the result on these problems is sensitive to it
METHOD_GRID: dict[str, dict[str, tuple[Any, ...]]] = {
    "HiZOO": {"alpha": (1e-3, 1e-2, 1e-1)},
    "HiZOOLowRank": {"alpha": (1e-3, 1e-2, 1e-1)},
}


def _cos(x: Any) -> Any:
    return torch.cos(x) if torch.is_tensor(x) else np.cos(x)


@dataclass(frozen=True)
class TestFunction:
    """A 2-D test function with its start point, known minimisers and contour range."""

    __test__ = False  # not a pytest test class

    name: str
    title: str
    fn: Callable[[Any, Any], Any]  # works on floats, numpy arrays and torch tensors
    start: tuple[float, float]
    minimisers: tuple[tuple[float, float], ...]
    f_min: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def __call__(self, x: Any, y: Any) -> Any:
        return self.fn(x, y)

    @property
    def initial_gap(self) -> float:
        return float(self(*self.start)) - self.f_min


def _quadratic(x: Any, y: Any) -> Any:
    # eigenvalues 1 and 25 (condition number 25), axes rotated by 30 degrees
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    u, v = c * x + s * y, -s * x + c * y
    return 0.5 * (u * u + 25.0 * v * v)


def _rosenbrock(x: Any, y: Any) -> Any:
    return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2


def _beale(x: Any, y: Any) -> Any:
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def _booth(x: Any, y: Any) -> Any:
    return (x + 2.0 * y - 7.0) ** 2 + (2.0 * x + y - 5.0) ** 2


def _himmelblau(x: Any, y: Any) -> Any:
    return (x * x + y - 11.0) ** 2 + (x + y * y - 7.0) ** 2


def _rastrigin(x: Any, y: Any) -> Any:
    two_pi = 2.0 * math.pi
    return 20.0 + x * x - 10.0 * _cos(two_pi * x) + y * y - 10.0 * _cos(two_pi * y)


def _styblinski_tang(x: Any, y: Any) -> Any:
    return 0.5 * (x**4 - 16.0 * x**2 + 5.0 * x + y**4 - 16.0 * y**2 + 5.0 * y)


_ST_X = -2.903534027771177  # root of 4x^3 - 32x + 5 = 0, the global minimiser per coordinate

#: every test function, by name (the order of the figure panels)
FUNCTIONS: dict[str, TestFunction] = {
    f.name: f
    for f in (
        TestFunction("quadratic", "ill-conditioned quadratic (κ = 25)", _quadratic, (-4.0, 3.5),
                     ((0.0, 0.0),), 0.0, (-5.0, 5.0), (-5.0, 5.0)),
        TestFunction("rosenbrock", "Rosenbrock", _rosenbrock, (-1.2, 1.0), ((1.0, 1.0),), 0.0,
                     (-2.0, 2.0), (-1.0, 3.0)),
        TestFunction("beale", "Beale", _beale, (1.0, 1.5), ((3.0, 0.5),), 0.0, (-1.0, 4.5), (-1.5, 2.0)),
        TestFunction("booth", "Booth", _booth, (-6.0, -4.0), ((1.0, 3.0),), 0.0, (-10.0, 10.0), (-10.0, 10.0)),
        TestFunction("himmelblau", "Himmelblau (4 global minima)", _himmelblau, (-0.5, -0.5),
                     ((3.0, 2.0), (-2.805118086952745, 3.131312518250573),
                      (-3.779310253377747, -3.283185991286170), (3.584428340330492, -1.848126526964404)),
                     0.0, (-6.0, 6.0), (-6.0, 6.0)),
        TestFunction("rastrigin", "Rastrigin (many local minima)", _rastrigin, (2.3, 2.8), ((0.0, 0.0),), 0.0,
                     (-5.12, 5.12), (-5.12, 5.12)),
        TestFunction("styblinski-tang", "Styblinski–Tang (saddles, local minima)", _styblinski_tang,
                     (-4.5, 0.1), ((_ST_X, _ST_X),), float(_styblinski_tang(_ST_X, _ST_X)), (-5.0, 5.0),
                     (-5.0, 5.0)),
    )
}


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--functions", nargs="+", metavar="NAME", default=None,
                        help=f"test functions (default: all: {', '.join(FUNCTIONS)})")
    parser.add_argument("--optimizers", nargs="+", metavar="NAME", default=None,
                        help="optimizer names or aliases (default: every registered one)")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per run (default: 500)")
    parser.add_argument("--lrs", nargs="+", type=float, default=None, metavar="LR",
                        help="learning-rate grid (default: " + " ".join(f"{x:g}" for x in LR_GRID) + ")")
    parser.add_argument("--eps", type=float, default=1e-3, help="perturbation scale of every method (1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="optimizer seed, the same for every run (0)")
    parser.add_argument("--out", default="runs/bench-functions", help="output folder (default: runs/bench-functions)")
    parser.add_argument("--figure", default=None, metavar="PNG",
                        help="also write the multi-panel figure to this path (e.g. docs/figures/trajectories.png)")


# ---------------------------------------------------------------------- runs
@dataclass
class Run:
    """One optimizer on one function with one learning rate."""

    optimizer: str
    lr: float
    trajectory: np.ndarray  # (steps + 1, 2); shorter if the run diverged
    gaps: np.ndarray  # f(theta_t) - f*, t = 0..len-1
    diverged: bool = False
    error: str | None = None
    searched: dict[str, Any] = field(default_factory=dict)  # grid-searched hyperparameters besides lr

    @property
    def label(self) -> str:
        """``lr 0.01`` or ``lr 0.01, alpha 0.1``."""
        return ", ".join([f"lr {self.lr:g}", *(f"{k} {v:g}" for k, v in self.searched.items())])

    @property
    def final_gap(self) -> float:
        if self.diverged or self.error or not len(self.gaps) or not math.isfinite(self.gaps[-1]):
            return math.inf
        return float(self.gaps[-1])

    def steps_to(self, threshold: float) -> int | None:
        hits = np.flatnonzero(self.gaps <= threshold)
        return int(hits[0]) if len(hits) else None


def method_kwargs(optimizer: str, steps: int) -> dict[str, Any]:
    """The 2-D hyperparameters of :data:`METHOD_KW` for ``optimizer`` and ``steps``."""
    make = METHOD_KW.get(optimizer)
    return make(steps) if make else {}


def search_space(optimizer: str) -> list[dict[str, Any]]:
    """Combinations of :data:`METHOD_GRID` values for ``optimizer`` (``[{}]`` if none)."""
    grid = METHOD_GRID.get(optimizer, {})
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def run_one(func: TestFunction, optimizer: str, lr: float, steps: int, *, eps: float = 1e-3,
            seed: int = 0, searched: dict[str, Any] | None = None) -> Run:
    """Run ``optimizer`` with ``lr`` (and ``searched`` hyperparameters) on ``func`` for ``steps`` steps."""
    import zotune.optim as zo

    w = torch.nn.Parameter(torch.tensor(func.start, dtype=torch.float64))

    def closure() -> torch.Tensor:
        return func(w[0], w[1])

    points = [w.detach().numpy().copy()]
    searched = dict(searched or {})
    extra = {**method_kwargs(optimizer, steps), **searched}
    try:
        try:
            opt = zo.create(optimizer, [w], lr=lr, eps=eps, seed=seed, num_threads=1, **extra)
        except TypeError:
            if not extra:
                raise
            opt = zo.create(optimizer, [w], lr=lr, eps=eps, seed=seed, num_threads=1)
    except Exception as e:  # a method that needs arguments this benchmark does not know
        return Run(optimizer, lr, np.array(points), np.array([math.inf]),
                   error=f"construction failed: {type(e).__name__}: {e}", searched=searched)
    diverged = False
    try:
        for _ in range(steps):
            opt.step(closure)
            p = w.detach().numpy().copy()
            if not np.all(np.isfinite(p)) or np.abs(p).max() > DIVERGED:
                diverged = True
                break
            points.append(p)
    except Exception as e:
        return Run(optimizer, lr, np.array(points), np.array([math.inf]),
                   error=f"step failed: {type(e).__name__}: {e}", searched=searched)
    traj = np.array(points)
    with np.errstate(over="ignore", invalid="ignore"):
        gaps = np.asarray(func(traj[:, 0], traj[:, 1]), dtype=np.float64) - func.f_min
    return Run(optimizer, lr, traj, gaps, diverged=diverged, searched=searched)


def best_run(runs: Sequence[Run]) -> Run:
    """The run with the lowest final gap (ties: fewer steps to the threshold, then smaller lr)."""

    def key(r: Run) -> tuple[float, float, float]:
        gap0 = r.gaps[0] if len(r.gaps) and math.isfinite(r.gaps[0]) else math.inf
        hit = r.steps_to(THRESHOLD * gap0) if math.isfinite(r.final_gap) else None
        return (r.final_gap, math.inf if hit is None else hit, r.lr)

    return min(runs, key=key)


def run_benchmark(function_names: Sequence[str] | None, optimizers: Sequence[str] | None, steps: int,
                  lrs: Sequence[float] | None = None, *, eps: float = 1e-3, seed: int = 0,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Grid-search every optimizer on every function; return the results (with the runs)."""
    names = list(function_names or FUNCTIONS)
    unknown = [n for n in names if n not in FUNCTIONS]
    if unknown:
        raise UserError(f"unknown test function(s) {unknown}; available: {', '.join(FUNCTIONS)}")
    if steps < 1:
        raise UserError("--steps must be >= 1")
    methods = resolve_optimizers(optimizers)
    grid = tuple(lrs) if lrs else LR_GRID
    results: dict[str, Any] = {}
    for name in names:
        func = FUNCTIONS[name]
        t0 = time.perf_counter()
        per_method: dict[str, Any] = {}
        n_runs = 0
        for method in methods:
            runs = [run_one(func, method, lr, steps, eps=eps, seed=seed, searched=extra)
                    for extra in search_space(method) for lr in grid]
            n_runs += len(runs)
            errors = [r.error for r in runs if r.error]
            if len(errors) == len(runs):
                per_method[method] = {"error": errors[0], "run": None}
                log(f"  {name}: {method}: {errors[0]}")
                continue
            best = best_run([r for r in runs if not r.error])
            per_method[method] = {
                "lr": best.lr,
                "searched": best.searched,
                "final_gap": best.final_gap,
                "steps_to_threshold": best.steps_to(THRESHOLD * func.initial_gap),
                "final_point": best.trajectory[-1].tolist(),
                "diverged": best.diverged,
                "grid": {r.label: (None if r.error else r.final_gap) for r in runs},
                "run": best,
            }
        results[name] = {"function": func, "methods": per_method}
        log(f"  {name}: {len(methods)} methods, {n_runs} runs in {time.perf_counter() - t0:.1f} s")
    return {"functions": results, "optimizers": methods, "lrs": list(grid), "steps": steps, "eps": eps,
            "seed": seed, "method_kwargs": {m: method_kwargs(m, steps) for m in methods if m in METHOD_KW},
            "method_grids": {m: {k: list(v) for k, v in METHOD_GRID[m].items()} for m in methods if m in METHOD_GRID}}


# ---------------------------------------------------------------------- plots
def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


_MARKERS = "ovs^DP*Xh<>p"
_LINESTYLES = ("-", "--", "-.", (0, (1, 1)), (0, (5, 1, 1, 1, 1, 1)))


def draw_panel(ax: Any, func: TestFunction, methods: dict[str, Any], colors: dict[str, Any], *,
               legend_lr: bool = False) -> None:
    """Contours of ``f - f*`` (log-spaced) with every method's kept trajectory."""
    import matplotlib.colors as mcolors

    xs = np.linspace(*func.xlim, 300)
    ys = np.linspace(*func.ylim, 300)
    gx, gy = np.meshgrid(xs, ys)
    gap = np.maximum(func(gx, gy) - func.f_min, 0.0)
    lo = max(float(np.percentile(gap, 0.5)), 1e-3 * float(gap.max()) * 1e-3, 1e-8)
    levels = np.logspace(math.log10(lo), math.log10(float(gap.max())), 22)
    ax.contourf(gx, gy, gap + lo * 1e-3, levels=levels, norm=mcolors.LogNorm(), cmap="Greys_r", alpha=0.35,
                extend="both")
    ax.contour(gx, gy, gap + lo * 1e-3, levels=levels, norm=mcolors.LogNorm(), colors="0.45",
               linewidths=0.4, alpha=0.8)
    for i, (method, res) in enumerate(methods.items()):
        run = res.get("run")
        if run is None:
            continue
        traj = run.trajectory
        label = method
        if legend_lr:
            label = f"{method} ({run.label}, gap {fmt(run.final_gap, '.1e')})"
        ax.plot(traj[:, 0], traj[:, 1], ls=_LINESTYLES[i % len(_LINESTYLES)], color=colors[method], lw=1.3,
                alpha=0.9, label=label, zorder=3)
        ax.plot(traj[-1, 0], traj[-1, 1], _MARKERS[i % len(_MARKERS)], color=colors[method], ms=6,
                mec="black", mew=0.5, zorder=4)
    for k, (mx, my) in enumerate(func.minimisers):
        ax.plot(mx, my, "*", color="gold", ms=15, mec="black", mew=0.8, zorder=5,
                label="minimum" if k == 0 and legend_lr else None)
    ax.plot(*func.start, "o", color="black", ms=7, mec="white", mew=1.0, zorder=5,
            label="start" if legend_lr else None)
    ax.set_xlim(*func.xlim)
    ax.set_ylim(*func.ylim)
    ax.set_title(func.title, fontsize=11)
    ax.set_xlabel("x", fontsize=9)
    ax.set_ylabel("y", fontsize=9)
    ax.tick_params(labelsize=8)


def plot_all(result: dict[str, Any], path: Path) -> Path:
    """One multi-panel figure: every function, with a shared legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    names = list(result["functions"])
    methods = result["optimizers"]
    colors = dict(zip(methods, _colors(len(methods))))
    n = len(names) + 1  # + the legend panel
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.4 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, name in zip(flat, names):
        draw_panel(ax, result["functions"][name]["function"], result["functions"][name]["methods"], colors)
    for ax in flat[len(names):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[m], lw=2, ls=_LINESTYLES[i % len(_LINESTYLES)],
                      marker=_MARKERS[i % len(_MARKERS)], mec="black", mew=0.5, label=m)
               for i, m in enumerate(methods)]
    handles += [Line2D([], [], ls="", marker="o", color="black", mec="white", ms=8, label="start"),
                Line2D([], [], ls="", marker="*", color="gold", mec="black", ms=14, label="known minimum")]
    flat[len(names)].legend(handles=handles, loc="center", fontsize=10, frameon=False,
                            title=f"{result['steps']} steps, eps {result['eps']:g}, seed {result['seed']};\n"
                                  "best lr per method and function", title_fontsize=9)
    fig.suptitle("Zeroth-order optimizers on 2-D test functions (contours: log-spaced f − f*)", fontsize=13)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_function(result: dict[str, Any], name: str, path: Path) -> Path:
    """One function alone, the learning rate and final gap of each method in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["optimizers"]
    colors = dict(zip(methods, _colors(len(methods))))
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    entry = result["functions"][name]
    draw_panel(ax, entry["function"], entry["methods"], colors, legend_lr=True)
    ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- tables
def _steps_cell(steps: int | None) -> str:
    return DASH if steps is None else str(steps)


def _gap_cell(res: dict[str, Any], spec: str) -> str:
    return "diverged" if res.get("diverged") or not math.isfinite(res["final_gap"]) else fmt(res["final_gap"], spec)


def summary_table(result: dict[str, Any]) -> str:
    """Methods x functions: final gap f(theta_T) - f* and steps to 1e-2 of the initial gap."""
    names = list(result["functions"])
    headers = ["method", *names]
    rows = []
    for method in result["optimizers"]:
        row = [method]
        for name in names:
            res = result["functions"][name]["methods"].get(method, {})
            if res.get("error"):
                row.append("error")
            else:
                row.append(f"{_gap_cell(res, '.1e')} / {_steps_cell(res['steps_to_threshold'])}")
        rows.append(row)
    return markdown_table(headers, rows)


def function_tables(result: dict[str, Any]) -> str:
    """One table per function: kept lr, final gap, steps to threshold, final point."""
    parts = []
    for entry in result["functions"].values():
        func: TestFunction = entry["function"]
        parts.append(f"### {func.title}\n\nstart {func.start}, f* = {func.f_min:g} at "
                     f"{', '.join(str(tuple(round(c, 4) for c in m)) for m in func.minimisers)}; "
                     f"initial gap {func.initial_gap:.4g}\n")
        rows = []
        for method, res in entry["methods"].items():
            if res.get("error"):
                rows.append([method, DASH, "error: " + res["error"][:50], DASH, DASH])
                continue
            point = ", ".join(f"{c:.3f}" for c in res["final_point"])
            hp = ", ".join([f"{res['lr']:g}", *(f"{k} {v:g}" for k, v in res.get("searched", {}).items())])
            rows.append([method, hp, _gap_cell(res, ".2e"),
                         _steps_cell(res["steps_to_threshold"]), f"({point})"])
        parts.append(markdown_table(["method", "lr (searched)", "final f − f*", "steps to 1e-2 gap", "final point"],
                                    rows))
        parts.append("")
    return "\n".join(parts)


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of a result (trajectories subsampled to <= 201 points)."""
    out: dict[str, Any] = {k: v for k, v in result.items() if k != "functions"}
    out["threshold"] = THRESHOLD
    out["functions"] = {}
    for name, entry in result["functions"].items():
        func: TestFunction = entry["function"]
        methods = {}
        for method, res in entry["methods"].items():
            r = {k: v for k, v in res.items() if k != "run"}
            run = res.get("run")
            if run is not None:
                idx = np.unique(np.linspace(0, len(run.trajectory) - 1, 201).round().astype(int))
                r["trajectory_steps"] = idx.tolist()
                r["trajectory"] = run.trajectory[idx].tolist()
            methods[method] = r
        out["functions"][name] = {"title": func.title, "start": list(func.start),
                                  "minimisers": [list(m) for m in func.minimisers], "f_min": func.f_min,
                                  "initial_gap": func.initial_gap, "xlim": list(func.xlim),
                                  "ylim": list(func.ylim), "methods": methods}
    return out


def _kw_text(result: dict[str, Any]) -> str:
    items = [f"{m} {', '.join(f'{k}={v}' for k, v in kw.items())}" for m, kw in result["method_kwargs"].items()]
    items += [f"{m} {k} searched in {{{' '.join(f'{x:g}' for x in v)}}}"
              for m, grid in result.get("method_grids", {}).items() for k, v in grid.items()]
    return "; ".join(items) if items else "none"


def write_outputs(result: dict[str, Any], out: str | Path, figure: str | Path | None = None) -> dict[str, Path]:
    """Write the figures, ``table.md`` and ``results.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"figure": plot_all(result, out / "trajectories.png")}
    for name in result["functions"]:
        paths[name] = plot_function(result, name, out / f"{name}.png")
    if figure:
        paths["extra_figure"] = plot_all(result, Path(figure))
    grid = " ".join(f"{x:g}" for x in result["lrs"])
    text = [
        "# zotune bench functions",
        "",
        f"{result['steps']} steps from the same start, seed {result['seed']}, eps {result['eps']:g}; per method "
        f"and function the learning rate with the lowest final gap out of {{{grid}}}. Other "
        f"hyperparameters: class defaults, except {_kw_text(result)}.",
        f"Cells: final f(θ_T) − f* / steps until the gap first falls to {THRESHOLD:g} × the initial gap "
        f"({DASH}: never).",
        "",
        summary_table(result),
        "",
        function_tables(result),
    ]
    paths["table"] = out / "table.md"
    paths["table"].write_text("\n".join(text))
    payload = to_json(result)
    payload["machine"] = machine_info()
    paths["json"] = write_json(out / "results.json", payload)
    return paths


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zotune bench functions``."""
    t0 = time.perf_counter()
    result = run_benchmark(args.functions, args.optimizers, args.steps, args.lrs, eps=args.eps, seed=args.seed)
    paths = write_outputs(result, args.out, args.figure)
    print()
    print(summary_table(result))
    print(f"\ncells: final f - f* / steps to {THRESHOLD:g} x initial gap; lr grid "
          + " ".join(f"{x:g}" for x in result["lrs"]))
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - t0:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m zotune.bench.functions ...`` (same options as ``zotune bench functions``)."""
    return module_main("functions", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
