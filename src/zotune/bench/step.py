"""``zotune bench step``: step time against 2 forwards and peak memory against inference.

On a randomly initialised OPT-shaped causal LM (no weights are downloaded) and a batch of
random token ids, one interleaved run measures

* **F**, the time of one forward pass returning the causal-LM loss (``inference_mode``,
  eval mode, dropout 0);
* the step time of every registered optimizer (Gaussian z; Rademacher for ZO-SGD too, or for
  all with ``--distribution both``), printed as ``step / (forwards_per_step * F)``,
  ``step / 2F`` and relative to ZO-SGD's step with the same distribution;
* the step time of **MeZO's reference code** (:class:`NaiveMeZO`: ``torch.manual_seed``,
  per-parameter ``torch.normal``, out-of-place ``p.data = p.data + s * z * eps``, a separate
  update pass), so the table shows the speed-up over it;
* unless ``--no-passes``: the cost P of one perturbation pass over all parameters (the
  engine's ``_displace`` for each distribution, and MeZO's reference pass), as P/F.

Each round runs every case once in a shuffled order; ratios are per round (against the F
measured in the same round) and the medians over rounds are printed. Every sample also
records how many cores other processes used meanwhile (the "load" columns), because the
machine may be shared: read ratios taken under load > 0.3 cores with care.

Peak memory is measured in a **fresh subprocess per case** (``python -m zotune.bench.step
--memory-case CASE``): it imports torch and transformers, builds the model, resets the
peak RSS (``VmHWM``, by writing 5 to ``/proc/self/clear_refs``), runs 2 forwards (inference)
or 2 optimizer steps, and reports ``VmHWM``. glibc's mmap threshold is pinned at its default
128 KiB there (``MALLOC_MMAP_THRESHOLD_``; ``--malloc-default`` leaves it dynamic), so that freed
large blocks go back to the OS and identical runs give the same peak to ~1 MB (with the dynamic
threshold they scatter by 50-200 MB on opt-125m). The table shows the peak above the
import-only baseline relative to inference's, and the extra memory of each method
(step peak - inference peak) as a multiple of the fp32 parameter bytes, next to the number
of parameter-sized state buffers the method declares.

Example::

    zotune bench step --model-shape opt-125m --batch 16x64 --rounds 3 --json step.json
    zotune bench step --model-shape tiny --rounds 1 --no-memory
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zotune.bench._common import (
    DASH,
    find_optimizer,
    fmt,
    machine_info,
    markdown_table,
    measure_other_load,
    median,
    module_main,
    resolve_optimizers,
    timed,
    wait_quiet,
    write_json,
)
from zotune.errors import UserError

DESCRIPTION = __doc__.split("\n\n")[0]

#: OPTConfig arguments per model shape (random init, dropout 0).
SHAPES: dict[str, dict[str, int]] = {
    # facebook/opt-125m: 125,239,296 parameters (tied embeddings), 477.75 MiB fp32
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                     word_embed_proj_dim=768, vocab_size=50272, max_position_embeddings=2048),
    # a few hundred thousand parameters: a whole benchmark round takes well under a second
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                 word_embed_proj_dim=64, vocab_size=1024, max_position_embeddings=512),
}
REFERENCE = "ZOSGD"  # the baseline of the "vs ZO-SGD" column
NAIVE = "mezo-reference"
MEMORY_MARK = "ZOTUNE_MEMORY "
CLEAN_LOAD = 0.3  # foreign cores above which a sample counts as contended
MMAP_THRESHOLD = 128 * 1024  # glibc's default M_MMAP_THRESHOLD, pinned in the memory subprocesses

#: (what, value key, limit, case key) -- the targets of the performance issues (opt-125m, 16x64)
TARGETS: list[tuple[str, str, float, str]] = [
    ("ZO-SGD Gaussian step / 2F", "step_over_2F", 1.4, "ZOSGD/gaussian"),
    ("ZO-SGD Rademacher step / 2F", "step_over_2F", 1.15, "ZOSGD/rademacher"),
    ("ZO-SGD Gaussian peak / inference peak", "peak_over_inference", 1.02, "ZOSGD/gaussian"),
    ("HiZOO step / ZO-SGD step", "vs_reference", 1.35, "HiZOO/gaussian"),
    ("HiZOO hessian_every=2 step / ZO-SGD step", "vs_reference", 1.35, "HiZOO[hessian_every=2]/gaussian"),
    ("HiZOO optimizer state (x params, exact)", "state_params", 1.0, "HiZOO/gaussian"),
    ("HiZOO extra memory (x params)", "extra_params", 1.0, "HiZOO/gaussian"),
    ("HiZOO-L extra memory (x params)", "extra_params", 0.05, "HiZOOLowRank/gaussian"),
]


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="opt-125m",
                        help="OPT shape to build with random weights (default: opt-125m)")
    parser.add_argument("--batch", default="16x64", metavar="BxS",
                        help="batch size x sequence length of random token ids (default: 16x64)")
    parser.add_argument("--optimizers", nargs="+", metavar="NAME", default=None,
                        help="optimizer names or aliases (default: every registered one); "
                             f"{REFERENCE} is always timed as the reference")
    parser.add_argument("--distribution", choices=("gaussian", "rademacher", "both"), default=None,
                        help="z distribution of every method (default: Gaussian, plus Rademacher for ZO-SGD)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write every figure to this JSON file")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-reps", type=int, default=1,
                        help="fresh processes per memory case; the median peak is used (default: 1)")
    parser.add_argument("--memory-jobs", type=int, default=1,
                        help="memory subprocesses run at once (peaks are per process, so this is safe; "
                             "default: 1)")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's dynamic mmap threshold in the memory subprocesses (by default it "
                             "is pinned at 128 KiB via MALLOC_MMAP_THRESHOLD_ so that peaks are reproducible)")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure only peak memory (no timing; memory does not depend on the load)")
    parser.add_argument("--no-passes", action="store_true", help="skip timing single perturbation passes")
    parser.add_argument("--no-naive", action="store_true", help="skip MeZO's reference code")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                        help=f"before each round wait up to this long for other processes to use < "
                             f"{CLEAN_LOAD} cores (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, batch and shuffles")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-steps", type=int, default=2, help=argparse.SUPPRESS)


def parse_batch(text: str) -> tuple[int, int]:
    """``"16x64"`` -> ``(16, 64)``."""
    try:
        b, s = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--batch must look like 16x64 (batch x sequence length), got {text!r}") from None
    if b < 1 or s < 1:
        raise UserError(f"--batch sizes must be positive, got {text!r}")
    return b, s


# ---------------------------------------------------------------------- model and batch
def build_model(shape: str, seed: int = 0) -> nn.Module:
    """A randomly initialised OPT causal LM of the given shape, fp32, eval mode, dropout 0."""
    from transformers import OPTConfig, OPTForCausalLM

    if shape not in SHAPES:
        raise UserError(f"unknown model shape {shape!r}; choose one of {sorted(SHAPES)}")
    torch.manual_seed(seed)
    config = OPTConfig(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                       **SHAPES[shape])
    model = OPTForCausalLM(config).float()
    model.eval()
    return model


def make_batch(vocab_size: int, batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids (labels = inputs: the causal-LM loss)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_closure(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The closure every optimizer gets: one forward in inference mode returning the loss."""

    def closure() -> torch.Tensor:
        with torch.inference_mode():
            return model(**batch).loss

    return closure


def param_count(model: nn.Module) -> int:
    """Trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------- MeZO's reference code
class NaiveMeZO:
    """MeZO's reference step as ``princeton-nlp/MeZO`` (``large_models/trainer.py``) does it.

    One ``torch.manual_seed(seed)`` per pass, then for every trainable parameter
    ``z = torch.normal(0, 1, size=p.shape)`` and ``p.data = p.data + s * z * eps`` (out of
    place); +1, forward, -2, forward, +1; then a separate update pass that regenerates z and
    does ``p.data = p.data - lr * (g * z + wd * p.data)`` (no decay for biases/layer norms).
    Four full Gaussian generations and four parameter-sized temporaries per parameter per
    step: the baseline the engine is compared with.
    """

    forwards_per_step = 2
    state_buffers: tuple[str, ...] = ()
    summary = "MeZO reference code: torch.manual_seed + per-parameter torch.normal, out of place"

    def __init__(self, model: nn.Module, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.rng = np.random.RandomState(seed)
        self.zo_random_seed = 0

    def perturb(self, scaling_factor: float) -> None:
        torch.manual_seed(self.zo_random_seed)
        for _, param in self.named:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.eps

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        self.zo_random_seed = int(self.rng.randint(1000000000))
        self.perturb(1)
        loss1 = closure().detach()
        self.perturb(-2)
        loss2 = closure().detach()
        projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
        self.perturb(1)
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - self.lr * (projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (projected_grad * z)
        return float(loss1)


# ---------------------------------------------------------------------- cases
@dataclass
class Case:
    """One row of the table: an optimizer with a distribution, or MeZO's reference code."""

    optimizer: str  # registered class name, or NAIVE
    distribution: str = "gaussian"
    forwards_per_step: float = 2
    state_buffers: tuple[str, ...] = ()
    summary: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # constructor options of a variant row
    error: str | None = None
    runner: Any = field(default=None, repr=False)  # the optimizer / NaiveMeZO instance

    @property
    def name(self) -> str:
        """``HiZOO`` or, for a variant, ``HiZOO[hessian_every=2]``."""
        if not self.options:
            return self.optimizer
        return f"{self.optimizer}[{','.join(f'{k}={v}' for k, v in sorted(self.options.items()))}]"

    @property
    def key(self) -> str:
        return NAIVE if self.optimizer == NAIVE else f"{self.name}/{self.distribution}"

    @property
    def memory_case(self) -> str:
        if self.optimizer == NAIVE:
            return NAIVE
        return f"opt:{self.optimizer}:{self.distribution}" + (f":{json.dumps(self.options)}" if self.options else "")

    @classmethod
    def from_memory_case(cls, case: str) -> Case:
        if case == NAIVE:
            return cls(NAIVE)
        if not case.startswith("opt:"):
            raise UserError(f"unknown memory case {case!r}")
        _, name, dist, *options = case.split(":", 3)
        return cls(name, dist, options=json.loads(options[0]) if options else {})


def select_cases(optimizers: list[str] | None, distribution: str | None, naive: bool = True) -> list[Case]:
    """The rows: every requested optimizer (ZO-SGD always) with its distributions."""
    import zotune.optim as zo

    names = resolve_optimizers(optimizers)
    if REFERENCE in zo.available() and REFERENCE not in names:
        names = [REFERENCE, *names]
    cases = [Case(NAIVE, "gaussian", NaiveMeZO.forwards_per_step, (), NaiveMeZO.summary)] if naive else []
    for name in names:
        if distribution == "both":
            dists = ["gaussian", "rademacher"]
        elif distribution in ("gaussian", "rademacher"):
            dists = [distribution]
        else:
            dists = ["gaussian", "rademacher"] if name == REFERENCE else ["gaussian"]
        cls = zo.get(name)
        for d in dists:
            # extra rows with non-default options (the class's ``bench_variants``, e.g. HiZOO's
            # lazy Hessian refresh), timed and measured like the others
            for options in [{}, *cls.bench_variants]:
                cases.append(Case(name, d, int(getattr(cls, "forwards_per_step", 2)),
                                  tuple(getattr(cls, "state_buffers", ())), str(getattr(cls, "summary", "")),
                                  options=dict(options)))
    return cases


def make_runner(case: Case, model: nn.Module, seed: int = 0) -> Any:
    """Construct the optimizer of a case with its class defaults (or MeZO's reference code)."""
    import zotune.optim as zo

    if case.optimizer == NAIVE:
        return NaiveMeZO(model, seed=seed)
    return zo.create(case.optimizer, model, distribution=case.distribution, seed=seed, **case.options)


def _declared_state(runner: Any, case: Case) -> tuple[str, ...]:
    """The instance's ``state_buffers`` (some depend on constructor options)."""
    return tuple(getattr(runner, "state_buffers", case.state_buffers))


def state_bytes(runner: Any) -> int:
    """Bytes of every tensor the optimizer keeps in ``state`` (its fp32 buffers, masters, factors)."""
    if not isinstance(runner, torch.optim.Optimizer):
        return 0
    if hasattr(runner, "_prepare"):
        runner._prepare()  # the state exists before the first step
    total = sum(t.numel() * t.element_size() for st in runner.state.values() for t in st.values() if torch.is_tensor(t))
    shadows = getattr(runner, "_shadows", None) or {}
    return total + sum(t.numel() * t.element_size() for t in shadows.values())


# ---------------------------------------------------------------------- timing
def _pass_fn(case: Case, sign: float) -> Callable[[], None]:
    """One perturbation pass over all parameters, by ``sign * eps`` along the same z."""
    runner = case.runner
    if case.optimizer == NAIVE:

        def naive_pass() -> None:
            runner.zo_random_seed = 123456789  # the +1 and -1 passes must draw the same z
            with torch.no_grad():
                runner.perturb(sign)

        return naive_pass

    def engine_pass() -> None:
        runner._prepare()
        runner._pending = {}
        with torch.no_grad():
            runner._displace(123456789, sign * runner.eps)
        runner._pending = {}

    return engine_pass


def time_cases(model: nn.Module, closure: Callable[[], torch.Tensor], cases: list[Case], *, rounds: int,
               passes: bool = True, quiet_wait: float = 0.0, seed: int = 0,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Interleaved timing of F, every case's step and (optionally) single passes.

    Returns ``{"forward": {...}, "cases": {key: {...}}, "passes": {key: {...}}, "rounds": [...]}``
    with per-round samples ``(seconds, foreign cores)`` and median per-round ratios.
    """
    runnable = [c for c in cases if c.error is None]
    pass_cases = []
    if passes:
        for c in runnable:
            if c.optimizer == NAIVE or (c.optimizer == REFERENCE):
                pass_cases.append(c)

    # warm-up: allocate state, spin up worker pools, touch every code path once
    closure()
    for c in runnable:
        try:
            c.runner.step(closure)
        except Exception as e:  # a method that cannot run here is reported, not fatal
            c.error = f"step failed: {type(e).__name__}: {e}"
            log(f"  {c.key}: {c.error}")
    runnable = [c for c in runnable if c.error is None]
    pass_cases = [c for c in pass_cases if c.error is None]

    tasks: list[tuple[str, str, Callable[[], Any]]] = [("forward", "F", closure), ("forward", "F", closure)]
    tasks += [("step", c.key, (lambda c=c: c.runner.step(closure))) for c in runnable]
    for c in pass_cases:
        tasks += [("pass", c.key, _pass_fn(c, +1.0)), ("pass", c.key, _pass_fn(c, -1.0))]

    samples: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}
    round_info = []
    for r in range(rounds):
        waited, load = wait_quiet(CLEAN_LOAD, quiet_wait) if quiet_wait > 0 else (0.0, measure_other_load(0.2))
        order = list(tasks)
        random.Random(seed * 1000 + r).shuffle(order)
        t0 = time.perf_counter()
        for kind, key, fn in order:
            samples.setdefault((kind, key), [[] for _ in range(rounds)])[r].append(timed(fn))
        round_info.append({"round": r, "seconds": time.perf_counter() - t0, "waited_s": waited,
                           "load_before": load})
        log(f"  round {r + 1}/{rounds}: {time.perf_counter() - t0:.1f} s (other load before: {load:.2f} cores)")

    def per_round_mean(kind: str, key: str) -> list[float]:
        return [sum(w for w, _ in s) / len(s) if s else float("nan") for s in samples[(kind, key)]]

    def loads(kind: str, key: str) -> list[float]:
        return [o for s in samples[(kind, key)] for _, o in s]

    def round_load(kind: str, key: str) -> list[float]:
        return [max((o for _, o in s), default=float("nan")) for s in samples[(kind, key)]]

    f_clean = [x < CLEAN_LOAD for x in round_load("forward", "F")]

    def clean_rounds(kind: str, key: str) -> list[int]:
        """Rounds in which this task's samples and the forwards ran uncontended."""
        return [r for r, x in enumerate(round_load(kind, key)) if f_clean[r] and x < CLEAN_LOAD]

    def used_rounds(kind: str, key: str) -> list[int]:
        """The clean rounds if there are at least two (or all rounds are clean), else all rounds."""
        clean = clean_rounds(kind, key)
        return clean if len(clean) >= min(2, rounds) else list(range(rounds))

    f_rounds = per_round_mean("forward", "F")
    out: dict[str, Any] = {
        "forward": {"median_s": median(f_rounds), "per_round_s": f_rounds,
                    "other_load_median": median(loads("forward", "F")),
                    "clean_rounds": sum(f_clean)},
        "cases": {}, "passes": {}, "rounds": round_info, "clean_load": CLEAN_LOAD,
    }
    step_rounds = {c.key: per_round_mean("step", c.key) for c in runnable}
    for c in runnable:
        s = step_rounds[c.key]
        idx = used_rounds("step", c.key)
        ref_key = f"{REFERENCE}/{c.distribution}" if c.optimizer != NAIVE else f"{REFERENCE}/gaussian"
        ref = step_rounds.get(ref_key)
        naive = step_rounds.get(NAIVE)
        out["cases"][c.key] = {
            "step_s": median(s[r] for r in idx),
            "per_round_s": s,
            "step_over_kF": median(s[r] / (c.forwards_per_step * f_rounds[r]) for r in idx),
            "step_over_2F": median(s[r] / (2 * f_rounds[r]) for r in idx),
            "vs_reference": median(s[r] / ref[r] for r in idx) if ref else None,
            "speedup_vs_naive": median(naive[r] / s[r] for r in idx) if naive else None,
            "other_load_median": median(loads("step", c.key)),
            "other_load_max": max(loads("step", c.key), default=float("nan")),
            "clean_rounds": len(clean_rounds("step", c.key)),
            "rounds_used": idx,
        }
    for c in pass_cases:
        p = per_round_mean("pass", c.key)
        idx = used_rounds("pass", c.key)
        out["passes"][c.key] = {
            "pass_s": median(p[r] for r in idx), "per_round_s": p,
            "pass_over_F": median(p[r] / f_rounds[r] for r in idx),
            "ns_per_param": median(p[r] for r in idx) * 1e9 / param_count(model),
            "other_load_median": median(loads("pass", c.key)),
            "clean_rounds": len(clean_rounds("pass", c.key)),
            "rounds_used": idx,
        }
    return out


# ---------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _reset_peak() -> bool:
    """Return freed heap to the OS and reset VmHWM to the current RSS (Linux >= 4.0)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_case(case: str, shape: str, batch: int, seq: int, steps: int = 2, seed: int = 0) -> dict[str, Any]:
    """Measure one memory case in *this* process (meant for a fresh subprocess).

    ``case``: ``"import"`` (torch, transformers' OPT classes and zotune imported, nothing built),
    ``"inference"`` (``steps`` forwards), ``NAIVE`` or ``"opt:NAME:DISTRIBUTION"`` (``steps``
    optimizer steps). The model is built before the peak is reset, so its one-off
    initialisation transient is not counted.
    """
    from transformers import OPTConfig, OPTForCausalLM  # noqa: F401  (the import baseline: model code too)

    import zotune.optim  # noqa: F401

    out: dict[str, Any] = {"case": case, "rss_after_import_mb": _status_kb("VmRSS") / 1024}
    if case == "import":
        out["peak_mb"] = _status_kb("VmHWM") / 1024
        return out
    model = build_model(shape, seed)
    batch_t = make_batch(model.config.vocab_size, batch, seq, seed + 1)
    closure = make_closure(model, batch_t)
    out["params"] = param_count(model)
    out["rss_after_model_mb"] = _status_kb("VmRSS") / 1024
    out["peak_reset"] = _reset_peak()
    if case == "inference":
        for _ in range(steps):
            closure()
    else:
        runner = make_runner(Case.from_memory_case(case), model, seed)
        for _ in range(steps):
            runner.step(closure)
        out["state_bytes"] = state_bytes(runner)
    out["peak_mb"] = _status_kb("VmHWM") / 1024
    return out


def run_memory_subprocess(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`memory_case` in a fresh interpreter and return its report."""
    import zotune

    src = str(Path(zotune.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not getattr(args, "malloc_default", False):
        # pin glibc's mmap threshold at its default 128 KiB: with the dynamic threshold, freed large
        # blocks stay in the heap and identical runs' peaks scatter by 50-200 MB (opt-125m)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    cmd = [sys.executable, "-m", "zotune.bench.step", "--memory-case", case, "--model-shape", args.model_shape,
           "--batch", args.batch, "--threads", str(args.threads), "--seed", str(args.seed),
           "--memory-steps", str(args.memory_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MEMORY_MARK):
            return json.loads(line[len(MEMORY_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"case": case, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def measure_memory(cases: list[Case], args: argparse.Namespace, param_bytes: int,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Peak memory of the import baseline, inference and every case (fresh processes)."""
    reps = max(1, int(args.memory_reps))

    def peak(case: str) -> dict[str, Any]:
        reports = [run_memory_subprocess(case, args) for _ in range(reps)]
        good = [r for r in reports if "peak_mb" in r]
        if not good:
            return {"error": reports[-1].get("error", "no report")}
        return {"peak_mb": median(r["peak_mb"] for r in good), "peaks_mb": [r["peak_mb"] for r in good],
                "peak_reset": all(r.get("peak_reset", True) for r in good),
                **({"state_bytes": good[0]["state_bytes"]} if "state_bytes" in good[0] else {})}

    t0 = time.perf_counter()
    todo = [c for c in cases if c.error is None]
    names = ["import", "inference", *(c.memory_case for c in todo)]
    reports: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max(1, int(getattr(args, "memory_jobs", 1)))) as pool:
        for name, report in zip(names, pool.map(peak, names)):
            reports[name] = report
            log(f"  memory: {name}: peak {fmt(report.get('peak_mb'), '.0f')} MB"
                + (f" ({report['error']})" if "error" in report else ""))
    base, inference = reports["import"], reports["inference"]
    out: dict[str, Any] = {"import": base, "inference": inference, "cases": {}, "param_mb": param_bytes / 2**20}
    for c in todo:
        r = reports[c.memory_case]
        if "peak_mb" in r and "peak_mb" in base and "peak_mb" in inference:
            above_inf = inference["peak_mb"] - base["peak_mb"]
            r["peak_over_inference"] = (r["peak_mb"] - base["peak_mb"]) / above_inf if above_inf > 0 else None
            r["extra_mb"] = r["peak_mb"] - inference["peak_mb"]
            r["extra_params"] = r["extra_mb"] * 2**20 / param_bytes
            if "state_bytes" in r:  # exact, from the optimizer's tensors; the rest is engine/allocator overhead
                r["state_params"] = r["state_bytes"] / param_bytes
                r["overhead_mb"] = r["extra_mb"] - r["state_bytes"] / 2**20
        out["cases"][c.key] = r
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------- report
def evaluate_targets(rows: dict[str, dict[str, Any]], applies: bool = True) -> list[dict[str, Any]]:
    """The issue's targets against the measured rows.

    ``met`` is ``None`` where a value was not measured or the targets do not apply (they are
    defined for the opt-125m shape at batch 16x64).
    """
    out = []
    for what, key, limit, case_key in TARGETS:
        name, _, variant = case_key.split("/")[0].partition("[")
        cls_name = find_optimizer(name)
        row = rows.get(f"{cls_name}{'[' + variant if variant else ''}/{case_key.split('/')[1]}") if cls_name else None
        value = row.get(key) if row else None
        out.append({"target": what, "limit": limit, "value": value, "applies": applies,
                    "met": None if value is None or not applies else bool(value <= limit)})
    return out


def format_report(result: dict[str, Any]) -> str:
    """The readable tables printed at the end of a run."""
    cfg, timing = result["config"], result["timing"]
    mem = result.get("memory") or {}
    f = timing["forward"]["median_s"]
    lines = [
        f"zotune bench step: {cfg['model_shape']} ({cfg['params']:,} parameters, "
        f"{cfg['param_bytes'] / 2**20:.1f} MiB fp32), batch {cfg['batch']}x{cfg['seq']}, "
        f"{cfg['threads']} threads, {cfg['rounds']} rounds",
        f"{result['machine']['cpu']}, torch {result['machine']['torch']}",
        f"F (one forward) = {fmt(f, '.3f')} s (median of rounds; other processes used "
        f"{fmt(timing['forward']['other_load_median'], '.2f')} cores during forwards; "
        f"{timing['forward'].get('clean_rounds', 0)}/{cfg['rounds']} rounds clean)",
        "",
    ]
    headers = ["method", "z", "fwd", "state", "step s", "step/kF", "step/2F", "vs ZO-SGD",
               "x faster than MeZO ref", "peak/inf", "extra xP", "state xP", "overhead MB", "load", "clean"]
    rows = []
    for row in result["rows"]:
        t = row.get("timing") or {}
        m = row.get("memory") or {}
        name = row.get("name", row["optimizer"])
        if row.get("error") and not t:
            rows.append([name, row["distribution"][:5], fmt(row["forwards_per_step"], "g"),
                         len(row["state_buffers"]), "skipped: " + row["error"][:60], *([DASH] * 10)])
            continue
        rows.append([
            name, row["distribution"][:5], fmt(row["forwards_per_step"], "g"), len(row["state_buffers"]),
            fmt(t.get("step_s"), ".2f"), fmt(t.get("step_over_kF"), ".2f", "x"),
            fmt(t.get("step_over_2F"), ".2f", "x"), fmt(t.get("vs_reference"), ".2f", "x"),
            fmt(t.get("speedup_vs_naive"), ".2f", "x"), fmt(m.get("peak_over_inference"), ".3f", "x"),
            fmt(m.get("extra_params"), ".3f"), fmt(m.get("state_params"), ".3f"), fmt(m.get("overhead_mb"), ".1f"),
            fmt(t.get("other_load_median"), ".2f"), f"{t.get('clean_rounds', 0)}/{cfg['rounds']}",
        ])
    lines.append(markdown_table(headers, rows))
    lines += [
        "",
        "fwd: forwards per step (k); state: parameter-sized buffers the method declares; step/kF and "
        "step/2F: step time over k or 2 forwards of the same round; vs ZO-SGD: step time over ZO-SGD's "
        "(same z); peak/inf: peak RSS above the import baseline over inference's; extra xP: (step peak - "
        "inference peak) / fp32 parameter bytes; state xP: bytes of the optimizer's state tensors / parameter "
        "bytes (exact); overhead MB: extra memory beyond that state (noise buffers, block temporaries, "
        "allocator); load: cores other processes used meanwhile (median); "
        f"clean: rounds in which the step and the forwards ran with other load < {CLEAN_LOAD} cores (ratios "
        "use only those when there are at least two).",
    ]
    if timing.get("passes"):
        lines += ["", "One perturbation pass over all parameters (P):", ""]
        lines.append(markdown_table(
            ["pass", "P s", "P/F", "ns/param", "load", "clean"],
            [[k, fmt(v["pass_s"], ".3f"), fmt(v["pass_over_F"], ".3f"), fmt(v["ns_per_param"], ".2f"),
              fmt(v["other_load_median"], ".2f"), f"{v.get('clean_rounds', 0)}/{cfg['rounds']}"]
             for k, v in timing["passes"].items()]))
    if mem:
        base, inf = mem["import"].get("peak_mb"), mem["inference"].get("peak_mb")
        lines += ["", f"Peak RSS: import baseline (torch, transformers' OPT, zotune) {fmt(base, '.0f')} MB, inference "
                      f"{fmt(inf, '.0f')} MB ({fmt(None if base is None or inf is None else inf - base, '.0f')} "
                      f"MB above import); parameters {mem['param_mb']:.1f} MiB"]
    applies = all(t.get("applies", True) for t in result["targets"])
    lines += ["", "Targets (issue; defined for opt-125m at 16x64" + ("" if applies else ": not applicable here") + "):",
              ""]
    lines.append(markdown_table(
        ["target", "limit", "measured", "met"],
        [[t["target"], f"{t['limit']:g}", fmt(t["value"], ".3f"),
          ("n/a" if not t.get("applies", True) else DASH) if t["met"] is None else ("yes" if t["met"] else "no")]
         for t in result["targets"]]))
    passes = timing.get("passes", {}).get(f"{REFERENCE}/gaussian")
    if passes and f == f:
        p = passes["pass_s"]
        lines += ["", f"Floor of a 3-forward method with ZO-SGD's three passes: (3F + 3P) / (2F + 3P) = "
                      f"{(3 * f + 3 * p) / (2 * f + 3 * p):.2f}x ZO-SGD's step (F = {f:.3f} s, Gaussian P = {p:.3f} s)"]
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole benchmark and return the result dictionary (also written by ``--json``)."""
    batch, seq = parse_batch(args.batch)
    torch.set_num_threads(max(1, int(args.threads)))
    if args.rounds < 1:
        raise UserError("--rounds must be >= 1")
    if args.memory_only and args.no_memory:
        raise UserError("--memory-only and --no-memory exclude each other")
    cases = select_cases(args.optimizers, args.distribution, naive=not args.no_naive)
    model = build_model(args.model_shape, args.seed)
    batch_t = make_batch(model.config.vocab_size, batch, seq, args.seed + 1)
    closure = make_closure(model, batch_t)
    n = param_count(model)
    log(f"zotune bench step: {args.model_shape}, {n:,} parameters, batch {batch}x{seq}, "
        f"{torch.get_num_threads()} threads; cases: {', '.join(c.key for c in cases)}")
    for c in cases:
        try:
            c.runner = make_runner(c, model, args.seed)
            c.state_buffers = _declared_state(c.runner, c)
            c.forwards_per_step = getattr(c.runner, "forwards_per_step", c.forwards_per_step)  # options may change it
        except Exception as e:  # e.g. a method that needs arguments the benchmark does not know
            c.error = f"construction failed: {type(e).__name__}: {e}"
            log(f"  {c.key}: {c.error}")
    if args.memory_only:
        timing: dict[str, Any] = {"forward": {"median_s": float("nan"), "other_load_median": float("nan")},
                                  "cases": {}, "passes": {}, "rounds": []}
    else:
        timing = time_cases(model, closure, cases, rounds=args.rounds, passes=not args.no_passes,
                            quiet_wait=args.quiet_wait, seed=args.seed, log=log)
    for c in cases:
        c.runner = None  # free optimizer state before the memory subprocesses
    gc.collect()
    memory = None if args.no_memory else measure_memory(cases, args, 4 * n, log=log)
    rows = []
    flat: dict[str, dict[str, Any]] = {}
    for c in cases:
        t = timing["cases"].get(c.key)
        m = (memory or {}).get("cases", {}).get(c.key) if memory else None
        rows.append({"key": c.key, "name": c.name, "optimizer": c.optimizer, "options": c.options,
                     "distribution": c.distribution,
                     "forwards_per_step": c.forwards_per_step, "state_buffers": list(c.state_buffers),
                     "summary": c.summary, "error": c.error, "timing": t, "memory": m})
        flat[c.key] = {**(t or {}), **(m or {})}
    result = {
        "benchmark": "step",
        "argv": list(sys.argv),
        "machine": machine_info(),
        "config": {"model_shape": args.model_shape, "batch": batch, "seq": seq, "threads": torch.get_num_threads(),
                   "rounds": args.rounds, "params": n, "param_bytes": 4 * n, "seed": args.seed,
                   "attn_implementation": getattr(model.config, "_attn_implementation", None),
                   "memory_steps": args.memory_steps, "memory_reps": args.memory_reps,
                   "malloc_mmap_threshold": None if args.malloc_default else MMAP_THRESHOLD},
        "timing": timing,
        "memory": memory,
        "rows": rows,
        "targets": evaluate_targets(flat, applies=(args.model_shape, batch, seq) == ("opt-125m", 16, 64)),
    }
    return result


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zotune bench step`` (and of the memory subprocesses)."""
    if getattr(args, "memory_case", None):
        torch.set_num_threads(max(1, int(args.threads)))
        batch, seq = parse_batch(args.batch)
        report = memory_case(args.memory_case, args.model_shape, batch, seq, args.memory_steps, args.seed)
        print(MEMORY_MARK + json.dumps(report), flush=True)
        return 0
    result = run_benchmark(args)
    print()
    print(format_report(result))
    if args.json:
        path = write_json(args.json, result)
        print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m zotune.bench.step ...`` (same options as ``zotune bench step``)."""
    return module_main("step", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
