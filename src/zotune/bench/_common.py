"""Helpers shared by the ``zotune bench`` benchmarks: machine info, load-aware timing,
registry look-ups, tables and JSON output.

The project's CPU machine is shared, so every timed sample also records how many cores
*other* processes used meanwhile (from ``/proc/stat`` minus this process's own CPU time);
benchmarks report it next to their ratios instead of pretending the machine was idle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from zotune.errors import UserError

DASH = "—"


# ---------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch/python versions and the current load average."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    with contextlib.suppress(OSError):  # getloadavg is Unix-only
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info


# ---------------------------------------------------------------------- load-aware timing
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_snapshot() -> tuple[float, float] | None:
    """(CPU-seconds used by the whole machine, CPU-seconds used by this process)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / _HZ
    t = os.times()
    return busy, t.user + t.system


def other_load(before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float) -> float:
    """Cores used by other processes between two snapshots (NaN when unavailable)."""
    if before is None or after is None or wall <= 0:
        return float("nan")
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Run ``fn()``; return (wall seconds, cores used by other processes meanwhile)."""
    s0 = _cpu_snapshot()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return wall, other_load(s0, _cpu_snapshot(), wall)


def measure_other_load(interval: float = 0.5) -> float:
    """Cores used by other processes over ``interval`` seconds (this process sleeps)."""
    s0 = _cpu_snapshot()
    t0 = time.perf_counter()
    time.sleep(interval)
    return other_load(s0, _cpu_snapshot(), time.perf_counter() - t0)


def wait_quiet(threshold: float = 0.3, max_wait: float = 0.0) -> tuple[float, float]:
    """Wait up to ``max_wait`` s until other processes use < ``threshold`` cores.

    Returns (seconds waited, last measured foreign load).
    """
    t0 = time.perf_counter()
    load = measure_other_load()
    while not load < threshold and time.perf_counter() - t0 < max_wait:
        time.sleep(1.5)
        load = measure_other_load()
    return time.perf_counter() - t0, load


def median(values: Iterable[float]) -> float:
    """Median of the finite values (NaN if there are none)."""
    xs = sorted(v for v in values if v is not None and math.isfinite(v))
    if not xs:
        return float("nan")
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ---------------------------------------------------------------------- optimizers
def resolve_optimizers(requested: Sequence[str] | None) -> list[str]:
    """Registered class names for ``requested`` names/aliases (all registered if empty)."""
    import zotune.optim as zo

    if not requested:
        return zo.available()
    names: list[str] = []
    for name in requested:
        cls_name = zo.get(name).__name__
        if cls_name not in names:
            names.append(cls_name)
    return names


def find_optimizer(name: str) -> str | None:
    """The registered class name for ``name``, or ``None`` if it is not registered."""
    import zotune.optim as zo

    try:
        return zo.get(name).__name__
    except (UserError, KeyError):
        return None


# ---------------------------------------------------------------------- output
def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """Format a number, or an em dash for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return f"{value:{spec}}{suffix}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (numbers right-aligned)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def numeric(i: int) -> bool:
        def is_num(s: str) -> bool:
            s = s.rstrip("x%s").replace(",", "")
            try:
                float(s)
                return True
            except ValueError:
                return s == DASH

        return bool(rows) and all(is_num(r[i]) for r in rows)

    align = [numeric(i) for i in range(len(headers))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if a else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    body = [
        "| " + " | ".join(c.rjust(w) if a else c.ljust(w) for c, w, a in zip(r, widths, align)) + " |"
        for r in rows
    ]
    return "\n".join([line, sep, *body])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN/inf become null); creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return path


def module_main(name: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace], int], argv: Sequence[str] | None = None) -> int:
    """``python -m zotune.bench.<name>``: parse, run, and turn a UserError into one line + exit 2."""
    parser = argparse.ArgumentParser(prog=f"python -m zotune.bench.{name}", description=description)
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return run(args)
    except UserError as e:
        print(f"zotune bench {name}: error: {e}", file=sys.stderr)
        return 2
