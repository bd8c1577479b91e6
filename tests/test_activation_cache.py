"""Depth-selected tuning (top:K, LoRA on the top blocks) and the frozen-bottom activation cache.

Tolerance of the cached path: it equals the uncached one to float rounding (the bottom of an
example runs alone and unpadded instead of inside a padded batch, which changes the summation
order); on these fp32 tiny models the difference is <= 1e-7 in practice, asserted as rtol 1e-5 /
atol 1e-6.
"""

from __future__ import annotations

import json

import pytest
import torch

from zotune.errors import UserError
from zotune.models import ActivationCache, apply_peft, attach_activation_cache, depth_split, parse_peft_mode
from zotune.tasks import evaluate, get_task, make_objective
from zotune.testing import tiny_causal_lm, tiny_tokenizer
from zotune.train import TrainConfig, train

RTOL, ATOL = 1e-5, 1e-6
#: what the top blocks of each tiny architecture are called
LAYERS = {"opt": "model.decoder.layers", **dict.fromkeys(["llama", "qwen2", "mistral", "gemma3"], "model.layers")}


def _setup(arch: str, task_name: str, mode: str, lora_layers: str | None = None, layers: int = 3):
    task = get_task(task_name, max_train=8, max_dev=6, max_test=6)
    tok = tiny_tokenizer(task.label_words or [])
    model = tiny_causal_lm(arch, vocab_size=max(len(tok), 256), num_layers=layers)
    return task, tok, apply_peft(model, mode, lora_layers=lora_layers)


def _batches(task):
    # overlapping batches of different widths: the same example is padded differently each time
    return [task.train[0:4], task.train[2:6], task.train[4:8], task.train[0:8]]


def _scores(task, tok, model) -> list[torch.Tensor]:
    """Losses of every batch and the per-example class scores (or token log-probs) of the first."""
    objective = make_objective(model, tok, task, max_length=64)
    scorer = objective.scorer
    with torch.no_grad():
        out = [objective(b).reshape(1) for b in _batches(task)]
        if task.kind == "generation":
            prompts = [ex.prompt for ex in task.train[:4]]
            targets = [task.format_target(ex.answers[0]) for ex in task.train[:4]]
            out += scorer.continuation_token_logprobs(prompts, targets)
        else:
            out += scorer.class_scores(task.train[:4])
    return out


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------

#: one Llama-, Gemma- and OPT-style decoder on every task kind (classification, multiple choice,
#: generation), each in a different mode; Qwen2 and Mistral (Llama-style) on classification
KINDS = (("sst2", ("top:1", None)), ("copa", ("lora", "top:1")), ("squad", ("final_norm", None)))
CASES = [(arch, task, mode) for arch in ("llama", "gemma3", "opt") for task, mode in KINDS]
CASES += [("qwen2", "sst2", ("lora", "top:1")), ("mistral", "sst2", ("top:1", None))]


@pytest.mark.parametrize(("arch", "task_name", "mode"), CASES)
def test_cached_scores_equal_uncached(arch, task_name, mode):
    task, tok, model = _setup(arch, task_name, *mode)
    reference = _scores(task, tok, model)
    cache, message = attach_activation_cache(model, max_mb=64)
    assert cache is not None, message
    first, second = _scores(task, tok, model), _scores(task, tok, model)
    _assert_close(reference, first)
    _assert_close(reference, second)
    assert cache.stats["cached_forwards"] > 0 and cache.stats["bypassed_forwards"] == 0
    assert cache.stats["hit_rows"] > cache.stats["bottom_rows"] > 0
    cache.close()
    _assert_close(reference, _scores(task, tok, model))  # hooks gone: the plain model again


@pytest.mark.parametrize(("mode", "lora_layers"), [("final_norm", None), ("top:2", None), ("lora", "top:1"),
                                                   ("norms", None)])
def test_every_mode_on_llama_classification(mode, lora_layers):
    task, tok, model = _setup("llama", "sst2", mode, lora_layers, layers=4)
    reference = _scores(task, tok, model)
    cache, message = attach_activation_cache(model, max_mb=64)
    if mode == "norms":  # block 0's norms are trainable: nothing below them to cache
        assert cache is None and "block 0" in message
        return
    _assert_close(reference, _scores(task, tok, model))


def test_generation_eval_runs_the_whole_model_and_matches():
    task, tok, model = _setup("llama", "squad", "top:1")
    before = evaluate(model, tok, task, task.test[:3], batch_size=3, max_length=64, max_new_tokens=4)
    cache, _ = attach_activation_cache(model)
    after = evaluate(model, tok, task, task.test[:3], batch_size=3, max_length=64, max_new_tokens=4)
    assert after == before
    assert cache.stats["cached_forwards"] == 0 and cache.stats["bypassed_forwards"] > 0  # KV-cached decoding


def test_bottom_blocks_run_once_per_example():
    task, tok, model = _setup("llama", "sst2", "top:1", layers=3)
    rows = {0: 0, 2: 0}

    def counter(i):
        def hook(_module, args, kwargs):
            rows[i] += (args[0] if args else kwargs["hidden_states"]).shape[0]
        return hook

    # the attention of block 0 (bottom) and block 2 (trainable top) count the rows they process
    model.model.layers[0].self_attn.register_forward_pre_hook(counter(0), with_kwargs=True)
    model.model.layers[2].self_attn.register_forward_pre_hook(counter(2), with_kwargs=True)
    cache, _ = attach_activation_cache(model)
    objective = make_objective(model, tok, task, max_length=64)
    with torch.no_grad():
        for _ in range(3):
            for batch in _batches(task):
                objective(batch)
    for _ in range(2):
        evaluate(model, tok, task, task.dev, batch_size=4, max_length=64)
    distinct = len(task.train) + len(task.dev)
    assert rows[0] == distinct == cache.stats["bottom_rows"] == cache.stats["entries"]
    assert rows[2] == 3 * sum(len(b) for b in _batches(task)) + 2 * len(task.dev)


def test_training_run_follows_the_same_trajectory_with_and_without_cache(tmp_path):
    """Same seeds, same batches: losses per step and final weights within rtol 1e-4 / atol 1e-6."""
    runs = {}
    for cache_mb in (0, 64):
        task_tok = tiny_tokenizer()
        model = apply_peft(tiny_causal_lm("llama", vocab_size=len(task_tok), num_layers=3), "top:1")
        config = TrainConfig(task="sst2", steps=6, batch_size=4, max_train=8, max_dev=4, max_test=4, eval_every=3,
                             eval_batch_size=4, progress=False, lr=1e-2, eps=1e-2, peft="top:1", cache_mb=cache_mb,
                             output_dir=str(tmp_path / f"c{cache_mb}"))
        results = train(config, model=model, tokenizer=task_tok)
        lines = (tmp_path / f"c{cache_mb}" / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"]
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[cache_mb] = (losses, weights, results)
    (l0, w0, r0), (l1, w1, r1) = runs[0], runs[64]
    assert len(l0) == 6
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-4, atol=1e-6)
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], rtol=1e-4, atol=1e-6)
    assert r0["activation_cache"] is None
    assert r1["activation_cache"]["hit_rows"] > r1["activation_cache"]["bottom_rows"] > 0
    assert r1["after"] == r0["after"]
    assert not w0["model.layers.2.mlp.up_proj.weight"].equal(
        tiny_causal_lm("llama", vocab_size=len(tiny_tokenizer()), num_layers=3).model.layers[2].mlp.up_proj.weight
    ), "the top block should have moved"


@pytest.mark.parametrize("max_forwards", [0, 6])
def test_warming_fills_every_training_row_before_the_clock_and_changes_nothing(tmp_path, max_forwards):
    """--cache-warm runs the bottom over the rows the steps will read (only those a forwards budget
    reaches), so no step runs the bottom; the run is bit-identical with warming off."""
    from zotune.train import evaluate_before, finish_run, plan_run, run_steps, start_run, warm_cache

    out = {}
    for warm in (True, False):
        tok = tiny_tokenizer()
        model = apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3), "top:1")
        config = TrainConfig(task="sst2", steps=6, batch_size=4, max_train=20, max_dev=4, max_test=4, eval_every=0,
                             eval_batch_size=4, progress=False, lr=1e-2, eps=1e-2, peft="top:1", cache_warm=warm,
                             max_forwards=max_forwards, output_dir=str(tmp_path / f"w{warm}{max_forwards}"))
        run = start_run(plan_run(config), model=model, tokenizer=tok)
        try:
            evaluate_before(run)
            warm_cache(run)
            bottoms_before_steps = run.cache.stats["bottom_rows"]
            run_steps(run)
            bottoms_in_steps = run.cache.stats["bottom_rows"] - bottoms_before_steps
            results = finish_run(run)
        finally:
            run.close()
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out[warm] = (bottoms_in_steps, results, weights)
    (in_steps, results, weights), (cold_in_steps, cold_results, cold_weights) = out[True], out[False]
    steps = results["steps"]
    assert steps == (3 if max_forwards else 6)
    assert in_steps == 0 and results["warm_seconds"] > 0
    assert cold_in_steps > 0 and cold_results["warm_seconds"] == 0.0
    # the warm pass ran exactly the rows of the steps that ran (the same count the cold run's steps ran)
    assert results["activation_cache"]["bottom_rows"] == cold_results["activation_cache"]["bottom_rows"]
    for name, w in weights.items():
        assert torch.equal(w, cold_weights[name]), name
    assert results["after"] == cold_results["after"]


def test_no_warming_under_a_time_budget(tmp_path):
    # --max-seconds: the rows the run will reach are unknown, so nothing is run ahead of the steps
    tok = tiny_tokenizer()
    model = apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3), "top:1")
    config = TrainConfig(task="sst2", steps=2, batch_size=4, max_train=20, max_dev=4, max_test=4, eval_every=0,
                         eval_batch_size=4, progress=False, lr=1e-2, eps=1e-2, peft="top:1", max_seconds=3600,
                         output_dir=str(tmp_path / "t"))
    assert train(config, model=model, tokenizer=tok)["warm_seconds"] == 0.0


# ------------------------------------------------------------------------------------------
# memory bound, invalidation, refusals
# ------------------------------------------------------------------------------------------


def test_memory_bound_recomputes_what_does_not_fit():
    task, tok, model = _setup("llama", "sst2", "final_norm")
    reference = _scores(task, tok, model)
    row_bytes = 32 * 4  # hidden 32, fp32: one token
    cache = ActivationCache(model, max_mb=40 * row_bytes / 2**20)  # room for about 40 tokens
    _assert_close(reference, _scores(task, tok, model))
    _assert_close(reference, _scores(task, tok, model))
    assert 0 < cache.stats["bytes"] <= 40 * row_bytes
    assert cache.stats["overflow_rows"] > 0 and cache.stats["entries"] < len(task.train)


def test_changed_frozen_weight_or_trainable_set_empties_the_cache():
    task, tok, model = _setup("llama", "sst2", "top:1")
    cache, _ = attach_activation_cache(model)
    _scores(task, tok, model)
    assert cache.stats["entries"] > 0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # a frozen bottom weight changes in place
    cache.enabled = False
    reference = _scores(task, tok, model)
    cache.enabled = True
    _assert_close(reference, _scores(task, tok, model))
    assert cache.split == 2
    model.model.layers[1].requires_grad_(True)  # now block 1 is trainable: the split moves down
    _assert_close(reference, _scores(task, tok, model))
    assert cache.split == 1


@pytest.mark.parametrize(
    ("arch", "mode", "reason"),
    [
        ("llama", "prefix", "prefix / prompt tuning"),
        ("llama", "full", "model.embed_tokens.weight is trainable"),
        ("llama", "top:1+head", "model.embed_tokens.weight is trainable"),  # tied head = the embedding
        ("llama", "norms", "block 0 is trainable"),
        ("gpt2", "final_norm", "model type 'gpt2' is not supported"),
    ],
)
def test_cache_refused_where_it_cannot_be_exact(arch, mode, reason):
    tok = tiny_tokenizer()
    model = apply_peft(tiny_causal_lm(arch, vocab_size=len(tok)), mode)
    cache, message = attach_activation_cache(model)
    assert cache is None
    assert reason in message and "\n" not in message


def test_untied_head_is_above_the_blocks():
    tok = tiny_tokenizer()
    model = tiny_causal_lm("gemma3", vocab_size=len(tok), num_layers=3)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    model = apply_peft(model, "top:1+head")
    split = depth_split(model)
    assert split.refusal is None and split.block == 2
    assert "lm_head.weight" in {n for n, p in model.named_parameters() if p.requires_grad}


def test_switched_off_and_bypassed_forwards():
    _, _, model = _setup("llama", "sst2", "final_norm")
    assert attach_activation_cache(model, max_mb=0) == (None, "activation cache off (--cache-mb 0)")
    cache, _ = attach_activation_cache(model)
    ids = torch.randint(5, 100, (2, 6))
    with torch.no_grad():
        model(input_ids=ids)  # use_cache defaults to True: a KV cache would miss the bottom blocks
        model.train()
        model(input_ids=ids, use_cache=False)  # training mode: dropout would make the bottom random
        model.eval()
        model(input_ids=ids, use_cache=False, output_hidden_states=True)
    assert cache.stats["bypassed_forwards"] == 3 and cache.stats["cached_forwards"] == 0
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert cache.stats["cached_forwards"] == 1


# ------------------------------------------------------------------------------------------
# top:K and LoRA on the top blocks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_top_k_trains_the_last_blocks_and_the_final_norm(arch):
    model = apply_peft(tiny_causal_lm(arch, num_layers=4), "top:2")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = LAYERS[arch]
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith((f"{prefix}.2.", f"{prefix}.3."))
                         or n in ("model.norm.weight", "model.decoder.final_layer_norm.weight",
                                  "model.decoder.final_layer_norm.bias")}
    split = depth_split(model)
    assert (split.block, split.num_layers, split.refusal) == (2, 4, None)
    assert split.describe() == "lowest trainable block 2 of 4"


def test_lora_on_the_top_blocks_only():
    model = apply_peft(tiny_causal_lm("llama", num_layers=4), "lora", lora_layers="top:1")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.3." in n and "lora_" in n for n in trainable)
    assert depth_split(model).block == 3


@pytest.mark.parametrize(
    ("mode", "kwargs", "message"),
    [
        ("top:5", {}, "only 4 decoder blocks"),
        ("top:0", {}, "unknown parameter mode"),
        ("top:2+tail", {}, "unknown parameter mode"),
        ("lora", {"lora_layers": "bottom:1"}, "use top:K"),
        ("lora", {"lora_layers": "top:9"}, "only 4 decoder blocks"),
        ("final_norm", {"lora_layers": "top:1"}, "--peft lora only"),
    ],
)
def test_depth_mode_user_errors(mode, kwargs, message):
    with pytest.raises(UserError, match=message):
        apply_peft(tiny_causal_lm("llama", num_layers=4), mode, **kwargs)


def test_top_k_refused_for_an_unsupported_decoder():
    with pytest.raises(UserError, match="split by depth"):
        apply_peft(tiny_causal_lm("gpt2"), "top:1")


def test_parse_peft_mode():
    assert parse_peft_mode("TOP:3+head") == ("top", 3, True)
    assert parse_peft_mode("lora") == ("lora", None, False)
    with pytest.raises(UserError, match="top:K"):
        parse_peft_mode("top:K")


def test_cli_train_prints_trainable_count_lowest_block_and_cache(tmp_path, capsys):
    from zotune.cli import main
    from zotune.models import save_plain_checkpoint

    tok = tiny_tokenizer()
    model_dir = save_plain_checkpoint(tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3), tok,
                                      tmp_path / "model")
    argv = ["train", "--model", str(model_dir), "--task", "sst2", "--peft", "top:1", "--steps", "2",
            "--batch-size", "4", "--max-train", "8", "--max-dev", "4", "--max-test", "4", "--no-progress",
            "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    trainable = sum(p.numel() for p in apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3),
                                                  "top:1").parameters() if p.requires_grad)
    assert f"top:1 tuning: {trainable:,} trainable parameters" in err
    assert "lowest trainable block 2 of 3" in err
    assert "activation cache on: embeddings and blocks 0-1 of 3 run once per example" in err
    assert "activation cache: " in err and "examples cached" in err
    assert main([*argv[:-1], str(tmp_path / "run2"), "--cache-mb", "0"]) == 0
    assert "activation cache off (--cache-mb 0)" in capsys.readouterr().err


def test_bench_cache_times_each_mode_off_and_on(tmp_path, capsys):
    from zotune.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "cache", "--model", "tiny", "--modes", "final_norm,lora:top:2", "--steps", "1",
                 "--rounds", "1", "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| final_norm " in table and "| lora:top:2 " in table and "CPU cached / uncached" in table
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["lowest_block"], r["blocks"]) for r in rows] == [("final_norm", 8, 8), ("lora:top:2", 6, 8)]
    for r in rows:
        assert r["refusal"] is None and r["uncached_s"] > 0 and r["cached_s"] > 0
        assert r["uncached_cpu_s"] > 0 and r["cached_cpu_s"] > 0 and r["cpu_ratio"] > 0
        assert r["bottom_rows"] == r["examples"]  # the fill pass ran every example's bottom, once


def test_resumed_cached_run_is_bit_identical(tmp_path):
    """An example's bottom runs alone, so a resumed run (empty cache) recomputes the same bits."""
    from safetensors.torch import load_file

    tok = tiny_tokenizer()

    def config(name: str, steps: int, resume: bool = False) -> TrainConfig:
        return TrainConfig(task="sst2", steps=steps, batch_size=4, max_train=8, max_dev=4, max_test=4,
                           eval_before=False, progress=False, lr=1e-2, eps=1e-2, peft="top:1", seed=3,
                           resume=resume, output_dir=str(tmp_path / name))

    def model():
        return apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3, seed=0), "top:1")

    train(config("full", 6), model=model(), tokenizer=tok)
    train(config("resumed", 3), model=model(), tokenizer=tok)
    train(config("resumed", 6, resume=True), model=model(), tokenizer=tok)
    a = load_file(str(tmp_path / "full" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
