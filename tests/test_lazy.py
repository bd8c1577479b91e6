"""The lazy fused update (``lazy_update=True``): the same trajectory as the eager engine in two
passes per step, and a flush before every point at which the weights can be observed."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import zotune.optim as zo
from problems import Boom, failing_at, regression_problem, weights
from zotune.optim.reference import oracle_for

ALL = zo.available()
CAPABLE = [n for n in ALL if zo.get(n).lazy_capable]
STEPS = 6


def kw(name: str, **extra) -> dict:
    return {**zo.get(name).test_kwargs, **extra}


def make_problem(dtype: torch.dtype = torch.float32):
    """Three layers (so layer sampling has subsets to alternate between) and a fixed regression batch."""
    return regression_problem(0, dtype, hidden_layers=2)


def opt_state(opt: zo.ZOOptimizer) -> list[tuple[str, torch.Tensor]]:
    return [(k, v.clone()) for p in opt.state.values() for k, v in p.items() if torch.is_tensor(v)]


def train(name: str, lazy: bool, dtype=torch.float32, steps: int = STEPS, **extra):
    """``steps`` steps from the module, with an lr that changes every step (a scheduler)."""
    model, closure = make_problem(dtype)
    opt = zo.create(name, model, lazy_update=lazy, **kw(name, seed=5, block_size=32, **extra))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        opt.step(closure)
        sched.step()  # an lr change while an update is pending must not leak into it
    return model, opt


VARIANTS = {
    "fp32": dict(),
    "bf16": dict(dtype=torch.bfloat16),
    "fp16": dict(dtype=torch.float16),
    "exact_restore": dict(exact_restore=True),
    "layer_fraction": dict(layer_fraction=0.5),
    "bf16+layer_fraction": dict(dtype=torch.bfloat16, layer_fraction=0.34),
    "cyclic layers": dict(layer_fraction=0.34, layer_schedule="cyclic"),  # consecutive steps: disjoint layers
    "threads": dict(num_threads=3),
}


# every optimizer in fp32 (the others must ignore the flag); the capable ones in every variant
CASES = [(n, "fp32") for n in ALL] + [(n, v) for n in CAPABLE for v in VARIANTS if v != "fp32"]


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_lazy_trajectory_is_bit_identical_to_eager(name, variant):
    """The same operations per block in the same order: weights, state, zo_state bit-identical.

    Methods that are not ``lazy_capable`` ignore the flag (same passes as eager)."""
    eager_model, eager = train(name, False, **VARIANTS[variant])
    lazy_model, lazy = train(name, True, **VARIANTS[variant])
    assert lazy.zo_state == eager.zo_state  # final at the end of a step: no flush needed to read it
    lazy.flush()
    assert all(torch.equal(a, b) for a, b in zip(weights(eager_model), weights(lazy_model)))
    for (ka, a), (kb, b) in zip(opt_state(eager), opt_state(lazy), strict=True):
        assert ka == kb and torch.equal(a, b), ka
    if name in CAPABLE and name != "DiZO":
        # steady state: 2 passes per step (+1 for the final flush) instead of 3
        assert eager.pass_counts["passes"] == 3 * STEPS
        assert lazy.pass_counts["passes"] == 2 * STEPS + 1 and lazy.pass_counts["deferred"] == STEPS
    elif name not in CAPABLE:
        assert lazy.pass_counts == eager.pass_counts


def test_dizo_defers_only_its_plain_steps():
    """DiZO's projection search reads theta: the pending update is flushed before it, not fused."""
    _, opt = train("DiZO", True, steps=8, interval=3)
    projection_steps = sum(opt.is_projection_step(s) for s in range(8))
    assert opt.pass_counts["deferred"] == 8 - projection_steps
    assert opt.pass_counts["flushed"] == projection_steps  # one flush before each projection step


@pytest.mark.parametrize("name", ALL)
def test_lazy_matches_reference(name):
    """Oracle equality (float64, as in the common suite), compared at a flush every 3 steps."""
    fast_model, fast_closure = make_problem(torch.float64)
    ref_model, ref_closure = make_problem(torch.float64)
    opt_kw = kw(name, eps=1e-3, seed=7)
    fast = zo.create(name, fast_model.parameters(), block_size=32, num_threads=2, lazy_update=True, **opt_kw)
    ref = oracle_for(name)(list(ref_model.parameters()), block_size=32, **opt_kw)
    for step in range(STEPS):
        fast.step(fast_closure)
        ref.step(ref_closure)
        if step % 3 == 2:
            fast.flush()
            for a, b in zip(fast_model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fail_at", [1, 2])
@pytest.mark.parametrize("name", CAPABLE)
def test_exception_in_the_next_step_leaves_the_updated_weights(name, fail_at):
    """An exception in step t+1 (before or after its first forward): the weights are those after
    step t, update applied, bit-identical to the eager run with exact restores."""
    eager_model, closure_e = make_problem()
    eager = zo.create(name, eager_model, exact_restore=True, **kw(name))
    eager.step(closure_e)
    model, closure = make_problem()
    opt = zo.create(name, model, exact_restore=True, lazy_update=True, **kw(name))
    opt.step(closure)
    assert opt.has_pending_update
    with pytest.raises(Boom):
        opt.step(failing_at(closure, fail_at))
    assert not opt.has_pending_update
    assert all(torch.equal(a, b) for a, b in zip(weights(eager_model), weights(model)))


@pytest.mark.parametrize("name", CAPABLE)
def test_nan_step_then_training_continues_identically(name):
    def run(lazy: bool):
        model, closure = make_problem()
        opt = zo.create(name, model, exact_restore=True, lazy_update=lazy, **kw(name))
        calls = {"n": 0}

        def sometimes_nan():
            calls["n"] += 1
            return torch.tensor(float("nan")) if calls["n"] == 4 else closure()  # step 2's first forward

        for _ in range(4):
            opt.step(sometimes_nan)
        opt.flush()
        return model, opt

    (a, oa), (b, ob) = run(False), run(True)
    assert oa.zo_state["skipped_steps"] == ob.zo_state["skipped_steps"] == 1
    assert all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))


# ------------------------------------------------------------------ observation points
def observed(fn_name: str, model: nn.Module, opt: zo.ZOOptimizer, tmp_path) -> list[torch.Tensor]:
    """Observe the weights through one public path; returns what that path saw."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))
    if fn_name == "model.state_dict":
        return list(model.state_dict().values())
    if fn_name == "model.forward":
        return [model(x)]
    if fn_name == "optimizer.state_dict":
        opt.state_dict()
        return weights(model)
    if fn_name == "safetensors":
        from safetensors.torch import load_file, save_file

        save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
        return list(load_file(str(tmp_path / "w.safetensors")).values())
    if fn_name == "checkpoint.save_trainable":
        from safetensors.torch import load_file

        from zotune.checkpoint import save_trainable

        save_trainable(model, tmp_path / "ckpt")
        return list(load_file(str(tmp_path / "ckpt" / "trainable.safetensors")).values())
    if fn_name == "checkpoint.save_checkpoint":
        from safetensors.torch import load_file

        from zotune.checkpoint import save_checkpoint

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        version = save_checkpoint(tmp_path, model, opt, sched, {"step": 3})
        return list(load_file(str(version / "trainable.safetensors")).values())
    if fn_name == "trajectory.model_fingerprint":
        from zotune.trajectory import model_fingerprint

        return [torch.tensor([int(model_fingerprint(model), 16)])]
    if fn_name == "flush_pending":
        zo.flush_pending(model)
        return weights(model)
    if fn_name == "flush":
        opt.flush()
        return weights(model)
    if fn_name == "deepcopy":
        copy.deepcopy(opt)
        return weights(model)
    if fn_name == "torch.save(optimizer)":
        torch.save(opt.state_dict(), io.BytesIO())
        return weights(model)
    raise AssertionError(fn_name)


OBSERVERS = ["model.state_dict", "model.forward", "optimizer.state_dict", "safetensors", "checkpoint.save_trainable",
             "checkpoint.save_checkpoint", "trajectory.model_fingerprint", "flush_pending", "flush", "deepcopy",
             "torch.save(optimizer)"]


@pytest.mark.parametrize("observer", OBSERVERS)
def test_every_observation_point_flushes_first(observer, tmp_path):
    """3 lazy steps, then one observation: it sees the eager weights (the flush ran first)."""
    eager_model, closure_e = make_problem()
    eager = zo.create("ZOSGD", eager_model, **kw("ZOSGD"))
    model, closure = make_problem()
    opt = zo.create("ZOSGD", model, lazy_update=True, **kw("ZOSGD"))
    for _ in range(3):
        eager.step(closure_e)
        opt.step(closure)
    assert opt.has_pending_update
    assert not all(torch.equal(a, b) for a, b in zip(weights(eager_model), weights(model)))  # displaced now
    (tmp_path / "e").mkdir()
    (tmp_path / "l").mkdir()
    want = observed(observer, eager_model, eager, tmp_path / "e")
    got = observed(observer, model, opt, tmp_path / "l")
    assert not opt.has_pending_update and opt.pass_counts["flushed"] == 1
    assert len(want) == len(got) and all(torch.equal(a, b) for a, b in zip(want, got))


def test_model_load_state_dict_flushes_before_loading():
    """Loading weights replaces them: the pending update is applied first, never on top of the load."""
    model, closure = make_problem()
    opt = zo.create("ZOSGD", model, lazy_update=True, **kw("ZOSGD"))
    fresh = {k: v.clone() for k, v in make_problem()[0].state_dict().items()}
    opt.step(closure)
    model.load_state_dict(fresh)
    assert not opt.has_pending_update
    assert all(torch.equal(a, fresh[k]) for k, a in model.state_dict().items())


def test_parameter_list_has_no_hooks_but_flush_pending_finds_it():
    """Built from a list, the optimizer cannot hook a module: flush_pending(module) still finds it."""
    model, closure = make_problem()
    opt = zo.create("ZOSGD", list(model.parameters()), lazy_update=True, **kw("ZOSGD"))
    opt.step(closure)
    model.state_dict()
    assert opt.has_pending_update  # documented: p.data / state_dict of a list-built optimizer's module
    assert zo.flush_pending(model) == 1 and not opt.has_pending_update
    assert zo.flush_pending(model) == 0


def test_state_dict_round_trip_with_pending_update_continues_identically():
    """Save in the middle of a lazy run (the save flushes), resume eagerly: the same weights as one lazy run."""
    model, closure = make_problem()
    opt = zo.create("ZOAdam", model, lazy_update=True, **kw("ZOAdam", seed=3))
    for _ in range(3):
        opt.step(closure)
    ckpt = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    for _ in range(3):
        opt.step(closure)
    opt.flush()
    model2, closure2 = make_problem()
    model2.load_state_dict(ckpt["model"])
    opt2 = zo.create("ZOAdam", model2, **kw("ZOAdam", seed=99))
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(3):
        opt2.step(closure2)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(model2)))


def test_freezing_a_parameter_between_steps_flushes_with_the_old_slots():
    def run(lazy: bool):
        model, closure = make_problem()
        opt = zo.create("ZOSGD", model.parameters(), lazy_update=lazy, **kw("ZOSGD"))
        opt.step(closure)
        model[0].weight.requires_grad_(False)
        opt.step(closure)
        opt.flush()
        return weights(model)

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


def test_replica_check_flushes_first(tmp_path, monkeypatch):
    """check_replicas compares the weights and state the step produced (one-process gloo group)."""
    import torch.distributed as dist

    from zotune.distributed import ProcessGroupComm, replicas

    seen = []
    real = replicas.param_checksum

    def spy(p, state):
        seen.append(opt.has_pending_update)
        return real(p, state)

    monkeypatch.setattr(replicas, "param_checksum", spy)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, closure = make_problem()
        opt = zo.create("ZOSGD", model, lazy_update=True, comm=ProcessGroupComm(check_every=2), **kw("ZOSGD"))
        for _ in range(4):
            opt.step(closure)
        replicas.check_replicas(opt)
    finally:
        dist.destroy_process_group()
    # a one-process group has no replica to compare with: the spy may not run, the flush must
    assert not opt.has_pending_update
    assert not any(seen)


def test_train_loop_flushes_before_evaluation_checkpoints_and_at_the_end(tmp_path, monkeypatch):
    """zotune train runs lazy and never evaluates or saves with an update pending."""
    import zotune.checkpoint as ckpt
    import zotune.tasks as tasks
    from zotune.optim.lazy import _LAZY
    from zotune.testing import tiny_causal_lm, tiny_tokenizer
    from zotune.train import TrainConfig, train

    pending_at = []

    def watch(name, fn):
        def wrapped(*a, **k):
            pending_at.append((name, any(o.has_pending_update for o in list(_LAZY))))
            return fn(*a, **k)
        return wrapped

    import zotune.optim.engine as engine

    built = []  # a strong reference: _LAZY holds the optimizer weakly
    real_register = engine.register_lazy
    monkeypatch.setattr(engine, "register_lazy", lambda o: (built.append(o), real_register(o)))
    monkeypatch.setattr(tasks, "evaluate", watch("evaluate", tasks.evaluate))
    monkeypatch.setattr(ckpt, "save_checkpoint", watch("save_checkpoint", ckpt.save_checkpoint))
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), seed=0)
    config = TrainConfig(task="sst2", steps=4, batch_size=4, max_dev=4, max_test=0, eval_batch_size=4,
                         progress=False, lr=1e-3, eps=1e-2, eval_every=2, save_every=2, eval_before=False,
                         output_dir=str(tmp_path / "run"))
    train(config, model=model, tokenizer=tok)
    lazy = [o for o in built if o.module is model]
    assert lazy and lazy[0].pass_counts["deferred"] == 4  # the loop did run lazily
    assert {n for n, _ in pending_at} == {"evaluate", "save_checkpoint"}
    assert not any(p for _, p in pending_at), pending_at
    assert not lazy[0].has_pending_update  # end of training


def test_train_lazy_update_can_be_turned_off(tmp_path, monkeypatch):
    import functools

    import zotune.optim.engine as engine
    from zotune.testing import tiny_causal_lm, tiny_tokenizer
    from zotune.train import TrainConfig, train

    built = []
    real_init = engine.ZOOptimizer.__init__

    @functools.wraps(real_init)  # keeps the signature: zotune train's option check reads it
    def init(self, *a, **k):
        real_init(self, *a, **k)
        built.append(self)

    monkeypatch.setattr(engine.ZOOptimizer, "__init__", init)
    tok = tiny_tokenizer()
    config = TrainConfig(task="sst2", steps=2, batch_size=4, max_dev=4, max_test=0, eval_batch_size=4,
                         progress=False, lr=1e-3, eps=1e-2, eval_every=0, eval_before=False,
                         optimizer_args={"lazy_update": False}, output_dir=str(tmp_path / "run"))
    train(config, model=tiny_causal_lm("llama", vocab_size=len(tok), seed=0), tokenizer=tok)
    assert built and not built[-1].lazy_update and built[-1].pass_counts["deferred"] == 0


def test_zotrainer_runs_lazy_and_flushes_for_evaluate_save_and_end(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from zotune.integrations import ZOTrainer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]

    def trainer(out, lazy: bool):
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=str(out), learning_rate=1e-3, max_steps=3, per_device_train_batch_size=8,
                                 lr_scheduler_type="linear", report_to=[], use_cpu=True, seed=0, save_strategy="no")
        return ZOTrainer(model=LlamaForCausalLM(cfg), args=args, train_dataset=data, eval_dataset=data[:4],
                         zo_optimizer="zosgd", zo_kwargs={"eps": 1e-3, "lazy_update": lazy})

    eager, lazy = trainer(tmp_path / "e", False), trainer(tmp_path / "l", True)
    eager.train()
    lazy.train()
    opt = lazy.zo_optimizer
    assert opt.pass_counts["deferred"] == 3 and not opt.has_pending_update  # flushed at the end of train()
    assert all(torch.equal(a, b) for a, b in zip(eager.model.parameters(), lazy.model.parameters()))
    # a pending update (as mid-training): evaluate() and save_model() see the updated weights
    for t in (eager, lazy):
        t.zo_optimizer.step(lambda t=t: t.model(input_ids=ids[:4], labels=ids[:4]).loss)
    assert opt.has_pending_update
    assert lazy.evaluate()["eval_loss"] == eager.evaluate()["eval_loss"]
    assert not opt.has_pending_update
    t = lazy
    t.zo_optimizer.step(lambda: t.model(input_ids=ids[:4], labels=ids[:4]).loss)
    eager.zo_optimizer.step(lambda: eager.model(input_ids=ids[:4], labels=ids[:4]).loss)
    lazy.save_model(str(tmp_path / "saved"))
    assert not opt.has_pending_update
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    eager_sd = eager.model.state_dict()
    assert all(torch.equal(saved[k], eager_sd[k]) for k in saved)


def test_replay_of_a_lazy_run_is_bit_identical(tmp_path):
    """zotune train (lazy) records a trajectory; replaying it (lazy too) rebuilds the same weights,
    and an eager replay of the same records agrees bit for bit."""
    from zotune import trajectory as zotraj
    from zotune.testing import tiny_causal_lm, tiny_tokenizer
    from zotune.train import TrainConfig, train

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), seed=0)
    config = TrainConfig(task="sst2", steps=4, batch_size=4, max_dev=4, max_test=0, eval_batch_size=4,
                         progress=False, lr=1e-3, eps=1e-2, eval_every=0, eval_before=False, optimizer="zo-adam",
                         output_dir=str(tmp_path / "run"))
    train(config, model=model, tokenizer=tok)
    header, records = zotraj.read(tmp_path / "run" / zotraj.FILENAME)
    replayed = tiny_causal_lm("llama", vocab_size=len(tok), seed=0)
    zotraj.replay(tmp_path / "run", header, records, replayed)
    eager = tiny_causal_lm("llama", vocab_size=len(tok), seed=0)
    opt = zo.get(header["optimizer"])(eager, **header["optimizer_kwargs"])
    for r in records:
        opt.replay_step(r)
    for (n, a), b, c in zip(model.named_parameters(), replayed.parameters(), eager.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c), n
