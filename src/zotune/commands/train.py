"""``zotune train``: fine-tune a language model with a zeroth-order optimizer.

The options come from the fields of :class:`zotune.config.TrainConfig` (one argument group
per option group); this module adds ``--config``, ``--opt`` and ``--task-arg``.
"""

from __future__ import annotations

import argparse

from zotune.config import add_arguments as add_config_arguments
from zotune.config import config_from_args

DESCRIPTION = """\
Fine-tune a causal LM on a prompt-based task with a zeroth-order optimizer (forward passes only).

examples:
  zotune train --task sst2 --optimizer hizoo --peft lora --steps 500 --output-dir runs/sst2-hizoo
  zotune train --config run.yaml --lr 1e-5          # YAML config, CLI flags override it
  zotune train --task squad --peft prefix --objective f1 --optimizer hizoo --opt alpha=1e-8
  zotune train --task custom --task-arg path=my.jsonl --template 'Review: {text} Sentiment:' \\
               --task-arg 'label_words={0: " negative", 1: " positive"}'
  torchrun --nproc_per_node 2 -m zotune train ...  # data parallel: only loss scalars are exchanged

Every run writes config.json, metrics.jsonl, checkpoint, best/, trajectory.zot, results.json
and curves.png into --output-dir; --resume continues an interrupted run on the identical
trajectory (even after a kill), and `zotune replay` rebuilds its weights from trajectory.zot.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--opt``, ``--task-arg`` and one flag per config field."""
    parser.add_argument("--config", metavar="FILE", help="YAML (or JSON) file with any of the options below "
                        "(keys as the flags without --, e.g. `eval_every: 10`); flags given override it")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="extra optimizer argument, e.g. --opt alpha=1e-6 (repeatable; the value is "
                             "read as YAML; see `zotune optimizers` for each optimizer's options)")
    parser.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra task argument, e.g. for --task custom: --task-arg path=my.jsonl "
                             "--task-arg 'label_words={0: \" negative\", 1: \" positive\"}' (repeatable; "
                             "the value is read as YAML)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Build the config from the file and flags, then train."""
    from zotune.train import train

    train(config_from_args(args))
    return 0
