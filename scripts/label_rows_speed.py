"""A classification forward with the label words' rows of the LM head only vs the whole head.

The label-word fast path needs K logits at one position; multiplying the hidden state by the
whole head (49,152 rows on SmolLM2) is most of a cached ``final_norm`` forward and half of a
cached ``top:2`` one. This prints, per tuning mode, the median process CPU time of one training
forward (SST-2, batch 16, the embedded SmolLM2-135M, one thread, activation cache on where the
mode allows) with the rows only (``zotune.tasks.scoring.head_rows``, the default) and with the
whole head, interleaved in one run, and the largest difference of the K logits. CPU time, so a
loaded machine still compares the two. Usage:

    HF_HUB_OFFLINE=1 python scripts/label_rows_speed.py --modes final_norm,top:2,lora --repeats 9
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

import zotune.tasks.scoring as scoring
from zotune.models import apply_peft, attach_activation_cache, load_model
from zotune.tasks import TaskScorer, get_task


@contextlib.contextmanager
def whole_head(model: Any, rows: Any) -> Iterator[bool]:
    yield False


def cpu_seconds(scorer: TaskScorer, batch: list[Any]) -> float:
    t0 = time.process_time()
    scorer.label_word_logits(batch)
    return time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="final_norm,top:2,lora")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = get_task("sst2", k=500)
    batch = task.train[: args.batch_size]
    print("| mode | whole head (CPU ms) | label rows (CPU ms) | ratio | max logit difference |\n|---|---|---|---|---|")
    for mode in args.modes.split(","):
        model, tokenizer = load_model(device="cpu")
        model = apply_peft(model, mode)
        cache, _ = attach_activation_cache(model)
        scorer = TaskScorer(model, tokenizer, task, max_length=128)
        rows_only = scoring.head_rows
        times: dict[str, list[float]] = {"whole": [], "rows": []}
        with torch.no_grad():
            scorer.label_word_logits(batch)  # fill the cache
            scoring.head_rows = whole_head
            reference = scorer.label_word_logits(batch)
            for _ in range(args.repeats):
                for name, context in (("whole", whole_head), ("rows", rows_only)):
                    scoring.head_rows = context
                    times[name].append(cpu_seconds(scorer, batch))
            scoring.head_rows = rows_only
            diff = (scorer.label_word_logits(batch) - reference).abs().max().item()
        whole, rows = (statistics.median(times[k]) * 1e3 for k in ("whole", "rows"))
        print(f"| {mode} | {whole:.1f} | {rows:.1f} | {rows / whole:.2f} | {diff:.1e} |")
        if cache is not None:
            cache.close()


if __name__ == "__main__":
    main()
