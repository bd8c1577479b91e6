"""The on-disk activation store (``zotune train --cache-dir``): shared rows give bit-identical runs.

Exact, not approximate: a run that reads its frozen-bottom rows from another run's store must
log the same losses, projected gradients, dev and test metrics and end with the same weights as
a run that computed them itself (``==``, no tolerance). Tiny random llama models, a few steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from zotune.cli import main
from zotune.models import apply_peft
from zotune.models.activation_cache import depth_split
from zotune.models.activation_store import namespace_of
from zotune.race.report import VOLATILE
from zotune.testing import tiny_causal_lm, tiny_tokenizer
from zotune.train import TrainConfig, train


def _run(tmp_path: Path, name: str, cache_dir: Path | None, optimizer: str = "zosgd", lr: float = 1e-2):
    tok = tiny_tokenizer()
    model = apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3), "top:1")
    out = tmp_path / name
    config = TrainConfig(task="sst2", steps=4, batch_size=4, max_train=8, max_dev=4, max_test=4, eval_every=2,
                         eval_batch_size=4, progress=False, lr=lr, eps=1e-2, peft="top:1", optimizer=optimizer,
                         cache_dir=str(cache_dir) if cache_dir else None, plot=False, output_dir=str(out))
    results = train(config, model=model, tokenizer=tok)
    log = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "step_time")}
           for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return log, weights, results


def _same(a, b) -> None:
    (log_a, w_a, r_a), (log_b, w_b, r_b) = a, b
    assert log_a == log_b and r_a["after"] == r_b["after"]
    assert all(torch.equal(w_a[n], w_b[n]) for n in w_a)


def test_runs_sharing_a_store_are_bit_identical_to_a_run_without_one(tmp_path):
    store = tmp_path / "store"
    alone = _run(tmp_path, "alone", None)
    first = _run(tmp_path, "first", store)  # fills the store
    second = _run(tmp_path, "second", store)  # reads it back
    other = _run(tmp_path, "adamw", store, optimizer="adamw")  # another optimizer, same examples
    _same(alone, first)
    _same(alone, second)
    s1, s2 = first[2]["activation_cache"], second[2]["activation_cache"]
    assert s1["disk_writes"] == s1["bottom_rows"] == s1["entries"] > 0 and s1["disk_rows"] == 0
    # the second run computed one row (to check the store against it) and read every other one back
    assert s2["bottom_rows"] == 1 and s2["disk_rows"] == s2["entries"] - 1 and s2["disk_writes"] == 0
    assert other[2]["activation_cache"]["bottom_rows"] == 1
    assert _run(tmp_path, "adamw-alone", None, optimizer="adamw")[0] == other[0]
    assert json.loads(next(store.glob("*/meta.json")).read_text())["block"] == 2


def test_a_store_whose_rows_differ_is_not_used(tmp_path, caplog):
    store = tmp_path / "store"
    alone = _run(tmp_path, "alone", None)
    _run(tmp_path, "fill", store)
    for path in store.glob("*/*/*.bin"):  # same size, other bits: e.g. written by another machine
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = _run(tmp_path, "again", store)
    _same(alone, again)
    assert "differs from the recomputed one" in caplog.text
    assert again[2]["activation_cache"]["disk_rows"] == 0


def test_the_namespace_follows_the_bottom_weights_and_the_threads():
    def namespace(model):
        split = depth_split(model)
        return namespace_of(model, split.block, split.bottom)[0]

    tok = tiny_tokenizer()
    a = apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3), "top:1")
    b = apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3), "top:1")
    assert namespace(a) == namespace(b)  # same weights loaded twice
    top = apply_peft(tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3), "final_norm")
    assert namespace(top) != namespace(a)  # another split
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-6  # a frozen weight, one value, slightly
    assert namespace(a) != namespace(b)
    threads, before = torch.get_num_threads(), namespace(a)
    try:
        torch.set_num_threads(threads + 1)  # another summation order in the matrix products, maybe
        assert namespace(a) != before
    finally:
        torch.set_num_threads(threads)


def test_an_unwritable_cache_dir_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "run"
    assert main(["train", "--cache-dir", str(blocker / "store"), "--output-dir", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cache-dir" in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def _stable(path: Path):
    """summary.json without what depends on the machine's speed or memory (as in test_race)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not any(w in k for w in VOLATILE)}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj

    return strip(json.loads(path.read_text()))


def test_a_race_shares_one_store_and_reports_as_without_it(tmp_path):
    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_causal_lm("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    grid = ["race", "--model", str(model_dir), "--tasks", "sst2", "--optimizers", "zosgd,adamw", "--seeds", "13",
            "--baselines", "zeroshot", "--steps", "3", "--eval-every", "1", "--lr", "zosgd=0.01,0.1",
            "--lr", "adamw=0.01", "--set", "batch_size=4", "--set", "max_dev=8", "--set", "max_test=8",
            "--in-process", "--threads", "1"]
    assert main([*grid, "--output-dir", str(tmp_path / "shared")]) == 0
    assert main([*grid, "--set", "cache_dir=", "--output-dir", str(tmp_path / "apart")]) == 0
    assert _stable(tmp_path / "shared" / "summary.json") == _stable(tmp_path / "apart" / "summary.json")

    def bottoms(race: str) -> list[int]:
        return [json.loads(p.read_text())["activation_cache"]["bottom_rows"]
                for p in sorted((tmp_path / race / "cells").glob("*/results.json"))]

    # apart: every cell runs every example's bottom; shared: the zero-shot cell runs dev and test,
    # the first trained cell the training examples, the others one row each (the store's check)
    assert sum(bottoms("shared")) < sum(bottoms("apart")) / 2
    assert (tmp_path / "shared" / "activations").is_dir() and not (tmp_path / "apart" / "activations").exists()
