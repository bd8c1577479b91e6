"""Slow, obviously correct reference implementations (test oracles).

Each reference materialises the full direction z of every parameter (with the same noise
contract as the fast engine, :func:`zotune.optim.noise.full_noise`), evaluates losses at
explicitly constructed points ``theta + offset`` (restoring theta from a saved copy), and
applies the update rule with plain tensor math, exactly as the paper (or docs/methods.md,
where the code departs from it) writes it. The fast optimizers are tested against these
step by step; each optimizer class names its oracle in its ``reference`` attribute
(:func:`oracle_for`).

They support one parameter group of fp32 tensors, which is all the tests need.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch

from zotune.optim.layers import layer_subset
from zotune.optim.noise import DEFAULT_BLOCK_SIZE, full_noise, mix_seed

Closure = Callable[[], torch.Tensor | float]


def _clone_state(state: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


class ReferenceZO:
    """Common machinery: z by (seed, step, sample), loss at theta + offset."""

    def __init__(self, params: Sequence[torch.Tensor], *, eps: float = 1e-3, seed: int = 0,
                 distribution: str = "gaussian", block_size: int = DEFAULT_BLOCK_SIZE,
                 layer_fraction: float = 1.0, layer_schedule: str = "random", units: Sequence[int] | None = None,
                 **hp: float):
        self.params = list(params)
        self.eps, self.seed, self.distribution, self.block_size = eps, seed, distribution, block_size
        self.hp = hp
        self.step_count = 0
        self.updates = 0
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]
        # layer sampling: units[k] is the layer of parameter k (default: one layer per tensor)
        self.layer_fraction, self.layer_schedule = layer_fraction, layer_schedule
        self.units = list(units) if units is not None else list(range(len(self.params)))
        self.frozen: set[int] = set()  # parameters outside this step's layer subset

    def noise(self, sample: int = 0, stream: int = 0) -> list[torch.Tensor]:
        s = mix_seed(self.seed, self.step_count, sample)
        return [
            full_noise(s, k, p.shape, block_size=self.block_size, distribution=self.distribution,
                       stream=stream, device=p.device).to(p.dtype)
            for k, p in enumerate(self.params)
        ]

    @torch.no_grad()
    def loss_at(self, closure: Closure, offsets: Sequence[torch.Tensor] | None) -> float:
        saved = [p.detach().clone() for p in self.params]
        try:
            if offsets is not None:
                for k, (p, o) in enumerate(zip(self.params, offsets)):
                    if k not in self.frozen:  # layers outside the subset are not perturbed
                        p.add_(o)
            loss = closure()
            return float(loss.detach().float().mean()) if torch.is_tensor(loss) else float(loss)
        finally:
            for p, s in zip(self.params, saved):
                p.copy_(s)

    def decay(self) -> None:
        wd, lr = self.hp.get("weight_decay", 0.0), self.hp["lr"]
        if wd:
            for p in self.params:
                p.mul_(1.0 - lr * wd)

    @torch.no_grad()
    def step(self, closure: Closure) -> None:
        """One step; with ``layer_fraction < 1`` the layers outside the step's subset, and their
        state, are put back exactly as they were (the step never touched them)."""
        chosen = layer_subset(self.seed, self.step_count, max(self.units) + 1, self.layer_fraction,
                              self.layer_schedule)
        self.frozen = {k for k, unit in enumerate(self.units) if unit not in chosen}
        kept = {k: (self.params[k].detach().clone(), _clone_state(self.state[k])) for k in self.frozen}
        self._step(closure)
        for k, (value, state) in kept.items():
            self.params[k].copy_(value)
            self.state[k] = state
        self.step_count += 1
        self.updates += 1

    def _step(self, closure: Closure) -> None:
        raise NotImplementedError

    def spsa(self, closure: Closure, directions: list[torch.Tensor]) -> float:
        eps = self.eps
        plus = self.loss_at(closure, [eps * u for u in directions])
        minus = self.loss_at(closure, [-eps * u for u in directions])
        return (plus - minus) / (2 * eps)


class RefZOSGD(ReferenceZO):
    def _step(self, closure: Closure) -> None:
        z = self.noise()
        c = self.spsa(closure, z)
        self.decay()
        for p, zk in zip(self.params, z):
            p.sub_(self.hp["lr"] * c * zk)


class RefZOSGDMomentum(ReferenceZO):
    def _step(self, closure: Closure) -> None:
        z = self.noise()
        c = self.spsa(closure, z)
        self.decay()
        for p, st, zk in zip(self.params, self.state, z):
            m = st.setdefault("momentum", torch.zeros_like(p))
            st["momentum"] = self.hp["momentum"] * m + c * zk
            p.sub_(self.hp["lr"] * st["momentum"])


class RefZOSGDConservative(ReferenceZO):
    def _step(self, closure: Closure) -> None:
        z = self.noise()
        base = self.loss_at(closure, None)
        c = self.spsa(closure, z)
        lr = self.hp["lr"]
        down = self.loss_at(closure, [-lr * c * zk for zk in z])
        up = self.loss_at(closure, [lr * c * zk for zk in z])
        # argmin; ties prefer staying, then theta - lr g (min keeps the first minimum)
        best = min((base, 0.0), (down, -1.0), (up, 1.0), key=lambda t: t[0])[1]
        if best != 0.0:
            self.decay()
            for p, zk in zip(self.params, z):
                p.add_(best * lr * c * zk)


class RefZOSGDSign(ReferenceZO):
    def _step(self, closure: Closure) -> None:
        z = self.noise()
        c = self.spsa(closure, z)
        sign_c = math.copysign(1.0, c) if c != 0 else 0.0
        self.decay()
        for p, zk in zip(self.params, z):
            d = torch.sign(zk) if self.hp.get("variant", "paper") == "paper" else zk
            p.sub_(self.hp["lr"] * sign_c * d)


class RefZOAdam(ReferenceZO):
    def _step(self, closure: Closure) -> None:
        z = self.noise()
        c = self.spsa(closure, z)
        b1, b2 = self.hp.get("betas", (0.9, 0.999))
        t = self.updates + 1
        self.decay()
        for p, st, zk in zip(self.params, self.state, z):
            g = c * zk
            st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
            st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
            m_hat = st["m"] / (1 - b1**t)
            v_hat = st["v"] / (1 - b2**t)
            p.sub_(self.hp["lr"] * m_hat / (v_hat.sqrt() + self.hp.get("adam_eps", 1e-8)))


def oracle_for(optimizer: str | type) -> type[ReferenceZO]:
    """The reference class named by an optimizer's ``reference`` attribute (a class or ``"module:Class"``)."""
    from zotune.optim.registry import get

    cls = get(optimizer) if isinstance(optimizer, str) else optimizer
    ref = getattr(cls, "reference", None)
    if ref is None:
        raise LookupError(f"{cls.__name__} names no reference oracle (set its `reference` attribute)")
    if isinstance(ref, str):
        module, _, qualname = ref.partition(":")
        ref = importlib.import_module(module)
        for part in qualname.split("."):
            ref = getattr(ref, part)
    if not (isinstance(ref, type) and issubclass(ref, ReferenceZO)):
        raise TypeError(f"{cls.__name__}.reference is not a ReferenceZO subclass: {ref!r}")
    return ref
