"""Run a race's cells as ``zotune train`` subprocesses; skip finished cells, resume killed ones.

Layout of a race directory::

    race.json            the grid and its cell names (written before any cell runs)
    cells/NAME/          one ordinary ``zotune train`` output directory per cell
    logs/NAME.log        the cell's stdout and stderr
    timing.jsonl         wall-clock and CPU seconds (user + sys) of every cell process run
    activations/         frozen-bottom activations shared by the cells (zotune train --cache-dir)
    report.md, summary.json, cells.csv, race.png   (zotune.race.report)

A cell is finished when its ``results.json`` exists. An unfinished cell with a checkpoint is
continued with ``--resume`` (the trajectory is a pure function of the seed and the step, so
the result is the one an uninterrupted run gives); one without is restarted. Each cell runs
in its own process with ``--threads`` cores, so ``--jobs N`` cells share the machine; on
Linux a cell dies with the race (``PR_SET_PDEATHSIG``), so a killed race leaves no orphans
writing into its directory.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from zotune.errors import UserError
from zotune.race.grid import Cell, RaceSpec

#: the race's shared activation store, under the race directory
ACTIVATIONS = "activations"
#: wall-clock and CPU seconds of every cell process the race ran
TIMING = "timing.jsonl"


def cell_dir(race_dir: Path, cell: Cell) -> Path:
    return race_dir / "cells" / cell.name


def is_finished(directory: Path) -> bool:
    return (directory / "results.json").exists()


def check_race_dir(race_dir: Path) -> None:
    """Refuse a race directory that cannot be written (before anything runs)."""
    if race_dir.exists() and not race_dir.is_dir():
        raise UserError(f"race directory {race_dir} is a file; choose a directory (--output-dir)")
    try:
        race_dir.mkdir(parents=True, exist_ok=True)
        probe = race_dir / ".zotune-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to race directory {race_dir} ({e.strerror}); choose another "
                        "--output-dir") from None


def check_cells_match(race_dir: Path, cells: list[Cell]) -> None:
    """Refuse to mix runs: an existing cell directory must have been started with the cell's settings."""
    from zotune.train import TRAJECTORY_FIELDS, resolve_optimizer

    for cell in cells:
        path = cell_dir(race_dir, cell) / "config.json"
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        wanted = dict(cell.options)
        if "optimizer" in wanted:
            wanted["optimizer"] = resolve_optimizer(wanted["optimizer"]).__name__
        changed = [k for k in TRAJECTORY_FIELDS if k in wanted and k in saved
                   and json.loads(json.dumps(saved[k])) != json.loads(json.dumps(wanted[k]))]
        if changed:
            raise UserError(f"{path.parent} was run with other settings ({', '.join(changed)}) than this race's "
                            "cell of the same name; use another race directory")


def cell_command(cell: Cell, race_dir: Path, threads: int | None, python: str | None = None) -> list[str]:
    """The command that runs ``cell``: ``zotune train ...`` (or ``python -m zotune train ...``).

    Every cell shares the race's activation store (``RACE/activations``, unless the grid sets
    ``cache_dir``): the cells of one task and seed see the same examples, so the frozen bottom
    of each runs once per race instead of once per cell (exact: see
    :mod:`zotune.models.activation_store`). Cells draw no curves.png; the race draws race.png.
    """
    head = [python, "-m", "zotune"] if python else ["zotune"]
    extra = ["--threads", str(threads)] if threads else []
    if "cache_dir" not in cell.options:
        extra += ["--cache-dir", str(race_dir / ACTIVATIONS)]
    if "plot" not in cell.options:
        extra.append("--no-plot")
    return [*head, "train", *cell.argv(cell_dir(race_dir, cell)), *extra]


def print_commands(spec: RaceSpec, race_dir: Path, threads: int | None = None,
                   write: Callable[[str], None] = print) -> None:
    """One shell command per cell (for a SLURM array or any job runner); nothing is written."""
    for cell in spec.cells():
        write(shlex.join(cell_command(cell, race_dir, threads)))


def write_race_json(spec: RaceSpec, race_dir: Path, cells: list[Cell]) -> None:
    info = {"spec": spec.to_dict(), "cells": [c.name for c in cells]}
    tmp = race_dir / "race.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, race_dir / "race.json")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: a killed race may leave its running cells behind
        pass


def _resume_flag(cell: Cell, race_dir: Path, cmd: list[str]) -> list[str]:
    """Continue a killed cell from its checkpoint, or restart one killed before its first."""
    out = cell_dir(race_dir, cell)
    if (out / "checkpoint").exists():
        return [*cmd, "--resume"]
    if out.exists():
        return [*cmd, "--overwrite"]
    return cmd


def _start(cell: Cell, race_dir: Path, threads: int) -> subprocess.Popen:
    cmd = _resume_flag(cell, race_dir, cell_command(cell, race_dir, threads, python=sys.executable))
    log_dir = race_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_dir / f"{cell.name}.log", "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)


def _run_in_process(cell: Cell, race_dir: Path, threads: int) -> int:
    """Run one cell in this process (no start-up cost per cell); its output goes to its log."""
    import contextlib
    import traceback

    from zotune.cli import main

    cmd = _resume_flag(cell, race_dir, cell_command(cell, race_dir, threads))
    log_dir = race_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    with open(log_dir / f"{cell.name}.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        print(f"$ {shlex.join(cmd)}  (in process)", flush=True)
        try:
            return main(cmd[1:])
        except Exception:
            traceback.print_exc()
            return 1


def run_cells(spec: RaceSpec, race_dir: Path, jobs: int = 1, threads: int | None = None,
              say: Callable[[str], None] = print, in_process: bool = False) -> list[str]:
    """Run every unfinished cell, ``jobs`` at a time; returns the names of cells that failed.

    ``in_process``: run the cells one after another in this process instead of one process
    each (saves the interpreter and library start-up per cell, e.g. for tiny models; the peak
    memory of a cell is then the race process's peak so far, not the cell's own).
    """
    if jobs < 1:
        raise UserError("--jobs must be >= 1")
    if in_process and jobs != 1:
        raise UserError("--in-process runs one cell at a time; drop --jobs or --in-process")
    check_race_dir(race_dir)
    if spec.train.get("cache_dir"):  # a store of the user's choice instead of RACE/activations
        from zotune.models.activation_store import check_store_dir

        check_store_dir(spec.train["cache_dir"])
    cells = spec.cells()
    check_cells_match(race_dir, cells)
    write_race_json(spec, race_dir, cells)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    pending = [c for c in cells if not is_finished(cell_dir(race_dir, c))]
    say(f"zotune race: {len(cells)} cells, {len(cells) - len(pending)} finished, {len(pending)} to run "
        f"({jobs} at a time, {threads} threads each) in {race_dir}")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: list[str] = []
    done = len(cells) - len(pending)
    queue = list(pending)
    try:
        while queue or running:
            while in_process and queue:
                cell, started = queue.pop(0), time.time()
                cpu0 = time.process_time()
                rc = _run_in_process(cell, race_dir, threads)
                done += 1
                failed += [cell.name] if rc else []
                wall, cpu = time.time() - started, time.process_time() - cpu0
                record_timing(race_dir, cell.name, wall, cpu)
                status = "done" if rc == 0 else f"FAILED (exit {rc}; see logs/{cell.name}.log)"
                say(f"zotune race: [{done}/{len(cells)}] {cell.name}: {status} in {wall:.0f} s ({cpu:.0f} s CPU)")
            while queue and len(running) < jobs:
                cell = queue.pop(0)
                if is_finished(cell_dir(race_dir, cell)):  # finished meanwhile (another race on this directory)
                    done += 1
                    continue
                running[cell.name] = (_start(cell, race_dir, threads), time.time())
            time.sleep(0.1)
            for name, (proc, started) in list(running.items()):
                cpu = _reap(proc)
                if cpu is None:
                    continue
                del running[name]
                done += 1
                wall = time.time() - started
                record_timing(race_dir, name, wall, cpu)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; see logs/{name}.log)"
                if proc.returncode != 0:
                    failed.append(name)
                say(f"zotune race: [{done}/{len(cells)}] {name}: {status} in {wall:.0f} s ({cpu:.0f} s CPU)")
    finally:
        for proc, _ in running.values():  # interrupted: stop the cells we started
            proc.kill()
    return failed


def _reap(proc: subprocess.Popen) -> float | None:
    """None while ``proc`` runs; once it ended, its CPU seconds (user + sys, all threads, start-up
    included) from ``wait4`` where the OS has it (else 0), with ``proc.returncode`` set."""
    if not hasattr(os, "wait4"):
        return None if proc.poll() is None else 0.0
    try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    except ChildProcessError:  # already reaped
        return None if proc.poll() is None else 0.0
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def record_timing(race_dir: Path, name: str, wall: float, cpu: float) -> None:
    """Append one cell's wall-clock and CPU seconds to RACE/timing.jsonl (a resumed cell: one line per run)."""
    with open(race_dir / TIMING, "a") as f:
        f.write(json.dumps({"cell": name, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
