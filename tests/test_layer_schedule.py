"""MeZO-BCD's block orders (``layer_schedule``: random, cyclic, permuted) on top of
``layer_fraction``: coverage per cycle, determinism, oracle equality, checkpoint resume, and
the training option."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zotune.optim as zo
from zotune.optim.layers import LAYER_SCHEDULES, cycle_length, layer_subset, subset_size
from zotune.optim.reference import oracle_for
from zotune.testing import tiny_causal_lm

CYCLIC = ("cyclic", "permuted")


@pytest.mark.parametrize("schedule", CYCLIC)
@pytest.mark.parametrize(("n_units", "fraction"), [(14, 0.25), (7, 0.25), (6, 0.5), (5, 0.2), (3, 0.9)])
def test_every_unit_is_visited_exactly_once_per_cycle(schedule, n_units, fraction):
    """Over each of 5 cycles the subsets are disjoint, cover all units, and all but the last
    have k = subset_size units (14 units at 0.25: k = 4, cycles of 4 steps: 4+4+4+2)."""
    k, length = subset_size(n_units, fraction), cycle_length(n_units, fraction)
    assert length == -(-n_units // k)
    for cycle in range(5):
        subsets = [layer_subset(3, cycle * length + i, n_units, fraction, schedule) for i in range(length)]
        assert sum(len(s) for s in subsets) == n_units
        assert frozenset().union(*subsets) == frozenset(range(n_units))
        assert all(len(s) == k for s in subsets[:-1]) and 1 <= len(subsets[-1]) <= k


def test_cyclic_walks_the_model_order_and_permuted_reshuffles_each_cycle():
    assert [sorted(layer_subset(0, t, 6, 1 / 3, "cyclic")) for t in range(4)] == [[0, 1], [2, 3], [4, 5], [0, 1]]
    orders = {tuple(tuple(sorted(layer_subset(9, c * 4 + i, 14, 0.25, "permuted"))) for i in range(4))
              for c in range(10)}
    assert len(orders) == 10  # ten cycles, ten different partitions (a tie has probability ~1e-8)
    assert layer_subset(9, 5, 14, 0.25, "permuted") != layer_subset(10, 5, 14, 0.25, "permuted")


@pytest.mark.parametrize("schedule", LAYER_SCHEDULES)
def test_schedules_are_pure_functions_of_seed_and_step(schedule):
    first = [layer_subset(4, t, 9, 0.3, schedule) for t in range(30)]
    again = [layer_subset(4, t, 9, 0.3, schedule) for t in reversed(range(30))][::-1]
    assert first == again
    assert layer_subset(4, 7, 9, 1.0, schedule) == frozenset(range(9))


def test_bad_schedule_is_refused():
    w = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="layer_schedule"):
        zo.ZOSGD(w, layer_schedule="round-robin")
    with pytest.raises(ValueError, match="layer_schedule"):
        layer_subset(0, 0, 4, 0.5, "round-robin")


@pytest.mark.parametrize("name", ["ZOSGD", "ZOAdam", "LOZOM"])
@pytest.mark.parametrize("schedule", CYCLIC)
def test_fast_engine_matches_the_oracle_with_a_cyclic_schedule(name, schedule):
    """4 tensors (4 units), half per step: 2-step cycles; the fast code equals the oracle
    (float64, 1e-9 as in the common suite) and every tensor moves within each cycle."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.sin(x.sum(1, keepdim=True))
    closures = [lambda m=m: ((m(x) - y) ** 2).mean() for m in models]
    opts = {**zo.get(name).test_kwargs, "eps": 1e-3, "seed": 5, "layer_fraction": 0.5, "layer_schedule": schedule}
    fast = zo.create(name, models[0].parameters(), block_size=32, num_threads=2, **opts)
    ref = oracle_for(name)(list(models[1].parameters()), block_size=32, **opts)
    for cycle in range(3):
        before = [p.detach().clone() for p in models[0].parameters()]
        for _ in range(2):
            fast.step(closures[0])
            ref.step(closures[1])
            for a, b in zip(models[0].parameters(), models[1].parameters()):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        assert all(not torch.equal(a, b) for a, b in zip(before, models[0].parameters())), cycle


@pytest.mark.parametrize("schedule", LAYER_SCHEDULES)
def test_a_resumed_run_equals_the_uninterrupted_one(schedule):
    """7 steps straight vs 3 steps, state_dict, a fresh optimizer built with the *default*
    schedule, load, 4 steps: bit-identical weights (the schedule comes back from the checkpoint)."""
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def run(split: int | None) -> list[torch.Tensor]:
        model = tiny_causal_lm("llama", num_layers=4, seed=0)
        opt = zo.LOZOM(model, lr=1e-2, rank=2, interval=2, seed=3, layer_fraction=0.34,
                       layer_schedule=schedule, num_threads=1)
        closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
        for step in range(7):
            if step == split:
                saved = opt.state_dict()
                opt = zo.LOZOM(model, lr=1e-2, rank=2, interval=2, seed=3, layer_fraction=0.34, num_threads=1)
                opt.load_state_dict(saved)
                assert opt.layer_schedule == schedule
            opt.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(None), run(3)):
        assert torch.equal(a, b)


def test_zotune_train_takes_layer_schedule_as_an_optimizer_option(tmp_path):
    """``--opt layer_schedule=cyclic``: with 6 units and fraction 1/3 the first two steps move
    units {0, 1} (embeddings, block 0) and then {2, 3} (blocks 1, 2), in model order."""
    import json

    from zotune.optim.layers import layer_key
    from zotune.testing import tiny_tokenizer
    from zotune.train import TrainConfig, train

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), num_layers=4)
    keys = list(dict.fromkeys(layer_key(n) for n, p in model.named_parameters() if p.requires_grad))
    assert len(keys) == 6
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(task="rte", optimizer="zo-sgd", steps=2, batch_size=4, max_dev=4, max_test=4, lr=1e-3,
                         optimizer_args={"layer_fraction": 1 / 3, "layer_schedule": "cyclic"},
                         output_dir=str(tmp_path / "run"), progress=False)
    train(config, model=model, tokenizer=tok)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optimizer_args"]["layer_schedule"] == "cyclic"
    changed = {layer_key(n) for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == set(keys[:4])
