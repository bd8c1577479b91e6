"""Training-curve plots from ``metrics.jsonl`` files (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from zotune.checkpoint import read_jsonl
from zotune.errors import UserError


def read_metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
    """(train loss by step, dev metrics by step); later lines win (a resumed run rewrites steps)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir} has no metrics.jsonl; is it a zotune run directory?")
    losses: dict[int, float] = {}
    evals: dict[int, dict[str, float]] = {}
    for rec in read_jsonl(path):  # a torn last line (a killed run) is skipped
        if "step" not in rec:
            raise UserError(f"{path}: a record without a step; is it a zotune run directory?")
        if rec.get("kind") == "eval":
            evals[int(rec["step"])] = {k[4:]: v for k, v in rec.items() if k.startswith("dev_")}
        elif "loss" in rec:
            losses[int(rec["step"])] = float(rec["loss"])
    return losses, evals


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(run_dirs: Sequence[Path | str], output: Path | str, labels: Sequence[str] | None = None,
              smooth: int = 10) -> Path:
    """Draw training loss (smoothed) and the dev metric of one or several runs on one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(11, 4))
    metric_name = "accuracy"
    for i, run in enumerate(run_dirs):
        run = Path(run)
        label = labels[i] if labels else _label(run)
        losses, evals = read_metrics(run)
        if losses:
            steps = sorted(losses)
            ys = [losses[s] for s in steps]
            line = ax_loss.plot(steps, _smooth(ys, smooth), label=label)[0]
            ax_loss.plot(steps, ys, color=line.get_color(), alpha=0.2, linewidth=0.8)
        if evals:
            steps = sorted(evals)
            metric_name = "f1" if "f1" in evals[steps[0]] else "accuracy"
            ax_dev.plot(steps, [evals[s].get(metric_name, float("nan")) for s in steps], marker="o", label=label)
    ax_loss.set(xlabel="step", ylabel=f"training loss (moving mean of {smooth})", title="loss")
    ax_dev.set(xlabel="step", ylabel=f"dev {metric_name}", title=f"dev {metric_name}")
    for ax in (ax_loss, ax_dev):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _label(run: Path) -> str:
    cfg = run / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        return f"{run.name}: {c.get('optimizer')} {c.get('peft')} lr {c.get('lr'):g}"
    return run.name
