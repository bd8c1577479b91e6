"""``zotune eval``: evaluate a model, or a zotune checkpoint, on a task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zotune.errors import UserError

DESCRIPTION = """\
Evaluate a model (zero-shot) or a trained run on a task's dev and test splits.

examples:
  zotune eval --model smollm2-135m --task sst2 --template sentiment
  zotune eval --checkpoint runs/sst2-hizoo            # uses the run's config and best/ weights
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``zotune eval``."""
    parser.add_argument("--model", help="model name or path (default: smollm2-135m, or the run's model)")
    parser.add_argument("--checkpoint", help="a zotune run directory (or its best/ or checkpoint/ folder)")
    parser.add_argument("--task", help="task name (default: the run's task)")
    parser.add_argument("--template", help="named template of the task")
    parser.add_argument("--split", choices=["dev", "test", "both"], default="both")
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--data-seed", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--json", help="write the metrics to this JSON file")


def _run_dir(checkpoint: Path) -> tuple[Path, Path]:
    """(run directory with config.json, folder with trainable.safetensors)."""
    if not checkpoint.exists():
        raise UserError(f"--checkpoint {checkpoint} does not exist; pass a zotune run directory")
    if (checkpoint / "config.json").exists():
        weights = checkpoint / "best" if (checkpoint / "best").exists() else checkpoint / "checkpoint"
        return checkpoint, weights
    if (checkpoint.parent / "config.json").exists():
        return checkpoint.parent, checkpoint
    raise UserError(f"{checkpoint} is not a zotune run directory (no config.json)")


def _check_output_file(path: Path) -> None:
    """--json must name a file in an existing directory (checked before the evaluation runs)."""
    if path.is_dir():
        raise UserError(f"--json {path} is a directory; give a file name, e.g. {path / 'metrics.json'}")
    if not path.parent.is_dir():
        raise UserError(f"--json {path}: the directory {path.parent} does not exist; create it or choose another "
                        "file")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics (and write them to --json)."""
    from zotune.config import saved_run_config
    from zotune.tasks import evaluate
    from zotune.train import TrainConfig, build_model, build_task, load_trainable

    if args.json:
        _check_output_file(Path(args.json))
    values: dict = {}
    weights = None
    if args.checkpoint:
        run_dir, weights = _run_dir(Path(args.checkpoint))
        values.update(saved_run_config(str(run_dir)))
    for key in ("model", "task", "template", "k", "data_seed", "max_test", "dtype"):
        given = getattr(args, key)
        if given is not None:
            values[key] = given
    config = TrainConfig.from_dict(values)
    task = build_task(config)
    model, tokenizer = build_model(config)
    if weights is not None:
        load_trainable(model, weights)
    results = {}
    for split in (["dev", "test"] if args.split == "both" else [args.split]):
        examples = getattr(task, split)
        if not examples:
            continue
        results[split] = evaluate(model, tokenizer, task, examples, batch_size=args.batch_size,
                                  max_length=config.max_length)
        print(f"{task.name} {split}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in results[split].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
