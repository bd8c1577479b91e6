"""Layer-sampled perturbation (``layer_fraction``, LeZO / MeZO-BCD): an engine option of every
optimizer. Oracle equality for every method is in test_optim_common.py; here: the layer
units, the subset as a pure function of (seed, step), no noise outside the subset, and the
expected update direction."""

from __future__ import annotations

import collections

import pytest
import torch

import zotune.optim as zo
from zotune.optim import sweep
from zotune.optim.layers import layer_key, layer_subset, layer_units, subset_size
from zotune.testing import tiny_causal_lm


def test_layer_keys_group_numbered_blocks_and_keep_other_tensors_alone():
    assert layer_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_key("base_model.model.model.layers.10.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.10"
    assert layer_key("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_key("0.weight") == "0" and layer_key("weight") == "weight"
    names = ["emb.weight", "layers.0.a.weight", "layers.0.b.bias", "layers.1.a.weight", "norm.weight", "norm.bias"]
    assert layer_units(names) == [0, 1, 1, 2, 3, 3]


def test_subset_is_a_pure_function_of_seed_and_step_with_the_stated_size():
    assert subset_size(14, 0.25) == 4 and subset_size(12, 0.25) == 3 and subset_size(3, 0.01) == 1
    assert subset_size(5, 1.0) == 5
    a = layer_subset(7, 3, 14, 0.25)
    assert a == layer_subset(7, 3, 14, 0.25) and len(a) == 4 and a <= set(range(14))
    assert len({layer_subset(7, t, 14, 0.25) for t in range(20)}) > 10  # varies with the step
    assert layer_subset(7, 3, 14, 1.0) == frozenset(range(14))


def test_unit_frequencies_are_uniform():
    """Each of 8 units is chosen with probability k/n = 2/8; over 4000 steps the count is
    1000 +- 27 (binomial sd); tolerance 120 (4.4 sd), fixed seed."""
    counts = collections.Counter(u for t in range(4000) for u in layer_subset(0, t, 8, 0.25))
    assert set(counts) == set(range(8))
    assert all(abs(c - 1000) <= 120 for c in counts.values()), counts


def test_module_layers_are_the_units_and_outside_layers_cost_no_noise(monkeypatch):
    """Built from a tiny LLaMA (4 decoder layers + embeddings + final norm = 6 units; the head is
    tied), a step with layer_fraction 1/3 changes and generates noise for exactly two units."""
    model = tiny_causal_lm("llama", num_layers=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    units = layer_units(names)
    assert max(units) + 1 == 6
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    opt = zo.ZOSGD(model, lr=1e-3, eps=1e-3, seed=5, layer_fraction=1 / 3, num_threads=1)
    generated = collections.Counter()
    real_fill = sweep.fill_noise

    def counting_fill(out, seed, distribution):
        generated["elements"] += out.numel()
        return real_fill(out, seed, distribution)

    monkeypatch.setattr(sweep, "fill_noise", counting_fill)
    for step in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        generated.clear()
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        chosen = layer_subset(5, step, 6, 1 / 3)
        inside = {n for n, u in zip(names, units) if u in chosen}
        changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        assert changed and changed <= inside
        # three sweeps (+eps, -2eps, restore+update), over the chosen layers' elements only
        size = sum(p.numel() for n, p in model.named_parameters() if n in inside)
        assert generated["elements"] == 3 * size


def test_expected_update_is_the_gradient_scaled_by_the_fraction():
    """On a linear loss L = g.x the SPSA estimate is exact along z, so one ZO-SGD step moves x by
    -lr (g_S . z_S) z_S on the chosen layers S; its mean is -lr (k/n) g. Four layers of 3
    coordinates, k/n = 1/2, 2000 steps (seed 0): the relative error of the mean update has an
    sd of about sqrt(d / (k/n) / steps) = 0.11; tolerance 0.35."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(4)]
    g = [torch.randn(3, dtype=torch.float64) for _ in range(4)]
    opt = zo.ZOSGD(params, lr=1.0, eps=1e-3, seed=0, layer_fraction=0.5)
    steps = 2000
    for _ in range(steps):
        opt.step(lambda: sum((gi * p).sum() for gi, p in zip(g, params)))
    mean = torch.cat([p.detach() for p in params]) / steps
    expected = -0.5 * torch.cat(g)
    assert float((mean - expected).norm() / expected.norm()) < 0.35


def test_layer_fraction_is_checked_and_survives_a_checkpoint():
    w = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="layer_fraction"):
            zo.ZOSGD(w, layer_fraction=bad)
    opt = zo.ZOSGD(w, layer_fraction=0.5)
    other = zo.ZOSGD(w)
    other.load_state_dict(opt.state_dict())
    assert other.layer_fraction == 0.5


def test_zotune_train_takes_layer_fraction_as_an_optimizer_option(tmp_path):
    import json

    from zotune.testing import tiny_tokenizer
    from zotune.train import TrainConfig, train

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), num_layers=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(task="rte", optimizer="fzoo", steps=1, batch_size=4, max_dev=4, max_test=4, lr=1e-3,
                         optimizer_args={"layer_fraction": 0.2, "n_queries": 2}, output_dir=str(tmp_path / "run"),
                         progress=False)
    train(config, model=model, tokenizer=tok)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optimizer_args"]["layer_fraction"] == 0.2
    changed = {layer_key(n) for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert len(changed) == 1  # one of 6 layers (round(0.2 * 6) = 1) moved in the one step
