"""The race figure: dev metric vs wall-clock and vs forwards, one panel per task, std bands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def mean_curve(runs: list[list[dict[str, Any]]], x_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, mean dev and dev std at each evaluation index over seeds (cut to the shortest run)."""
    runs = [r for r in runs if r]
    if not all(r[0]["forwards"] == 0 for r in runs):  # some seeds skipped the evaluation before training
        runs = [[e for e in r if e["forwards"] > 0] for r in runs]  # (a resumed race): align the others
        runs = [r for r in runs if r]
    if not runs:
        return np.array([]), np.array([]), np.array([])
    n = min(len(r) for r in runs)
    xs = np.array([[e[x_key] for e in r[:n]] for r in runs], dtype=float)
    ys = np.array([[np.nan if e["dev"] is None else e["dev"] for e in r[:n]] for r in runs], dtype=float)
    return xs.mean(axis=0), np.nanmean(ys, axis=0), np.nanstd(ys, axis=0)


def plot_race(summary: dict[str, Any], output: Path) -> Path:
    """Two rows (vs seconds, vs forwards) x one column per task; zero-shot/ICL dev as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in summary["rows"]})
    # one colour per optimizer x mode over every panel (a per-axes colour cycle gave two methods one colour)
    names = sorted({f"{k.split('|')[2]} ({k.split('|')[1]})" for k in summary["curves"]})
    outside = len(names) > 6  # a legend of many methods goes beside the last panel, not over the curves
    fig, axes = plt.subplots(2, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)) + 3.2 * outside, 7),
                             squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors: dict[str, Any] = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    for col, task in enumerate(tasks):
        for row, (x_key, label) in enumerate((("seconds", "seconds in optimizer steps"), ("forwards", "forwards"))):
            ax = axes[row][col]
            for key, runs in sorted(summary["curves"].items()):
                t, peft, method = key.split("|")
                if t != task:
                    continue
                x, mean, std = mean_curve(runs, x_key)
                if not len(x):
                    continue
                name = f"{method} ({peft})"
                line = ax.plot(x, mean, marker="o", markersize=3, label=name, color=colors[name])[0]
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            for r in summary["rows"]:
                if r["task"] == task and r["kind"] != "train" and r["dev_mean"] is not None:
                    ax.axhline(r["dev_mean"], linestyle="--", linewidth=1, color="gray" if r["kind"] == "zeroshot"
                               else "black", label=f"{r['method']} dev")
            ax.set(xlabel=label, ylabel="dev metric", title=task)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0] and (not outside or col == len(tasks) - 1):
                ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if outside else {}))
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
