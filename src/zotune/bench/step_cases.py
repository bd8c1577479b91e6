"""The rows of ``zotune bench step``: one optimizer with one z distribution, or MeZO's reference code."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zotune.bench._common import resolve_optimizers
from zotune.bench.step_model import NaiveMeZO
from zotune.errors import UserError

REFERENCE = "ZOSGD"  # the baseline of the "vs ZO-SGD" column
NAIVE = "mezo-reference"


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
    #: a lazy row's own closure: it steps its own copy of the model, so that no other row's forward
    #: (which flushes a pending update through the module's hooks) runs on its weights
    closure: Any = field(default=None, repr=False)
    passes: int = 0  # passes over the weights during timed steps (engine counter)
    steps: int = 0

    @property
    def lazy(self) -> bool:
        return bool(self.options.get("lazy_update"))

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


def select_cases(optimizers: list[str] | None, distribution: str | None, naive: bool = True,
                 lazy: str = "reference") -> list[Case]:
    """The rows: every requested optimizer (ZO-SGD always) with its distributions.

    ``lazy``: which ``lazy_capable`` methods also get a ``lazy_update=True`` twin of each row:
    ``"reference"`` (ZO-SGD only), ``"all"`` or ``"none"``.
    """
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
        else:  # the method's own default (FZOO: Rademacher, the paper's), both for ZO-SGD
            dists = ["gaussian", "rademacher"] if name == REFERENCE else [default_distribution(zo.get(name))]
        cls = zo.get(name)
        for d in dists:
            # extra rows with non-default options (the class's ``bench_variants``, e.g. HiZOO's
            # lazy Hessian refresh), timed and measured like the others
            variants = [{}, *cls.bench_variants]
            if getattr(cls, "lazy_capable", False) and (lazy == "all" or (lazy == "reference" and name == REFERENCE)):
                variants += [{**o, "lazy_update": True} for o in variants]
            for options in variants:
                cases.append(Case(name, d, int(getattr(cls, "forwards_per_step", 2)),
                                  tuple(getattr(cls, "state_buffers", ())), str(getattr(cls, "summary", "")),
                                  options=dict(options)))
    return cases


def default_distribution(cls: type) -> str:
    """The z distribution a method's constructor defaults to (``"gaussian"`` unless it says otherwise)."""
    param = inspect.signature(cls.__init__).parameters.get("distribution")
    return "gaussian" if param is None or param.default is inspect.Parameter.empty else str(param.default)


def make_runner(case: Case, model: nn.Module, seed: int = 0) -> Any:
    """Construct the optimizer of a case with its class defaults (or MeZO's reference code)."""
    import zotune.optim as zo

    if case.optimizer == NAIVE:
        return NaiveMeZO(model, seed=seed)
    return zo.create(case.optimizer, model, distribution=case.distribution, seed=seed, **case.options)


def declared_state(runner: Any, case: Case) -> tuple[str, ...]:
    """The instance's ``state_buffers`` (some depend on constructor options)."""
    return tuple(getattr(runner, "state_buffers", case.state_buffers))


def state_bytes(runner: Any) -> int:
    """Bytes of every tensor the optimizer keeps in ``state`` (its fp32 buffers, masters, factors)
    and of the factors it caches between steps (``cached_tensors()``: the low-rank methods' V, U, P)."""
    if not isinstance(runner, torch.optim.Optimizer):
        return 0
    if hasattr(runner, "_prepare"):
        runner._prepare()  # the state exists before the first step
    total = sum(t.numel() * t.element_size() for st in runner.state.values() for t in st.values() if torch.is_tensor(t))
    cached = getattr(runner, "cached_tensors", None)
    total += sum(t.numel() * t.element_size() for t in cached()) if callable(cached) else 0
    shadows = getattr(runner, "_shadows", None) or {}
    return total + sum(t.numel() * t.element_size() for t in shadows.values())
