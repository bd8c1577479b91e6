"""Frozen weights stay frozen (torch.optim convention), for every registered optimizer."""

from __future__ import annotations

import pytest
import torch
from tests.test_optim_common import ALL, kw, make_problem

import zotune.optim as zo


def _frozen_problem():
    model, closure = make_problem()
    model[0].weight.requires_grad_(False)  # the *first* parameter: trainable indices shift by one
    return model, closure


@pytest.mark.parametrize("name", ALL)
def test_frozen_parameters_are_skipped_and_noise_does_not_depend_on_them(name):
    all_model, all_closure = _frozen_problem()
    frozen = all_model[0].weight.detach().clone()
    opt_all = zo.create(name, all_model.parameters(), **kw(name))  # frozen ones passed out of habit
    some_model, some_closure = _frozen_problem()
    opt_some = zo.create(name, [p for p in some_model.parameters() if p.requires_grad], **kw(name))
    for _ in range(4):
        opt_all.step(all_closure)
        opt_some.step(some_closure)
    assert torch.equal(all_model[0].weight, frozen)  # never perturbed, never updated
    assert not {k for k in opt_all.state[all_model[0].weight] if not k.startswith("_")}  # no state
    moved = [not torch.equal(a, b) for a, b in zip(some_model.parameters(), make_problem()[0].parameters())]
    assert any(moved[1:])
    for a, b in zip(all_model.parameters(), some_model.parameters()):
        assert torch.equal(a, b)  # same noise indices: bit-identical trajectories


def test_unfreezing_between_steps_takes_effect():
    model, closure = _frozen_problem()
    opt = zo.ZOSGD(model.parameters(), lr=1e-2)
    opt.step(closure)
    before = model[0].weight.detach().clone()
    model[0].weight.requires_grad_(True)
    opt.step(closure)
    assert not torch.equal(model[0].weight, before)
