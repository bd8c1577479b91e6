"""The papers' protocols as race suites, each with a ``quick`` and a ``full`` budget.

* ``lmbff-k16`` -- LM-BFF / MeZO / HiZOO / ZO-AdaMU's few-shot setting: SST-2, SST-5, SNLI,
  MNLI, RTE, TREC with k = 16 examples per class, data seeds 13, 21, 42, 87, 100.
* ``superglue-1k`` -- MeZO's OPT protocol: 1000 train / 500 dev / 1000 test examples on SST-2,
  RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA, ReCoRD, SQuAD (CB and COPA: 100 dev, as MeZO).

``full`` uses the papers' step counts and settings (MeZO: 100k steps at batch 64 for the
k-shot tasks and 20k steps at batch 16 for the OPT protocol, full fine-tuning, every data
seed; a GPU job). ``quick`` is sized for a 2-core CPU and the embedded SmolLM2-135M: final-norm
tuning (576 weights, where a few steps move accuracy; docs/demo.md), two data seeds, a
two-point lr grid, capped dev/test sets and a few optimizer steps, so that three optimizers
over the whole suite fit in an hour (measured: ``lmbff-k16`` with four optimizers, 120 cells, 18
wall-minutes on a quiet 2-core CPU with ``--jobs 2 --threads 1``; docs/race.md).
"""

from __future__ import annotations

import copy
from typing import Any

from zotune.errors import UserError

LMBFF_TASKS = ["sst2", "sst5", "snli", "mnli", "rte", "trec"]
SUPERGLUE_TASKS = ["sst2", "rte-superglue", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad"]

SUITES: dict[str, dict[str, dict[str, Any]]] = {
    "lmbff-k16": {
        "quick": {"tasks": LMBFF_TASKS, "seeds": [13, 42], "peft": ["final_norm"], "steps": 16, "eval_every": 8,
                  "baselines": ["zeroshot", "icl"], "icl_demonstrations": 4,
                  "train": {"k": 16, "batch_size": 8, "max_test": 100, "max_length": 128,
                            "eval_before": False, "eval_batch_size": 16}},
        "full": {"tasks": LMBFF_TASKS, "seeds": [13, 21, 42, 87, 100], "peft": ["full"], "steps": 100_000,
                 "eval_every": 10_000, "baselines": ["zeroshot", "icl"], "icl_demonstrations": 32,
                 "train": {"k": 16, "batch_size": 64, "max_test": 1000, "max_length": 256, "eval_before": False}},
    },
    "superglue-1k": {
        "quick": {"tasks": SUPERGLUE_TASKS, "seeds": [0, 1], "peft": ["final_norm"], "steps": 16, "eval_every": 8,
                  "baselines": ["zeroshot", "icl"], "icl_demonstrations": 4,
                  "train": {"k": 500, "max_train": 1000, "max_dev": 64, "max_test": 100, "batch_size": 8,
                            "max_length": 256, "eval_before": False, "eval_batch_size": 16}},
        "full": {"tasks": SUPERGLUE_TASKS, "seeds": [0, 1, 2, 3, 4], "peft": ["full"], "steps": 20_000,
                 "eval_every": 4_000, "baselines": ["zeroshot", "icl"], "icl_demonstrations": 32,
                 "train": {"k": 500, "max_train": 1000, "max_test": 1000, "batch_size": 16, "max_length": 256,
                           "eval_before": False}},
    },
}


def suite_values(name: str, budget: str) -> dict[str, Any]:
    """The grid values of ``name`` at the ``quick`` or ``full`` budget (a copy)."""
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    if budget not in SUITES[name]:
        raise UserError(f"unknown suite budget {budget!r}; choose quick or full")
    values = copy.deepcopy(SUITES[name][budget])
    values["train"] = {k: v for k, v in values["train"].items() if v is not None}
    return {"suite": name, "budget_preset": budget, **values}
