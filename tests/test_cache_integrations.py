"""The frozen-bottom activation cache in ``ZOTrainer`` and ``zotune eval``.

Same rules as ``zotune train`` (tests/test_activation_cache.py): used where exact, refused with
a one-line reason elsewhere. Tolerance of cached vs uncached results: rtol 1e-4 / atol 1e-6
(summation order differs between an unpadded single-example bottom and a batched one; observed
differences on these fp32 tiny models are ~1e-7).
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from zotune.integrations import ZOTrainer
from zotune.models import apply_peft
from zotune.testing import tiny_causal_lm

RTOL, ATOL = 1e-4, 1e-6


class Rows(torch.utils.data.Dataset):
    """``n`` distinct token rows of different lengths (padded by the collator below)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(5, 200, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g)
                     for _ in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i]}


def collate(rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = r["input_ids"]
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _count_rows(model, block: int, counts: dict[int, int]) -> None:
    """Count the rows the attention of ``block`` processes (a skipped block never calls it)."""
    def hook(_module, args, kwargs):
        counts[block] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    model.model.layers[block].self_attn.register_forward_pre_hook(hook, with_kwargs=True)


def _trainer(tmp_path, cache_mb: float, mode: str = "top:1", steps: int = 4) -> ZOTrainer:
    model = apply_peft(tiny_causal_lm("llama", vocab_size=256, num_layers=3), mode)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, max_steps=steps,
                             per_device_train_batch_size=4, per_device_eval_batch_size=3,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, eval_strategy="steps", eval_steps=2,
                             use_cache=True)  # the KV cache on: the trainer switches it off for ZO steps itself
    return ZOTrainer(model=model, args=args, train_dataset=Rows(8, 0), eval_dataset=Rows(5, 1),
                     data_collator=collate, zo_optimizer="zosgd", zo_kwargs={"eps": 1e-2}, zo_cache_mb=cache_mb)


def test_zotrainer_cache_runs_the_bottom_once_per_example_and_matches_uncached(tmp_path):
    runs = {}
    for cache_mb in (0, 64):
        trainer = _trainer(tmp_path / f"c{cache_mb}", cache_mb)
        counts = {0: 0, 2: 0}
        _count_rows(trainer.model, 0, counts)
        _count_rows(trainer.model, 2, counts)
        trainer.train()  # 4 steps of 4 rows = 2 epochs of 8 examples; evaluations at steps 2 and 4
        final = trainer.evaluate()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[cache_mb] = (trainer, counts, losses, evals, final, weights)
    (t0, c0, l0, e0, f0, w0), (t1, c1, l1, e1, f1, w1) = runs[0], runs[64]
    assert t0.zo_cache is None and t0.zo_cache_message == "activation cache off (--cache-mb 0)"
    assert t1.zo_cache is not None and t1.zo_cache_message.startswith("activation cache on: embeddings and blocks 0-1")
    assert t1.model.config.use_cache  # restored after every step and evaluation
    # uncached: block 0 runs 2 forwards x 4 steps x 4 rows + 3 evaluations x 5 rows; cached: once per example
    assert c0[0] == 2 * 4 * 4 + 3 * 5 and c0[2] == c0[0]
    assert c1[0] == 8 + 5 == t1.zo_cache.stats["bottom_rows"] == t1.zo_cache.stats["entries"]
    assert c1[2] == c0[2] and t1.zo_cache.stats["bypassed_forwards"] == 0
    assert len(l0) == 4 and len(e0) == 3
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(e1), torch.tensor(e0), rtol=RTOL, atol=ATOL)
    assert f1["eval_loss"] == pytest.approx(f0["eval_loss"], rel=RTOL)
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], rtol=RTOL, atol=ATOL)
    assert not torch.equal(w0["model.layers.2.mlp.up_proj.weight"],
                           tiny_causal_lm("llama", vocab_size=256, num_layers=3).model.layers[2].mlp.up_proj.weight)


@pytest.mark.parametrize(("mode", "reason"), [("full", "embed_tokens.weight is trainable and acts below block 0"),
                                             ("lora", "block 0 is trainable")])
def test_zotrainer_cache_refused_where_it_cannot_be_exact(tmp_path, mode, reason):
    trainer = _trainer(tmp_path, 64, mode=mode, steps=1)
    assert trainer.zo_cache is None
    assert trainer.zo_cache_message.startswith("activation cache off:") and reason in trainer.zo_cache_message
    trainer.train()  # trains uncached, the model's config untouched
    assert trainer.model.config.use_cache


# ------------------------------------------------------------------------------------------
# zotune eval
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny top:1 runs (other seeds, so other weights) of one saved model, and a final_norm run."""
    from zotune.cli import main
    from zotune.models import save_plain_checkpoint
    from zotune.testing import tiny_tokenizer

    tmp = tmp_path_factory.mktemp("eval-cache")
    tok = tiny_tokenizer()
    model_dir = save_plain_checkpoint(tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3), tok, tmp / "model")
    runs = []
    for name, peft, seed in (("a", "top:1", "1"), ("b", "top:1", "2"), ("c", "final_norm", "1")):
        assert main(["train", "--model", str(model_dir), "--task", "sst2", "--peft", peft, "--steps", "2",
                     "--batch-size", "4", "--max-train", "8", "--max-dev", "4", "--max-test", "5", "--no-progress",
                     "--lr", "1e-2", "--eps", "1e-2", "--seed", seed, "--no-eval-before",
                     "--output-dir", str(tmp / name)]) == 0
        runs.append(tmp / name)
    return tmp, runs


def test_eval_several_checkpoints_runs_each_bottom_once_and_matches_uncached(two_runs, capsys):
    import json

    from zotune.cli import main

    tmp, (a, b, _) = two_runs
    capsys.readouterr()
    single = {}
    for run in (a, b):
        assert main(["eval", "--checkpoint", str(run), "--cache-mb", "0", "--json", str(tmp / "one.json")]) == 0
        single[str(run)] = json.loads((tmp / "one.json").read_text())
        assert "activation cache off (--cache-mb 0)" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(a), str(b), "--json", str(tmp / "both.json")]) == 0
    out = capsys.readouterr()
    both = json.loads((tmp / "both.json").read_text())
    assert "lowest trainable block 2 of 3" in out.err
    assert "activation cache on: embeddings and blocks 0-1 of 3 run once per example" in out.err
    # 4 dev + 5 test examples: their bottoms ran once for the first run, the second one reused them all
    assert "9 examples cached" in out.err and "9 rows served from the cache, 9 run through the bottom" in out.err
    assert f"{a}: sst2 test: accuracy" in out.out and f"{b}: sst2 test: accuracy" in out.out
    for run in (str(a), str(b)):
        for split in ("dev", "test"):
            for key, value in single[run][split].items():
                assert both[run][split][key] == pytest.approx(value, rel=RTOL, abs=ATOL), (run, split, key)


def test_eval_refuses_checkpoints_of_different_tuning_modes(two_runs, capsys):
    from zotune.cli import main

    _, (a, _, c) = two_runs
    assert main(["eval", "--checkpoint", str(a), str(c)]) == 2
    err = capsys.readouterr().err
    assert "trained with another peft ('final_norm')" in err and "evaluate them in separate commands" in err
    assert "Traceback" not in err
