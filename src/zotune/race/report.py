"""The race report from finished ``zotune train`` directories: markdown, JSON, CSV and a PNG.

Everything is read from the run directories (``results.json``, ``metrics.jsonl``), so the
report can be built wherever the cells ran (``zotune race --collect DIR [DIR ...]``: the runs
of several races, e.g. a probe and the race that used its lrs, in one report).

* **lr choice.** For each task x tuning mode x optimizer, the lr with the best mean *dev*
  metric over seeds wins; its *test* metric is reported (mean +- sample std over seeds). A
  winner at either end of a grid of two or more lrs is flagged ("edge"): the grid may be too
  narrow. ``zotune train`` keeps the best dev evaluation, so "at the budget" means the best
  dev evaluation within the budget, as in MeZO's protocol.
* **Time to target.** The target is the chosen-lr mean dev metric of the target optimizer
  (default ZO-SGD) on that task and mode, or a fixed number. For each seed of an optimizer's
  chosen lr, the first dev evaluation at or above it gives seconds (inside optimizer steps,
  evaluation excluded) and forwards; the report gives their mean over the seeds that reached
  it, with "n/m", or "not reached".
* **Memory.** Peak memory of every cell (process peak RSS on CPU, CUDA peak allocation on a
  GPU), and its ratio to the zero-shot cell of the same task (inference only) when the race
  has that baseline.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zotune.errors import UserError

#: summary keys that depend on the machine's speed and load, not on the trajectory
VOLATILE = ("seconds", "memory")


def _primary(metrics: dict[str, float] | None) -> float | None:
    if not metrics:
        return None
    return float(metrics["f1"] if "f1" in metrics else metrics["accuracy"])


def optimizer_label(name: str, args: dict[str, Any] | None) -> str:
    """The method's row name: its class, plus its options when it ran with some (a variant:
    ``ZOSGD(layer_fraction=0.5)`` is a row of its own beside ``ZOSGD``)."""
    if not args:
        return name
    return f"{name}({', '.join(f'{k}={v}' for k, v in sorted(args.items()))})"


def read_cell(directory: Path) -> dict[str, Any]:
    """One finished run: what it was (task, kind, optimizer, lr, seed) and what it measured."""
    results = json.loads((directory / "results.json").read_text())
    config = results.get("config", {})
    demos = (config.get("task_args") or {}).get("demonstrations", 0)
    kind = "train" if config.get("steps", 0) else ("icl" if demos else "zeroshot")
    evals = []
    metrics = directory / "metrics.jsonl"
    if metrics.exists():
        by_step: dict[int, dict[str, Any]] = {}
        for line in metrics.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("kind") == "eval" and "forwards" in rec:
                by_step[int(rec["step"])] = rec  # a resumed run re-logs steps: the later line wins
        for step in sorted(by_step):
            rec = by_step[step]
            dev = _primary({k[4:]: v for k, v in rec.items() if k.startswith("dev_")})
            evals.append({"step": step, "seconds": float(rec["seconds"]), "forwards": int(rec["forwards"]),
                          "dev": dev})
    dev_after = _primary(results["after"].get("dev"))
    if kind == "train" and not evals:  # no dev evaluation during the run (eval_every 0): the final one
        evals.append({"step": results["steps"], "seconds": float(results.get("train_seconds") or 0.0),
                      "forwards": int(results["forwards"]), "dev": dev_after})
    return {
        "name": directory.name, "task": results["task"], "kind": kind,
        "optimizer": optimizer_label(results["optimizer"], config.get("optimizer_args")) if kind == "train" else kind,
        "peft": results["peft"] if kind == "train" else "-", "lr": config.get("lr") if kind == "train" else None,
        "seed": config.get("seed"), "demonstrations": demos,
        "dev": dev_after, "test": _primary(results["after"].get("test")),
        "steps": results["steps"], "forwards": results["forwards"],
        "train_seconds": results.get("train_seconds"), "peak_memory_mb": results.get("peak_memory_mb"),
        "evals": evals,
    }


def _roots(roots: Path | Sequence[Path]) -> list[Path]:
    return [roots] if isinstance(roots, Path) else list(roots)


def _where(roots: list[Path]) -> str:
    return " ".join(str(r) for r in roots)


def _files(roots: list[Path], name: str) -> list[Path]:
    """The files called ``name`` under the roots, each once (a root inside another is read once)."""
    seen: dict[Path, Path] = {}
    for root in roots:
        for path in sorted(root.rglob(name)):
            seen.setdefault(path.resolve(), path)
    return list(seen.values())


def find_cells(roots: Path | Sequence[Path]) -> list[dict[str, Any]]:
    """Every finished run directory under ``roots`` (any depth), in a stable order.

    A run found twice (a probe's cell copied into the race that reuses it, a zero-shot cell of each
    of several races: same task, method, mode, lr and seed, same results) counts once; the same
    cell with other results (another budget, other data settings) is refused, as it would be
    averaged in as one more seed.
    """
    roots = _roots(roots)
    for root in roots:
        if not root.is_dir():
            raise UserError(f"--collect {root}: no such directory")
    cells: list[dict[str, Any]] = []
    seen: dict[tuple, tuple[Path, tuple]] = {}
    for path in _files(roots, "results.json"):
        cell = read_cell(path.parent)
        key = tuple(cell[k] for k in ("task", "kind", "optimizer", "peft", "lr", "seed", "demonstrations"))
        outcome = tuple(cell[k] for k in ("dev", "test", "steps", "forwards"))
        if key in seen:
            first, first_outcome = seen[key]
            if outcome != first_outcome:
                raise UserError(f"--collect {_where(roots)}: {path.parent} and {first} are the same cell "
                                f"({cell['task']}, {cell['optimizer']}, lr {cell['lr']}, seed {cell['seed']}) "
                                "with other results (another budget or data?); collect them separately")
            continue
        seen[key] = (path.parent, outcome)
        cells.append(cell)
    if not cells:
        raise UserError(f"--collect {_where(roots)}: no finished runs (results.json) under it")
    return cells


def _mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None, 0
    # sample std; undefined (None, shown without "±") for a single seed
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else None, len(xs)


def choose_lr(runs: list[dict[str, Any]]) -> tuple[float, bool, dict[float, float]]:
    """(lr with the best mean dev metric over seeds, whether it is a grid edge, mean dev by lr).

    Ties go to the smaller lr. Test metrics are never read here.
    """
    by_lr: dict[float, list[float]] = defaultdict(list)
    for r in runs:
        by_lr[float(r["lr"])].append(r["dev"] if r["dev"] is not None else -math.inf)
    means = {lr: float(np.mean(v)) for lr, v in sorted(by_lr.items())}
    best = max(means, key=lambda lr: (means[lr], -lr))
    lrs = sorted(means)
    return best, len(lrs) > 1 and best in (lrs[0], lrs[-1]), means


def time_to_target(evals: list[dict[str, Any]], target: float) -> tuple[float, int] | None:
    """(seconds, forwards) at the first dev evaluation >= ``target`` after training began, or ``None``
    if never. The evaluation before the first step does not count: the final dev a row reports comes
    from the best evaluation during training, so the target must be reached the same way."""
    for e in evals:
        if e["forwards"] > 0 and e["dev"] is not None and e["dev"] >= target - 1e-12:
            return e["seconds"], e["forwards"]
    return None


def summarize(cells: list[dict[str, Any]], target: str | float = "zosgd",
              lr_probe: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The race table: one row per task x method (chosen lr for optimizers), plus targets.

    ``lr_probe`` (race.json's ``spec.lr_probe``, from ``--lr-from``): per ``"method|mode"`` the
    probe's dev by lr; a row raced at the probe's lr alone takes its grid-edge flag from the probe.
    """
    from zotune.train import resolve_optimizer

    target_cls = None if isinstance(target, (int, float)) else resolve_optimizer(str(target)).__name__
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        groups[(c["task"], c["peft"], c["optimizer"])].append(c)
    rows, chosen_runs = [], {}
    for key, runs in sorted(groups.items()):
        probe = (lr_probe or {}).get(f"{key[2]}|{key[1]}")
        if runs[0]["kind"] == "train":
            lr, edge, dev_by_lr = choose_lr(runs)
            runs = [r for r in runs if float(r["lr"]) == lr]
            if probe is not None and len(dev_by_lr) == 1:  # one lr here: the probe's grid says if it is an edge
                edge = probe["lr_edge"]
            else:
                probe = None
        else:
            lr, edge, dev_by_lr, probe = None, False, {}, None
        chosen_runs[key] = runs
        dev, dev_std, n = _mean_std(r["dev"] for r in runs)
        test, test_std, _ = _mean_std(r["test"] for r in runs)
        rows.append({"task": key[0], "peft": key[1], "method": key[2], "kind": runs[0]["kind"], "lr": lr,
                     "lr_edge": edge, "dev_by_lr": {f"{k:g}": v for k, v in dev_by_lr.items()}, "lr_probe": probe,
                     "seeds": n, "dev_mean": dev, "dev_std": dev_std, "test_mean": test, "test_std": test_std,
                     "forwards_mean": _mean_std(r["forwards"] for r in runs)[0],
                     "train_seconds_mean": _mean_std(r["train_seconds"] for r in runs)[0],
                     "peak_memory_mb_mean": _mean_std(r["peak_memory_mb"] for r in runs)[0]})
    targets: dict[str, float] = {}
    # the target optimizer's whole run (mean seconds inside optimizer steps) per task/mode: time to
    # target is also given as a fraction of it ("in a third of ZO-SGD's wall-clock")
    base_seconds: dict[str, float] = {}
    for row in rows:
        inference = next((r["peak_memory_mb_mean"] for r in rows
                          if r["task"] == row["task"] and r["kind"] == "zeroshot"), None)
        mem = row["peak_memory_mb_mean"]
        row["memory_vs_inference"] = mem / inference if mem and inference else None
        if row["kind"] != "train":
            continue
        tkey = f"{row['task']}/{row['peft']}"
        if target_cls is None:
            targets[tkey] = float(target)  # type: ignore[arg-type]
        elif tkey not in targets:
            base = next((r for r in rows if r["kind"] == "train" and r["method"] == target_cls
                         and (r["task"], r["peft"]) == (row["task"], row["peft"])), None)
            if base is not None and base["dev_mean"] is not None:
                targets[tkey] = base["dev_mean"]
                if base["train_seconds_mean"]:
                    base_seconds[tkey] = base["train_seconds_mean"]
        goal = targets.get(tkey)
        zeroshot = next((r["dev_mean"] for r in rows if r["task"] == row["task"] and r["kind"] == "zeroshot"), None)
        # a target the untrained model already meets says nothing about speed
        row["target_at_zeroshot"] = goal is not None and zeroshot is not None and zeroshot >= goal - 1e-12
        hits = [time_to_target(r["evals"], goal) if goal is not None else None
                for r in chosen_runs[(row["task"], row["peft"], row["method"])]]
        reached = [h for h in hits if h is not None]
        seconds = _mean_std(h[0] for h in reached)[0]
        row.update(target=goal, target_reached=len(reached), target_runs=len(hits), target_seconds_mean=seconds,
                   target_forwards_mean=_mean_std(float(h[1]) for h in reached)[0],
                   target_seconds_vs_target_run=seconds / base_seconds[tkey]
                   if seconds is not None and tkey in base_seconds else None)
    return {"target": target, "targets": targets, "rows": rows,
            "curves": {f"{k[0]}|{k[1]}|{k[2]}": [r["evals"] for r in v] for k, v in chosen_runs.items()
                       if v[0]["kind"] == "train"}}


def _fmt(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(summary: dict[str, Any], cells: list[dict[str, Any]], expected: list[str] | None = None) -> str:
    """The report as a markdown document (one table per task, then every cell's memory).

    ``expected``: the cell names of the race's grid (race.json), to say how many finished.
    """
    lines = ["# zotune race", ""]
    if expected is not None:
        done = len({c["name"] for c in cells} & set(expected))
        if done != len(expected):
            lines += [f"**{done} of the grid's {len(expected)} cells finished**; the rows use every finished run "
                      "in the directory.", ""]
    target = summary["target"]
    goal = f"{target:g}" if isinstance(target, (int, float)) else f"{target}'s mean dev at its chosen lr"
    lines += ["Test metric of the lr chosen by dev (mean ± std over seeds). Time to target: until dev reaches "
              f"{goal} (seconds inside optimizer steps; mean over the seeds that reached it; in brackets, "
              f"as a fraction of {target}'s whole run). "
              "Memory: peak per process, and its ratio to zero-shot inference on the same task.", ""]
    for task in sorted({r["task"] for r in summary["rows"]}):
        rows = [r for r in summary["rows"] if r["task"] == task]
        lines += [f"## {task}", "", "| method | mode | lr (dev by lr) | seeds | dev | test | target reached | "
                  "seconds to target | forwards to target | peak MB (x inference) |", "|" + "---|" * 10]
        for r in sorted(rows, key=lambda r: (r["kind"] == "train", r["peft"], r["method"])):
            lr = "—"
            if r["lr"] is not None:
                grid = ", ".join(f"{k}: {v:.3f}" for k, v in r["dev_by_lr"].items())
                if r.get("lr_probe"):
                    p = r["lr_probe"]
                    seeds = f", {p['seeds']} seed{'s' if p['seeds'] != 1 else ''}" if p.get("seeds") else ""
                    grid += (f"; probe on {p['task']}{seeds}: "
                             + ", ".join(f"{k}: {v:.3f}" for k, v in p["dev_by_lr"].items()))
                lr = f"{r['lr']:g}{' **(grid edge)**' if r['lr_edge'] else ''} ({grid})"
            reached, to_s, to_f = "—", "—", "—"
            if r["kind"] == "train" and r.get("target") is not None:
                reached = f"{r['target_reached']}/{r['target_runs']}" if r["target_reached"] else "not reached"
                to_s = _fmt(r["target_seconds_mean"], digits=1)
                if r.get("target_seconds_vs_target_run") is not None:
                    to_s += f" ({r['target_seconds_vs_target_run']:.2f}x)"
                to_f = _fmt(r["target_forwards_mean"], digits=0)
            mem = _fmt(r["peak_memory_mb_mean"], digits=0)
            if r["memory_vs_inference"] is not None:
                mem += f" ({r['memory_vs_inference']:.2f}x)"
            lines.append(f"| {r['method']} | {r['peft']} | {lr} | {r['seeds']} | {_fmt(r['dev_mean'], r['dev_std'])} "
                         f"| {_fmt(r['test_mean'], r['test_std'])} | {reached} | {to_s} | {to_f} | {mem} |")
        vacuous = sorted({r["peft"] for r in rows if r.get("target_at_zeroshot")})
        if vacuous:
            lines += ["", f"The target is not above zero-shot dev here ({', '.join(vacuous)}): the target columns "
                         "say nothing about speed on this task."]
        lines.append("")
    sources = sorted({r["lr_probe"]["source"] for r in summary["rows"] if (r.get("lr_probe") or {}).get("source")})
    if sources:
        lines += [f"The lrs of the rows marked \"probe on\" were chosen by `--lr-from` on: "
                  f"{', '.join(f'`{s}`' for s in sources)}.", ""]
    if summary.get("cpu_seconds_total") is not None:
        lines += [f"CPU time of the cell processes: {summary['cpu_seconds_total'] / 60:.1f} min (user + sys, "
                  "start-up included, summed over the cells; timing.jsonl).", ""]
    lines += ["## Every cell", "", "| cell | dev | test | steps | forwards | seconds | CPU s | peak MB |",
              "|" + "---|" * 8]
    for c in cells:
        lines.append(f"| {c['name']} | {_fmt(c['dev'])} | {_fmt(c['test'])} | {c['steps']} | {c['forwards']} | "
                     f"{_fmt(c['train_seconds'], digits=1)} | {_fmt(c.get('cpu_seconds'), digits=0)} | "
                     f"{_fmt(c['peak_memory_mb'], digits=0)} |")
    return "\n".join(lines) + "\n"


def cell_cpu_seconds(roots: Path | Sequence[Path]) -> dict[str, float]:
    """CPU seconds (user + sys) per cell from the timing.jsonl files under ``roots`` (summed over a
    resumed cell's runs)."""
    out: dict[str, float] = {}
    for path in _files(_roots(roots), "timing.jsonl"):  # --collect over several races: each has its own
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                out[rec["cell"]] = out.get(rec["cell"], 0.0) + float(rec["cpu_s"])
            except (ValueError, KeyError, TypeError):  # a line cut by a kill: skip it
                continue
    return out


CSV_FIELDS = ("name", "task", "kind", "optimizer", "peft", "lr", "seed", "demonstrations", "dev", "test", "steps",
              "forwards", "train_seconds", "peak_memory_mb", "cpu_seconds")


def write_report(roots: Path | Sequence[Path], output: Path | None = None,
                 target: str | float | None = None) -> dict[str, Any]:
    """Collect the runs under ``roots``; write report.md, summary.json, cells.csv, race.png into ``output``.

    ``output`` defaults to the directory when there is one; several directories need it.
    """
    roots = _roots(roots)
    if output is None and len(roots) > 1:
        raise UserError("--collect of several directories: say where the report goes with --report-dir")
    output = output or roots[0]
    cells = find_cells(roots)
    races: dict[Path, dict[str, Any]] = {}  # every race.json under the roots (--collect of several races)
    for path in _files(roots, "race.json"):
        try:
            races[path] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    info = races.get(roots[0] / "race.json", {}) if len(roots) == 1 else {}
    if target is None:
        target = info.get("spec", {}).get("target", "zosgd")
    cpu = cell_cpu_seconds(roots)
    for c in cells:
        c["cpu_seconds"] = cpu.get(c["name"])
    lr_probe: dict[str, Any] = {}
    for race in races.values():
        lr_probe.update(race.get("spec", {}).get("lr_probe") or {})
    summary = summarize(cells, target, lr_probe)
    if cpu:
        summary["cpu_seconds_total"] = sum(cpu.values())
    try:
        output.mkdir(parents=True, exist_ok=True)
        (output / "summary.json").write_text(json.dumps({**summary, "cells": cells}, indent=2))
        with open(output / "cells.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(cells)
        (output / "report.md").write_text(markdown(summary, cells, info.get("cells")))
    except OSError as e:
        raise UserError(f"cannot write the report into {output} ({e.strerror}); pass another --report-dir") from None
    from zotune.race.plots import plot_race

    plot_race(summary, output / "race.png")
    return summary
