"""Tests every registered optimizer shares (parametrized over the registry)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import zotune.optim as zo
from problems import Boom, failing_at, regression_problem, weights
from zotune.optim.reference import oracle_for

ALL = zo.available()


def kw(name: str, **extra) -> dict:
    """The method's own ``test_kwargs`` for the problem below, plus ``extra``."""
    return {**zo.get(name).test_kwargs, **extra}


def make_problem(seed: int = 0, dtype: torch.dtype = torch.float32):
    return regression_problem(seed, dtype)


@pytest.mark.parametrize("name", ALL)
def test_matches_reference_step_by_step(name):
    """The fast block-wise engine equals the materialised-z oracle for several steps.

    In float64, so that the only differences are roundings: the fast path reaches
    theta - eps z as (theta + eps z) - 2 eps z, and a loss rounding error of ~1e-16 is
    amplified by lr |z| / eps into the update; 1e-9 leaves room for that and nothing else.
    """
    fast_model, fast_closure = make_problem(dtype=torch.float64)
    ref_model, ref_closure = make_problem(dtype=torch.float64)
    opt_kw = kw(name, eps=1e-3, seed=7)
    fast = zo.create(name, fast_model.parameters(), block_size=32, num_threads=2, **opt_kw)
    ref_cls = oracle_for(name)
    ref = ref_cls(list(ref_model.parameters()), block_size=32, **opt_kw)
    moved = False
    for _ in range(6):
        fast.step(fast_closure)
        ref.step(ref_closure)
        for a, b in zip(fast_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        start = make_problem(dtype=torch.float64)[0]
        moved |= any(not torch.equal(a, b) for a, b in zip(weights(fast_model), weights(start)))
    assert moved, "the optimizer never moved the weights"


@pytest.mark.parametrize("name", ALL)
def test_lr_zero_restores_weights(name):
    model, closure = make_problem()
    before = weights(model)
    opt = zo.create(name, model.parameters(), **kw(name, lr=0.0, weight_decay=0.0))
    for _ in range(3):
        opt.step(closure)
    for a, b in zip(before, model.parameters()):
        # in-place fp32 restore: within a couple of roundings of |theta| + eps|z|
        assert (a - b).abs().max() <= 4 * torch.finfo(torch.float32).eps * (a.abs().max() + 1e-2)


@pytest.mark.parametrize("name", ALL)
def test_exact_restore_is_bit_exact(name):
    model, closure = make_problem()
    before = weights(model)
    opt = zo.create(name, model.parameters(), exact_restore=True, **kw(name, lr=0.0))
    for _ in range(3):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("fail_at", [1, 2])
def test_exception_in_closure_restores_weights(name, fail_at):
    model, closure = make_problem()
    opt = zo.create(name, model.parameters(), exact_restore=True, **kw(name))
    opt.step(closure)
    before = weights(model)
    with pytest.raises(Boom):
        opt.step(failing_at(closure, fail_at))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.step_count == 1  # the failed step did not count


@pytest.mark.parametrize("name", ALL)
def test_exception_restores_default_mode_within_rounding(name):
    model, closure = make_problem()
    opt = zo.create(name, model.parameters(), **kw(name))
    before = weights(model)
    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom("forward failed")
        return closure()

    with pytest.raises(Boom):
        opt.step(failing)
    for a, b in zip(before, model.parameters()):
        assert (a - b).abs().max() <= 4 * torch.finfo(torch.float32).eps * (a.abs().max() + 1e-2)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips_step(name, bad):
    model, closure = make_problem()
    opt = zo.create(name, model.parameters(), exact_restore=True, **kw(name))
    before = weights(model)
    calls = {"n": 0}

    def sometimes_bad():
        calls["n"] += 1
        return torch.tensor(bad) if calls["n"] == 2 else closure()

    loss = opt.step(sometimes_bad)
    assert math.isnan(float(loss))
    assert opt.zo_state["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.step(closure)  # training continues
    assert opt.zo_state["updates"] == 1


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_continues_identical_trajectory(name):
    model, closure = make_problem()
    opt = zo.create(name, model, **kw(name, seed=3))
    for _ in range(3):
        opt.step(closure)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(3):
        opt.step(closure)
    expected = weights(model)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2, closure2 = make_problem(seed=123)  # different init, overwritten by the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2 = zo.create(name, model2, **kw(name, seed=999))  # seed comes from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(3):
        opt2.step(closure2)
    assert opt2.step_count == 6
    assert all(torch.equal(a, b) for a, b in zip(expected, model2.parameters()))


@pytest.mark.parametrize("name", ALL)
def test_results_do_not_depend_on_thread_counts(name):
    results = []
    old = torch.get_num_threads()
    try:
        for workers, intra in [(1, 1), (2, 2), (3, 1)]:
            torch.set_num_threads(intra)
            model, closure = make_problem()
            opt = zo.create(name, model.parameters(), block_size=16, num_threads=workers, **kw(name))
            for _ in range(3):
                opt.step(closure)
            results.append(weights(model))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_result_other_seed_differs(name):
    runs = []
    for seed in (1, 1, 2):
        model, closure = make_problem()
        opt = zo.create(name, model.parameters(), **kw(name, seed=seed))
        for _ in range(2):
            opt.step(closure)
        runs.append(weights(model))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


@pytest.mark.parametrize("name", ALL)
def test_lr_scheduler_and_param_groups(name):
    model, closure = make_problem()
    first, second = model[0], model[2]
    groups = [
        {"params": list(first.parameters())},
        {"params": list(second.parameters()), "lr": 0.0},
    ]
    opt = zo.create(name, groups, **kw(name))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    frozen = weights(second)
    base_lr = opt.param_groups[0]["lr"]
    for _ in range(3):
        opt.step(closure)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(base_lr * 0.125)
    for a, b in zip(frozen, second.parameters()):
        assert (a - b).abs().max() <= 4 * torch.finfo(torch.float32).eps * (a.abs().max() + 1e-2)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_never_drift_and_state_is_fp32(name, dtype):
    model, closure = make_problem(dtype=dtype)
    before = weights(model)
    opt = zo.create(name, model.parameters(), **kw(name, lr=0.0))
    for _ in range(5):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == torch.float32, key


def test_low_precision_master_accumulates_sub_ulp_updates():
    """A bf16 weight cannot hold a 1e-5 update; the fp32 master does, and it shows up later."""
    w = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = zo.ZOSGD([w], lr=1e-5, eps=1e-3, seed=0)
    for _ in range(200):
        opt.step(lambda: (w.float() * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum())
    master = opt.state[w]["master"]
    assert master.dtype == torch.float32
    assert (master - 1.0).abs().max() > 1e-4  # moved, by many sub-ulp steps
    assert torch.equal(w.data, master.to(torch.bfloat16))


@pytest.mark.parametrize("name", ALL)
def test_module_constructor_uses_eval_mode_and_trainable_params_only(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    model.train()
    seen = []
    x = torch.randn(16, 4)

    def closure():
        seen.append(model.training)
        return model(x).pow(2).mean()

    opt = zo.create(name, model, **kw(name))
    opt.step(closure)
    assert seen and not any(seen)  # every forward ran in eval mode (no dropout)
    assert model.training  # restored afterwards
    assert torch.equal(model[0].weight, frozen)


@pytest.mark.parametrize("name", ALL)
def test_step_requires_closure_and_validates_arguments(name):
    model, _ = make_problem()
    opt = zo.create(name, model.parameters(), **kw(name))
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError):
        zo.create(name, model.parameters(), **kw(name, eps=0.0))
    with pytest.raises(ValueError):
        zo.create(name, model.parameters(), **kw(name, lr=-1.0))


def test_registry_lists_core_methods_and_resolves_aliases():
    names = zo.available()
    for expected in ["ZOSGD", "ZOSGDMomentum", "ZOSGDConservative", "ZOSGDSign", "ZOAdam"]:
        assert expected in names
    assert zo.get("mezo") is zo.ZOSGD
    assert zo.get("zo-adam") is zo.ZOAdam
    from zotune.errors import UserError

    with pytest.raises(UserError, match="available"):
        zo.get("sgd-but-wrong")


def test_every_registered_optimizer_has_a_reference():
    missing = []
    for name in zo.available():
        try:
            oracle_for(name)
        except (LookupError, ImportError, AttributeError, TypeError):
            missing.append(name)
    assert not missing, f"no reference oracle for {missing}"


@pytest.mark.parametrize("name", ALL)
def test_layer_fraction_matches_reference_and_leaves_other_layers_alone(name):
    """With half the layers per step (4 tensors, one layer each: 2 per step) the fast engine
    equals the oracle, and the two tensors outside the step's subset are bit-identical."""
    fast_model, fast_closure = make_problem(dtype=torch.float64)
    ref_model, ref_closure = make_problem(dtype=torch.float64)
    opt_kw = kw(name, eps=1e-3, seed=11)
    fast = zo.create(name, fast_model.parameters(), block_size=32, num_threads=2, layer_fraction=0.5, **opt_kw)
    ref = oracle_for(name)(list(ref_model.parameters()), block_size=32, layer_fraction=0.5, **opt_kw)
    touched = set()
    for _ in range(6):
        before = weights(fast_model)
        fast.step(fast_closure)
        ref.step(ref_closure)
        for a, b in zip(fast_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        changed = {k for k, (a, b) in enumerate(zip(before, fast_model.parameters())) if not torch.equal(a, b)}
        assert len(changed) <= 2, changed
        touched |= changed
    assert len(touched) >= 3, "six steps should have reached most layers"


def test_block_size_defaults_to_the_noise_devices():
    # a block costs a fixed launch overhead on CUDA, so noise generated there uses larger blocks;
    # noise generated on the CPU (also for CUDA weights, noise_device="cpu") keeps the CPU contract
    from zotune.optim.noise import CUDA_BLOCK_SIZE, DEFAULT_BLOCK_SIZE, default_block_size

    assert default_block_size("cpu") == DEFAULT_BLOCK_SIZE and default_block_size("cuda:1") == CUDA_BLOCK_SIZE
    w = torch.nn.Parameter(torch.zeros(4))
    assert zo.ZOSGD([w]).block_size == DEFAULT_BLOCK_SIZE
    assert zo.ZOSGD([w], noise_device="cuda").block_size == CUDA_BLOCK_SIZE  # no noise is drawn here
    assert zo.ZOSGD([w], noise_device="cuda", block_size=64).block_size == 64
    saved = zo.ZOSGD([w], noise_device="cuda").state_dict()
    restored = zo.ZOSGD([w])
    restored.load_state_dict(saved)
    assert restored.block_size == CUDA_BLOCK_SIZE  # part of the state: a resumed run keeps its blocks
    # streaming offload keeps the weights in CPU memory and draws their noise on the GPU
    late = zo.ZOSGD([w])
    late.noise_generated_on("cuda")
    assert late.block_size == CUDA_BLOCK_SIZE
    given = zo.ZOSGD([w], block_size=64)
    given.noise_generated_on("cuda")
    assert given.block_size == 64
    stepped = zo.ZOSGD([w])
    stepped.step(lambda: w.sum())
    stepped.noise_generated_on("cuda")  # too late: the blocks of the first step are drawn
    assert stepped.block_size == DEFAULT_BLOCK_SIZE
