"""``zotune train``: fine-tune a language model with a zeroth-order optimizer."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from zotune.errors import UserError
from zotune.train import PEFT_MODES, TrainConfig

DESCRIPTION = """\
Fine-tune a causal LM on a prompt-based task with a zeroth-order optimizer (forward passes only).

examples:
  zotune train --task sst2 --optimizer hizoo --peft lora --steps 500 --output-dir runs/sst2-hizoo
  zotune train --config run.yaml --lr 1e-5          # YAML config, CLI flags override it
  zotune train --task squad --peft prefix --objective f1 --opt alpha=1e-8
  torchrun --nproc_per_node 2 -m zotune train ...  # data parallel: only loss scalars are exchanged

Every run writes config.json, metrics.jsonl, checkpoint/, best/, results.json and curves.png
into --output-dir; --resume continues an interrupted run on the identical trajectory.
"""

HELP: dict[str, str] = {
    "model": "embedded model name (smollm2-135m, gemma3-270m), local HF directory or hub id (offline)",
    "task": "task name (see `zotune tasks`), or 'custom' with --task-arg path=FILE ...",
    "optimizer": "optimizer name or alias (see `zotune optimizers`)",
    "steps": "number of optimizer steps",
    "output_dir": "where the run writes its files",
    "lr": "learning rate (default: the optimizer's published setting for the tuning mode; docs/methods.md)",
    "eps": "perturbation scale (default by tuning mode: full 1e-3, lora 1e-2, prefix 1e-1)",
    "batch_size": "examples per step (global, split across data-parallel ranks)",
    "schedule": "learning-rate schedule: constant or linear (decay to 0)",
    "peft": f"tuning mode: {', '.join(PEFT_MODES)}",
    "objective": "ce (cross-entropy), accuracy (-accuracy, non-differentiable) or f1 (-F1)",
    "template": "named prompt template of the task (see `zotune tasks`)",
    "k": "examples per class for LM-BFF k-shot tasks",
    "data_seed": "data split seed (LM-BFF: 13, 21, 42, 87, 100)",
    "seed": "seed of the perturbation directions and the batch order",
    "dtype": "float32, bfloat16 or float16 (low precision keeps an fp32 master copy)",
    "eval_every": "evaluate on dev every N steps (0: only at the end); keeps the best checkpoint",
    "early_stop": "stop after N evaluations without dev improvement (0: never)",
    "save_every": "write checkpoint/ every N steps (it is always written at the end)",
    "resume": "continue the run in --output-dir from its checkpoint, with the settings it was started with",
    "overwrite": "replace a non-empty --output-dir",
    "optimizer_args": "extra optimizer arguments as JSON (or use --opt KEY=VALUE)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML (or JSON) file with any of the options below")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="extra optimizer argument, e.g. --opt alpha=1e-6 (repeatable)")
    parser.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra task argument, e.g. for --task custom: --task-arg path=my.jsonl "
                             "--task-arg 'template=Review: {text} Sentiment:' "
                             "--task-arg 'label_words={0: \" negative\", 1: \" positive\"}' (repeatable)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        text = HELP.get(f.name, f.name.replace("_", " "))
        default = f.default if f.default is not dataclasses.MISSING else None
        text += f" (default: {default})" if default not in (None, {}) else ""
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name in ("optimizer_args", "task_args"):
            parser.add_argument(_flag(f.name), type=json.loads, default=None, help=text)
        elif f.name == "lora_targets":
            parser.add_argument(_flag(f.name), nargs="+", default=None, help=text)
        else:
            base = _base_type(kind)
            parser.add_argument(_flag(f.name), type=base, default=None, help=text)


def _base_type(kind: Any) -> type:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Saved run settings (with --resume) < the --config file < the flags given."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_config_file(args.config))
    for name in TrainConfig.field_names():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if values.get("resume"):
        values = {**saved_run_config(values.get("output_dir", TrainConfig.output_dir)), **values}
    for flag, key in (("opt", "optimizer_args"), ("task_arg", "task_args")):
        extra = dict(values.get(key) or {})
        extra.update(parse_key_values(getattr(args, flag, []), "--" + flag.replace("_", "-")))
        if extra:
            values[key] = extra
    return TrainConfig.from_dict(values)


def saved_run_config(output_dir: str) -> dict[str, Any]:
    """The settings a run in ``output_dir`` was started with (its config.json), if any."""
    path = Path(output_dir) / "config.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    keep = set(TrainConfig.field_names()) - {"resume", "overwrite"}
    return {k: v for k, v in saved.items() if k in keep}


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``["alpha=1e-6", "label_words={0: a}"]`` -> values parsed as YAML scalars/mappings."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UserError(f"{flag} {item!r}: value is not valid YAML ({e})") from e
    return out


def load_config_file(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.exists():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of options")
    return data


def run(args: argparse.Namespace) -> int:
    from zotune.train import train

    config = config_from_args(args)
    train(config)
    return 0
