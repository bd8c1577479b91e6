"""ZOTrainer: a transformers.Trainer subclass that takes zeroth-order steps."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from zotune.integrations import ZOTrainer


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 12, vocab: int = 64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def make_trainer(tmp_path, max_steps: int, **kw) -> ZOTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, max_steps=max_steps,
                             per_device_train_batch_size=8, lr_scheduler_type="linear", logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0)
    return ZOTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(), **kw)


@pytest.mark.parametrize("name", ["zosgd", "zo-adam"])
def test_zotrainer_trains_and_lr_schedule_applies(tmp_path, name):
    trainer = make_trainer(tmp_path, max_steps=6, zo_optimizer=name, zo_kwargs={"eps": 1e-3})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    opt = trainer.zo_optimizer
    assert opt.step_count == 6  # one ZO step per Trainer step, no double stepping
    assert opt.zo_state["forwards"] == 12
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # linear schedule decayed to 0
    moved = sum(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert moved == len(before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(x)) for x in losses)


def test_zotrainer_is_deterministic(tmp_path):
    a = make_trainer(tmp_path / "a", max_steps=3, zo_optimizer="zosgd")
    a.train()
    b = make_trainer(tmp_path / "b", max_steps=3, zo_optimizer="zosgd")
    b.train()
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


def test_zotrainer_refuses_mixed_precision(tmp_path):
    from zotune.errors import UserError

    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to=[], use_cpu=True)
    with pytest.raises(UserError, match="gradient_accumulation_steps"):
        ZOTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset())
