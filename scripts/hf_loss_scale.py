"""ZOTrainer and a first-order Trainer log training losses on the same scale (real SmolLM2-135M).

Both train the embedded SmolLM2-135M-Instruct for 2 steps at learning rate 0 on the same 8
sentences (batch 4, ``DataCollatorForLanguageModeling``, so the same batches), and print their
log lines and ``evaluate()``. The first-order Trainer logs L(theta) of each batch; ZOTrainer
(ZO-SGD, eps 1e-3, full parameters) logs the mean of L(theta + eps z) and L(theta - eps z),
which is above L(theta) by O(eps^2). Usage (a few minutes on 2 CPU cores):

    python scripts/hf_loss_scale.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from zotune.integrations import ZOTrainer
from zotune.models import load_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and a large city in Europe.",
    "def add(a, b):\n    return a + b", "I loved this movie, the acting was great and the story moving.",
    "Zeroth-order optimisation uses only forward passes.", "It rained all day, so we stayed inside and read books.",
    "The stock market fell sharply on Monday after the announcement.", "She plays the violin in the city orchestra.",
]


def run(trainer_cls: type, **kwargs) -> tuple[list[dict], float]:
    """(training log lines, eval_loss) of 2 steps at lr 0."""
    model, tok = load_model("smollm2-135m")
    data = [tok(t) for t in TEXTS]
    args = TrainingArguments(tempfile.mkdtemp(), learning_rate=0.0, max_steps=2, per_device_train_batch_size=4,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, eval_strategy="no")
    trainer = trainer_cls(model=model, args=args, train_dataset=data,
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False), **kwargs)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], trainer.evaluate(eval_dataset=data)["eval_loss"]


def main() -> None:
    torch.set_num_threads(2)
    first_order = run(Trainer)
    zeroth_order = run(ZOTrainer, zo_optimizer="zosgd", zo_kwargs={"eps": 1e-3})
    print("first-order logs", first_order[0], "eval", first_order[1])
    print("ZOTrainer logs", zeroth_order[0], "eval", zeroth_order[1])


if __name__ == "__main__":
    main()
