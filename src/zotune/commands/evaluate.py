"""``zotune eval``: evaluate a model, or a zotune checkpoint, on a task."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zotune.errors import UserError

DESCRIPTION = """\
Evaluate a model (zero-shot) or a trained run on a task's dev and test splits.

examples:
  zotune eval --model smollm2-135m --task sst2 --template sentiment
  zotune eval --checkpoint runs/sst2-hizoo            # uses the run's config and best/ weights
  zotune eval --checkpoint runs/sst2-hizoo runs/sst2-hizoo/checkpoint   # its best/ and last weights, one model

The frozen-bottom activation cache follows the rules of `zotune train`: where every trainable
weight of the run's tuning mode lies at or above block j (final_norm, top:K, LoRA top:K), the
blocks below j run once per example, and the checkpoints evaluated after the first reuse them.
"""

#: the settings that decide the model a checkpoint's weights load into (equal for every --checkpoint)
MODEL_KEYS = ("model", "dtype", "peft", "lora_r", "lora_alpha", "lora_targets", "lora_layers", "prefix_tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``zotune eval``."""
    parser.add_argument("--model", help="model name or path (default: smollm2-135m, or the run's model)")
    parser.add_argument("--checkpoint", nargs="+", metavar="RUN",
                        help="zotune run directories (or their best/ or checkpoint/ folders) trained from the same "
                             "model and tuning mode: the model is built once and each run's weights loaded in turn")
    parser.add_argument("--task", help="task name (default: the run's task)")
    parser.add_argument("--template", help="named template of the task")
    parser.add_argument("--split", choices=["dev", "test", "both"], default="both")
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--data-seed", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--cache-mb", type=float, default=1024.0,
                        help="memory bound (MB) of the frozen-bottom activation cache; 0 switches it off")
    parser.add_argument("--json", help="write the metrics to this JSON file (with several --checkpoint: one entry "
                                       "per run)")


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


def _say(message: str) -> None:
    print(message, file=sys.stderr)  # as `zotune train`: messages on stderr, metrics on stdout


def _configs(args: argparse.Namespace) -> list[tuple[str | None, dict, Path | None]]:
    """(label, config values, weights folder) per checkpoint, or one entry for a plain --model."""
    from zotune.config import saved_run_config

    entries: list[tuple[str | None, dict, Path | None]] = []
    for checkpoint in args.checkpoint or [None]:
        values: dict = {}
        weights = None
        if checkpoint is not None:
            run_dir, weights = _run_dir(Path(checkpoint))
            values.update(saved_run_config(str(run_dir)))
        for key in ("model", "task", "template", "k", "data_seed", "max_test", "dtype"):
            given = getattr(args, key)
            if given is not None:
                values[key] = given
        entries.append((checkpoint, values, weights))
    first = entries[0]
    for label, values, _ in entries[1:]:
        differ = [k for k in MODEL_KEYS if values.get(k) != first[1].get(k)]
        if differ:
            raise UserError(f"--checkpoint {label} was trained with another {differ[0]} ({values.get(differ[0])!r}) "
                            f"than {first[0]} ({first[1].get(differ[0])!r}); evaluate them in separate commands")
    return entries


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics (and write them to --json)."""
    from zotune.tasks import evaluate
    from zotune.train import TrainConfig, attach_cache, build_model, build_task, load_trainable

    if args.json:
        _check_output_file(Path(args.json))
    if args.batch_size < 1:
        raise UserError(f"batch_size must be positive, got {args.batch_size}")
    if args.cache_mb < 0:
        raise UserError(f"--cache-mb must be >= 0 (0 switches the cache off), got {args.cache_mb:g}")
    entries = [(label, TrainConfig.from_dict(values), weights) for label, values, weights in _configs(args)]
    tasks = [build_task(config) for _, config, _ in entries]  # every data check before the model loads
    config = entries[0][1]
    model, tokenizer = build_model(config)
    config.cache_mb = args.cache_mb
    # a plain --model has every weight trainable (no tuning mode): the cache could not be exact
    cache = attach_cache(model, config, _say) if args.checkpoint else None
    every: dict[str, dict] = {}
    try:
        for (label, config, weights), task in zip(entries, tasks):
            if weights is not None:
                load_trainable(model, weights)
            prefix = f"{label}: " if len(entries) > 1 else ""
            every[str(label)] = _evaluate_splits(model, tokenizer, task, config, args, evaluate, prefix)
    finally:
        if cache is not None:
            _say(f"zotune: activation cache: {cache.summary()}")
            cache.close()
    if args.json:
        results = every[str(entries[0][0])] if len(entries) == 1 else every
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _evaluate_splits(model, tokenizer, task, config, args: argparse.Namespace, evaluate, prefix: str) -> dict:
    results = {}
    for split in (["dev", "test"] if args.split == "both" else [args.split]):
        examples = getattr(task, split)
        if not examples:
            continue
        results[split] = evaluate(model, tokenizer, task, examples, batch_size=args.batch_size,
                                  max_length=config.max_length)
        print(f"{prefix}{task.name} {split}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in results[split].items()))
    return results
