"""Streaming offload (zotune.offload) on CPU: the "device" is simulated by keeping each block's storage
apart from its compute copy (a ring of separate CPU tensors), so every upload / write-back is a real copy.

Tolerances: the offloaded run must equal the in-memory run bit for bit where no weight is used both below
block 0 and after the last block (an untied LM head); with a tied head the shared matrix takes one more
+2eps / -2eps round trip per step, so weights and losses are compared to 1e-6 relative.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from zotune.models import apply_peft
from zotune.offload import OffloadError, StreamingOffload, offload_refusal
from zotune.optim import HELENE, ZOSGD, HiZOO, ZOAdam, ZOSGDMomentum, ZOSGDSign
from zotune.testing import tiny_causal_lm, tiny_config

ARCHS = ("llama", "opt", "gemma3", "qwen2", "mistral")
STEPS = 3


def _untied_llama(num_layers: int = 2):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", num_layers=num_layers)
    cfg.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).eval()


def _batch(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 200, (3, 9), generator=g)


def _run(model, cls=ZOSGD, offload: bool = False, steps: int = STEPS, lrs=None, **kw):
    opt = cls(model, seed=3, **{"lr": 1e-3, "eps": 1e-3, **kw})
    session = StreamingOffload(model, opt, "cpu", log_events=True) if offload else None
    losses = []
    for t in range(steps):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[t]
        ids = _batch(t)
        losses.append(float(opt.step(lambda ids=ids: model(input_ids=ids, labels=ids).loss)))
    return opt, session, losses


def _compare(a, b, la, lb, exact: bool, opt_a=None, opt_b=None) -> None:
    tol = dict(rtol=0.0, atol=0.0) if exact else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), **tol)
    sa, sb = a.state_dict(), b.state_dict()  # b's state_dict() flushes the pending update first
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    if opt_a is not None:
        for pa, pb in zip(a.parameters(), b.parameters()):
            for key, value in opt_a.state[pa].items():
                if torch.is_tensor(value):
                    torch.testing.assert_close(opt_b.state[pb][key], value, **tol)


@pytest.mark.parametrize("arch", ARCHS)
def test_trajectory_equals_in_memory_run(arch: str) -> None:
    base = tiny_causal_lm(arch, num_layers=3)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    _, _, la = _run(a)
    _, session, lb = _run(b, offload=True)
    assert session.stats["steps"] == STEPS
    _compare(a, b, la, lb, exact=False)


@pytest.mark.parametrize("cls", [ZOSGD, ZOSGDMomentum, ZOSGDSign, ZOAdam, HELENE])
def test_every_supported_optimizer_is_bit_identical_untied(cls) -> None:
    base = _untied_llama(num_layers=3)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    kw = {"weight_decay": 0.1}
    opt_a, _, la = _run(a, cls, lrs=[1e-3, 5e-4, 2e-3], **kw)
    opt_b, _, lb = _run(b, cls, offload=True, lrs=[1e-3, 5e-4, 2e-3], **kw)  # lr changes between steps
    _compare(a, b, la, lb, exact=True, opt_a=opt_a, opt_b=opt_b)


@pytest.mark.parametrize("mode", ["lora", "top:1"])
def test_partial_tuning_streams_frozen_blocks_too(mode: str) -> None:
    base = tiny_causal_lm("llama", num_layers=3)
    a, b = apply_peft(copy.deepcopy(base), mode), apply_peft(copy.deepcopy(base), mode)
    _, _, la = _run(a, lr=1e-2, eps=1e-2)
    _, session, lb = _run(b, offload=True, lr=1e-2, eps=1e-2)
    _compare(a, b, la, lb, exact=False)
    uploads = [w for k, w in session.transport.events if k == "upload"]
    assert uploads[: 3 * STEPS] == [0, 1, 2] * STEPS  # every block, frozen or not, once per step
    # the state_dict() flush streams only the blocks with a pending update (a trainable weight)
    assert uploads[3 * STEPS :] == ([0, 1, 2] if mode == "lora" else [2])


@pytest.mark.parametrize("cls", [ZOSGD, ZOAdam])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_stream_their_fp32_master(cls, dtype) -> None:
    base = tiny_causal_lm("llama", num_layers=3, dtype=dtype)  # tied head: resident weights have masters too
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a, _, la = _run(a, cls, lr=1e-2)
    opt_b, session, lb = _run(b, cls, offload=True, lr=1e-2)
    _compare(a, b, la, lb, exact=True, opt_a=opt_a, opt_b=opt_b)  # masters included (optimizer state)
    assert ("state", "mlp.up_proj.weight", "master") in session.transport.ring[0]


def test_rademacher_and_noise_device() -> None:
    base = _untied_llama()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    _, _, la = _run(a, distribution="rademacher", noise_device="cpu")
    _, _, lb = _run(b, offload=True, distribution="rademacher", noise_device="cpu")
    _compare(a, b, la, lb, exact=True)


def _schedule(events: list, num_blocks: int) -> list[list]:
    """The events of each step (a step starts at the upload of block 0 that precedes a forward)."""
    steps, current = [], None
    for kind, what in events:
        if kind == "upload" and what == 0:
            current = []
            steps.append(current)
        if current is not None:
            current.append((kind, what))
    return [s for s in steps if any(k == "forward" for k, _ in s)]


def test_upload_compute_writeback_order() -> None:
    L = 5
    model = tiny_causal_lm("llama", num_layers=L)
    _, session, _ = _run(model, offload=True, steps=2)
    steps = _schedule(session.transport.events, L)
    assert len(steps) == 2
    for ev in steps:
        at = {e: n for n, e in enumerate(ev)}
        for i in range(L):
            assert [e for e in ev if e == ("upload", i)] == [("upload", i)]  # once per step
            assert [e for e in ev if e == ("writeback", i)] == [("writeback", i)]
            # both streams pass through block i while it is on the device, + first
            up, wb = at[("upload", i)], at[("writeback", i)]
            plus, minus = at[("forward", (i, "+"))], at[("forward", (i, "-"))]
            assert up < plus < at[("forward_end", (i, "+"))] < minus < at[("forward_end", (i, "-"))] < wb
            # perturbed +eps before the + forward, -2eps between, restored before the write-back
            computes = [n for n, e in enumerate(ev) if e[0] == "compute" and e[1][0] == i]
            assert [ev[n][1][1] for n in computes] == [1e-3, -2e-3, 1e-3]
            assert computes[0] < plus and at[("forward_end", (i, "+"))] < computes[1] < minus
            assert at[("forward_end", (i, "-"))] < computes[2] < wb
            if i + 1 < L:  # the next block is queued before this one computes (overlap) ...
                assert at[("upload", i + 1)] < plus
            if 1 <= i < L - 1:  # ... and after the previous block has gone back
                assert at[("writeback", i - 1)] < at[("upload", i + 1)]
        # never more than three blocks on the device
        resident, peak = set(), 0
        for kind, what in ev:
            if kind == "upload":
                resident.add(what)
            elif kind in ("writeback", "release"):
                resident.discard(what)
            peak = max(peak, len(resident))
        assert peak <= 3


def test_device_memory_is_three_blocks() -> None:
    L = 6
    model = tiny_causal_lm("llama", num_layers=L)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    _, session, _ = _run(model, ZOSGDMomentum, offload=True, steps=2)
    t = session.transport
    # blocks i (computing) and i + 1 (uploading); the third ring set holds block i - 1, whose write-back
    # is asynchronous on CUDA (synchronous here, so the host-side count never sees it)
    assert t.peak_resident == 2 and t.ring_size == 3
    # each resident block carries its weights and its momentum: 2 block sizes per ring set
    assert t.ring_bytes == 3 * 2 * block_bytes
    # what never leaves the device: embeddings, final norm, head
    layer_ids = {id(p) for layer in model.model.layers for p in layer.parameters()}
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in layer_ids)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # on the device: resident weights + their momentum + the ring; in memory: every weight + its momentum
    assert 2 * resident + t.ring_bytes < 0.6 * (2 * total)
    # the storage is separate from the compute copies
    ring_ptrs = {b.data_ptr() for s in t.ring for b in s.values()}
    assert not ring_ptrs & {p.data_ptr() for layer in model.model.layers for p in layer.parameters()}
    # one crossing each way per block per step: weights + momentum
    assert t.bytes_up == t.bytes_down == 2 * L * 2 * block_bytes  # 2 steps


def test_update_is_lazy_and_flushed_before_observation() -> None:
    base = _untied_llama()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    _run(a, steps=1)
    before = [p.detach().clone() for p in b.model.layers.parameters()]
    opt, session, _ = _run(b, offload=True, steps=1)
    # the blocks' update is pending: their storage still holds the weights of the step's start
    for p, q, r in zip(b.model.layers.parameters(), before, a.model.layers.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # the +eps/-2eps/+eps round trip: one rounding
        assert (p - r).abs().max() > 1e-5  # the in-memory run has updated them
    assert any(session.pending)
    opt.state_dict()  # an observation point
    assert not any(session.pending)
    for p, q in zip(b.parameters(), a.parameters()):
        assert torch.equal(p, q)
    # an evaluation forward flushes too, and sees the updated weights
    opt2, session2, _ = _run(copy.deepcopy(base), offload=True, steps=1)
    ids = _batch(7)
    with torch.no_grad():
        out = session2.model(input_ids=ids).logits
        ref = a(input_ids=ids).logits
    assert not any(session2.pending)
    assert torch.equal(out, ref)
    session2.close()
    assert "forward" not in session2.layers[0].__dict__ and "_update" not in opt2.__dict__


def test_loading_weights_after_a_step_is_not_undone_by_the_pending_update() -> None:
    model = _untied_llama()
    target = {k: v.clone() for k, v in _untied_llama().state_dict().items()}
    _, session, _ = _run(model, offload=True, steps=1)
    assert any(session.pending)
    model.load_state_dict(target)  # flushes first, then loads
    assert not any(session.pending)
    session.flush()
    for name, value in model.state_dict().items():
        assert torch.equal(value, target[name]), name


def test_exception_inside_a_step_leaves_the_weights() -> None:
    model = _untied_llama(num_layers=3)
    opt, session, _ = _run(model, offload=True, steps=1)
    session.flush()
    start = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def boom(_m, _a):
        calls["n"] += 1
        if calls["n"] == 2:  # the - stream, in block 1: block 0 done, block 1 at -eps
            raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    ids = _batch(1)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    handle.remove()
    session.flush()
    for p, q in zip(model.parameters(), start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # in-place fp32 restore: within one rounding
    assert session.transport.resident == set()
    loss = opt.step(lambda: model(input_ids=ids, labels=ids).loss)  # and the next step runs
    assert math.isfinite(float(loss))


def test_nan_step_is_skipped() -> None:
    model = _untied_llama()
    opt, session, _ = _run(model, offload=True, steps=1)
    session.flush()
    start = [p.detach().clone() for p in model.parameters()]
    ids = _batch(2)
    loss = opt.step(lambda: model(input_ids=ids, labels=ids).loss * float("nan"))
    assert math.isnan(float(loss)) and opt.zo_state["skipped_steps"] == 1
    assert not any(session.pending)
    for p, q in zip(model.parameters(), start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_closure_without_the_model_is_refused() -> None:
    model = _untied_llama()
    opt = ZOSGD(model, lr=1e-3)
    StreamingOffload(model, opt, "cpu")
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(OffloadError, match="end of the closure where the start of a model forward"):
        opt.step(lambda: torch.tensor(1.0))
    for p, q in zip(model.parameters(), start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_refusals() -> None:
    llama = tiny_causal_lm("llama")
    assert offload_refusal(llama, ZOSGD(llama)) is None
    gpt2 = tiny_causal_lm("gpt2")
    assert "block list" in offload_refusal(gpt2, ZOSGD(gpt2))
    assert "HiZOO is not one" in offload_refusal(llama, HiZOO(llama))
    assert "layer_fraction" in offload_refusal(llama, ZOSGD(llama, layer_fraction=0.5))
    assert "exact_restore" in offload_refusal(llama, ZOSGD(llama, exact_restore=True))
    prefix = apply_peft(tiny_causal_lm("llama"), "prefix")
    assert "prefix" in offload_refusal(prefix, ZOSGD(prefix))
    with pytest.raises(ValueError, match="not one of them"):
        StreamingOffload(llama, HiZOO(llama), "cpu")


# ---------------------------------------------------------------------------- zotune train --offload


def _train(tmp_path, name: str, offload: str, **overrides):
    from zotune.testing import tiny_tokenizer
    from zotune.train import TrainConfig, train

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), num_layers=3)
    config = TrainConfig(task="sst2", steps=4, batch_size=4, max_dev=8, max_test=8, eval_batch_size=8,
                         progress=False, lr=1e-3, eps=1e-2, optimizer="zo-adam", eval_every=2, save_every=3,
                         eval_before=False, device="cpu", offload=offload, output_dir=str(tmp_path / name),
                         **overrides)
    return model, train(config, model=model, tokenizer=tok)


def test_train_loop_with_offload_equals_the_plain_run(tmp_path, monkeypatch, capsys) -> None:
    import zotune.config

    monkeypatch.setattr(zotune.config, "offload_device_refusal", lambda device: None)  # simulate on the CPU
    _, plain = _train(tmp_path, "plain", "none")
    model, streamed = _train(tmp_path, "offload", "cpu")
    assert "offload: 3 decoder blocks" in capsys.readouterr().err
    assert "forward" not in model.model.layers[0].__dict__  # the run took its hooks off
    for split in ("dev", "test"):
        for key, value in plain["after"][split].items():
            assert streamed["after"][split][key] == pytest.approx(value, rel=1e-5)
    from safetensors.torch import load_file

    for sub in ("checkpoint", "best"):  # the checkpoint at step 3 and the best weights: flushed first
        a = load_file(str(tmp_path / "plain" / sub / "trainable.safetensors"))
        b = load_file(str(tmp_path / "offload" / sub / "trainable.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("argv", "message"), [
    (["--device", "cpu"], "drop --offload"),
    (["--optimizer", "hizoo"], "not one of them"),
    (["--task", "squad", "--objective", "f1"], "generates text"),
])
def test_cli_offload_refusals_are_one_line(tmp_path, capsys, monkeypatch, argv, message) -> None:
    import zotune.config
    from zotune.cli import main

    if "--device" not in argv:  # get past the device check to the optimizer's
        monkeypatch.setattr(zotune.config, "offload_device_refusal", lambda device: None)
        argv = [*argv, "--device", "cpu", "--model", str(_tiny_dir(tmp_path))]
    code = main(["train", "--offload", "cpu", *argv, "--output-dir", str(tmp_path / "x"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def _tiny_dir(tmp_path):
    from zotune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    path = tmp_path / "tiny"
    tiny_causal_lm("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_gpu_check_offload_measurement_runs_on_the_cpu() -> None:
    """The measurement of the gpu-check's offload section (CUDA only there), on a tiny shape without a cap."""
    from zotune.bench.gpu_sections import offload_run

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128)
    d = offload_run("cpu", shape, 2, 8, 2, None)
    assert d["uploads"] == 3 * 2 + 3 and d["in_memory_fits_under_cap"]
    assert d["max_weight_difference"] == 0.0 and d["max_loss_difference"] == 0.0  # untied: bit-identical
    assert d["offload_tokens_per_s"] > 0 and d["in_memory_tokens_per_s"] > 0


def test_a_closure_with_several_model_forwards() -> None:
    """Each model forward of the closure is one pass of both streams over the blocks (chunked scoring)."""
    base = _untied_llama(num_layers=3)
    a, b = copy.deepcopy(base), copy.deepcopy(base)

    def run(model, offload):
        opt = ZOSGD(model, lr=1e-3, eps=1e-3, seed=3)
        session = StreamingOffload(model, opt, "cpu", log_events=True) if offload else None
        x, y = _batch(0), _batch(1)
        losses = [float(opt.step(lambda: model(input_ids=x, labels=x).loss + model(input_ids=y, labels=y).loss))
                  for _ in range(2)]
        return losses, session

    la, _ = run(a, False)
    lb, session = run(b, True)
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-6, atol=0.0)
    # the embedding takes +2eps / -2eps round trips between the passes (not bit-exact); c = (L+ - L-) / 2eps
    # amplifies that rounding, so the weights agree to 1% of the distance travelled (measured: 1.3e-4)
    for p, q, r in zip(a.state_dict().values(), b.state_dict().values(), base.state_dict().values()):
        assert (q - p).abs().max() <= 1e-2 * (p - r).abs().max()
    uploads = [w for k, w in session.transport.events if k == "upload"]
    assert uploads[:12] == [0, 1, 2] * 4  # 2 steps x 2 passes


def test_forwards_that_differ_between_the_streams_are_refused() -> None:
    import threading

    model = _untied_llama()
    opt = ZOSGD(model, lr=1e-3)
    StreamingOffload(model, opt, "cpu")
    start = [p.detach().clone() for p in model.parameters()]
    ids = _batch(0)

    def closure():
        loss = model(input_ids=ids, labels=ids).loss
        if threading.current_thread().name.endswith("-"):  # the -eps stream runs a second forward
            loss = loss + model(input_ids=ids, labels=ids).loss
        return loss

    with pytest.raises(OffloadError, match="same number of times"):
        opt.step(closure)
    for p, q in zip(model.parameters(), start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
