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


class PaddedDataset(TokenDataset):
    """Every third example predicts only 7 of its 11 next tokens (labels -100 after position 8)."""

    def __getitem__(self, i: int) -> dict:
        labels = self.ids[i].clone()
        if i % 3 == 0:
            labels[8:] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def test_zotrainer_logs_losses_on_the_first_order_trainers_scale(tmp_path):
    """Same data, same batches, lr 0: a plain (first-order) Trainer logs L(theta) per step and
    ZOTrainer logs the mean of L(theta +- eps z), which equals it up to O(eps^2) -- both the
    Trainer's loss, normalised by the number of predicted tokens of the batch."""
    from transformers import Trainer

    def args(name):
        return TrainingArguments(output_dir=str(tmp_path / name), learning_rate=0.0, max_steps=4,
                                 per_device_train_batch_size=8, lr_scheduler_type="constant", logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)

    first_order = Trainer(model=tiny_llama(), args=args("fo"), train_dataset=PaddedDataset())
    first_order.train()
    zo_trainer = ZOTrainer(model=tiny_llama(), args=args("zo"), train_dataset=PaddedDataset(),
                           zo_optimizer="zosgd", zo_kwargs={"eps": 1e-4})
    zo_trainer.train()
    fo_losses = [h["loss"] for h in first_order.state.log_history if "loss" in h]
    zo_losses = [h["loss"] for h in zo_trainer.state.log_history if "loss" in h]
    assert len(fo_losses) == len(zo_losses) == 4
    assert len(set(fo_losses)) > 1  # different batches, different losses: the comparison is per step
    assert zo_losses == pytest.approx(fo_losses, rel=1e-4)


def test_zotrainer_logs_projected_gradient_not_grad_norm(tmp_path):
    from transformers import TrainerCallback

    seen: list[float] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(abs(trainer.zo_optimizer.zo_state["last_projected_grads"][0]))

    trainer = make_trainer(tmp_path, max_steps=4, zo_optimizer="zosgd", zo_kwargs={"eps": 1e-3},
                           callbacks=[Record()])
    trainer.args.logging_steps = 2
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and len(seen) == 4
    for i, h in enumerate(logs):
        assert "grad_norm" not in h
        assert h["projected_grad"] == pytest.approx((seen[2 * i] + seen[2 * i + 1]) / 2, rel=1e-6)
        assert h["projected_grad"] > 0


def test_zotrainer_refuses_other_parallel_modes(tmp_path, monkeypatch):
    from transformers.training_args import ParallelMode

    from zotune.errors import UserError

    monkeypatch.setattr(TrainingArguments, "parallel_mode", property(lambda self: ParallelMode.NOT_DISTRIBUTED))
    with pytest.raises(UserError, match="one process per GPU"):
        make_trainer(tmp_path, max_steps=1)
