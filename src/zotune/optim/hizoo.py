"""HiZOO (Zhao et al., ICLR 2025): SPSA with a diagonal-Hessian preconditioner h (fp32, h_0 = 1).

Per step, with z ~ N(0, I) regenerated from the step seed (the authors' 2025 code; docs/methods.md, "HiZOO"):

    u    = z / sqrt(h_{t-1})                                        # perturbation direction
    l0   = L(theta),  l+- = L(theta +- eps u)
    est  = (l+ + l- - 2 l0) / (2 eps^2) * h_{t-1} * (z^2 - k)       # k = 1 with trace_correction
    h_t  = (1 - alpha_t) h_{t-1} + alpha_t |est|                    # (abs_after_ema: |EMA of est|)
    theta <- theta - lr ((l+ - l-) / (2 eps) * z / sqrt(h_t) + wd theta)

Without ``trace_correction`` this is the authors' 2025 code (|l+ + l- - 2 l0| h z^2 / (2 eps^2)),
with it the paper's unbiased MiNES form E[est_i] = H_ii (the |.| is then per sample). HiZOO-multi
(``n_samples = n``) draws n directions, averages est and the gradient over them, and costs
2n + 1 forwards. ``alpha = 0`` keeps h = 1 and reproduces :class:`~zotune.optim.ZOSGD`. ``hessian_every = k``
(not in the paper; Sophia/HELENE-style lazy curvature) spends the forward at theta and the h
update only on every k-th update and takes plain preconditioned SPSA steps with the frozen h in
between: 2n + 1/k forwards per step on average.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer, check_choice, check_positive_int, check_range

ALPHA_SCHEDULES = ("constant", "harmonic", "linear")
#: default floor of h where it could otherwise reach 0: the effective h in ``abs_after_ema`` mode
#: (|EMA| of a signed estimate) and the warm-started h (a flat loss gives est = 0)
H_FLOOR = 1e-4
#: sample index offset of the warm-start probes (distinct from the step's own directions)
WARMUP_SAMPLE_OFFSET = 1 << 20

EstimateHook = Callable[[Block, torch.Tensor], None]


class Estimate(NamedTuple):
    """A block's Hessian estimate ``scale * values`` (a scalar kept apart saves a pass over the block)."""

    values: torch.Tensor
    scale: float
    nonnegative: bool  # values >= 0 by construction: |est| = |scale| values needs no abs pass

    def full(self) -> torch.Tensor:
        return self.values * self.scale


class HiZOO(ZOOptimizer):
    """HiZOO / HiZOO-multi. 2n + 1 forwards (3 by default), state: ``hessian`` (1x params, fp32).

    Args:
        params: parameters, parameter groups, or an ``nn.Module``.
        lr: learning rate eta (RoBERTa-large FT 1e-6, OPT-13B FT 1e-6).
        eps: perturbation scale mu (1e-3 FT, 1e-2 LoRA on OPT, 1e-1 prefix).
        alpha: Hessian smoothing alpha ("Hessian_smooth": 1e-6 RoBERTa, 1e-8 / 1e-10 OPT).
            ``alpha = 0`` is MeZO plus a wasted forward. Per parameter group.
        weight_decay: decoupled decay ``theta -= lr wd theta`` (MeZO's form).
        trace_correction: use the paper's (z^2 - 1) form (unbiased before the |.|).
        abs_after_ema: keep the EMA of the *signed* estimate and use its absolute value
            (PeFoo's fix); the effective h is floored at ``h_min`` (default ``H_FLOOR`` = 1e-4).
        n_samples: directions per step (HiZOO-multi); est and gradient are averaged.
        h_min, h_max: clamp h to [h_min, h_max] after every EMA update (PeFoo clamps at 1e4).
            Per parameter group. ``None`` = no clamp (the published method).
        warmup_probes: at the first step, set h from the mean of this many probe estimates
            (2 forwards each, at h = 1) instead of starting from h = 1 (floored at ``h_min``,
            default 1e-4).
        alpha_schedule: ``"constant"`` (published), ``"harmonic"``
            (alpha_t = alpha / (1 + t / T): a running mean of est once t >> T) or ``"linear"``
            (alpha_t = alpha max(0, 1 - t / T)); t counts updates from 0.
        alpha_decay_steps: T of the schedule (default for ``"harmonic"``: 1 / alpha).
        hessian_every: refresh h on every k-th update only (updates 0, k, 2k, ...); the steps
            between skip the forward at theta (2n forwards) and use the current h. Default 1
            (the published method). Counts updates, like the alpha schedule.
        **engine: see :class:`~zotune.optim.engine.ZOOptimizer`.

    ``estimate_hook``, if set to ``f(block, est)``, is called (from the worker threads) with the
    pre-EMA, pre-|.| estimate of each block in the final pass: a diagnostic, used by the tests.

    Example:
        >>> import torch
        >>> from zotune.optim import HiZOO
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> opt = HiZOO([w], lr=0.05, eps=1e-3, alpha=0.1, seed=0)
        >>> for _ in range(100):
        ...     _ = opt.step(lambda: 0.5 * (w[0] ** 2 + 10 * w[1] ** 2))
        >>> bool(0.5 * (w[0] ** 2 + 10 * w[1] ** 2) < 5.5)
        True
    """

    aliases = ("hizoo",)
    summary = "u = z/sqrt(h); h = (1-a)h + a|dL h z^2/(2eps^2)|; theta -= lr c z/sqrt(h_new)"
    forwards_per_step = 3
    state_buffers = ("hessian",)
    lr_by_mode = {"full": 1e-6, "lora": 1e-5, "prefix": 1e-2}  # starting points from the HiZOO paper
    reference = "zotune.optim.reference_methods:RefHiZOO"
    test_kwargs = dict(lr=1e-2, alpha=1e-2)
    bench_variants = ({"hessian_every": 2},)  # the lazy refresh: 2.5 forwards per step

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        alpha: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        trace_correction: bool = False,
        abs_after_ema: bool = False,
        n_samples: int = 1,
        h_min: float | None = None,
        h_max: float | None = None,
        warmup_probes: int = 0,
        alpha_schedule: str = "constant",
        alpha_decay_steps: float | None = None,
        hessian_every: int = 1,
        **engine,
    ):
        check_range("alpha", alpha, 0.0, 1.0)
        check_positive_int("n_samples", n_samples)
        check_range("warmup_probes", warmup_probes, 0)
        if h_min is not None:
            check_range("h_min", h_min, 0.0)
        if h_max is not None and not h_max > (h_min or 0.0):
            raise ValueError(f"h_max must be > h_min and > 0, got {h_max}")
        check_choice("alpha_schedule", alpha_schedule, ALPHA_SCHEDULES)
        if alpha_schedule == "linear" and not alpha_decay_steps:
            raise ValueError("alpha_schedule='linear' needs alpha_decay_steps")
        if alpha_decay_steps is not None:
            check_range("alpha_decay_steps", alpha_decay_steps, 0.0, low_open=True)
        check_positive_int("hessian_every", hessian_every)
        self.trace_correction = bool(trace_correction)
        self.abs_after_ema = bool(abs_after_ema)
        self.n_samples = int(n_samples)
        self.warmup_probes = int(warmup_probes)
        self.alpha_schedule = alpha_schedule
        self.alpha_decay_steps = alpha_decay_steps
        self.hessian_every = int(hessian_every)
        self.forwards_per_step = 2 * self.n_samples + 1 / self.hessian_every  # mean over steps
        self.estimate_hook: EstimateHook | None = None
        defaults = dict(lr=lr, alpha=alpha, weight_decay=weight_decay, h_min=h_min, h_max=h_max)
        super().__init__(params, defaults, eps=eps, **engine)

    # ------------------------------------------------------------------ h and its uses
    def init_state(self, param: torch.Tensor, state: dict) -> None:
        state["hessian"] = self.zeros_state(param, 1.0)

    def _floor(self, group: dict) -> float | None:
        if self.abs_after_ema and group["h_min"] is None:
            return H_FLOOR
        return group["h_min"]

    def effective_h(self, stored: torch.Tensor, group: dict) -> torch.Tensor:
        """The h that scales directions: the stored one, or |EMA| floored in abs_after_ema mode."""
        if not self.abs_after_ema:
            return stored  # already clamped when it was written
        return stored.abs().clamp_(min=self._floor(group), max=group["h_max"])

    def _store_h(self, h: torch.Tensor, est: Estimate, alpha: float, group: dict) -> None:
        """h <- (1 - alpha) h + alpha |est| (or the signed EMA), clamped; ``est.values`` may be overwritten."""
        if self.abs_after_ema:
            h.mul_(1.0 - alpha).add_(est.values, alpha=alpha * est.scale)
            if group["h_max"] is not None:
                h.clamp_(min=-group["h_max"], max=group["h_max"])
        else:
            magnitude = est.values if est.nonnegative else est.values.abs_()
            h.mul_(1.0 - alpha).add_(magnitude, alpha=alpha * abs(est.scale))
            if group["h_min"] is not None or group["h_max"] is not None:
                h.clamp_(min=group["h_min"], max=group["h_max"])

    def _root_h(self, h: torch.Tensor, group: dict, out: torch.Tensor | None = None) -> torch.Tensor:
        """sqrt of the effective h, written to ``out`` (or one new block-sized tensor)."""
        if self.abs_after_ema:
            return torch.abs(h, out=out).clamp_(min=self._floor(group), max=group["h_max"]).sqrt_()
        return torch.sqrt(h, out=out)

    def root_h(self, block: Block) -> torch.Tensor:
        """sqrt(h) of one block, as a new block-sized tensor (the preconditioner of u = z / sqrt(h))."""
        return self._root_h(block.view(block.state["hessian"]), block.group)

    def direction(self, block: Block, noise: list[torch.Tensor]) -> torch.Tensor:
        root = self.root_h(block)
        return torch.div(noise[0], root, out=root)

    def alpha_at(self, group: dict, t: int | None = None) -> float:
        """alpha_t of a parameter group at update ``t`` (default: the current one)."""
        t = self.zo_state["updates"] if t is None else t
        alpha = float(group["alpha"])
        if self.alpha_schedule == "constant" or alpha == 0.0:
            return alpha
        if self.alpha_schedule == "harmonic":
            horizon = self.alpha_decay_steps or 1.0 / alpha
            return alpha / (1.0 + t / horizon)
        return alpha * max(0.0, 1.0 - t / float(self.alpha_decay_steps))  # linear

    def _estimate(self, noises: Noises, scales: Sequence[float], h_prev: torch.Tensor) -> Estimate:
        """``sum_i scales[i] (z_i^2 - k) * h_prev`` (k = 1 with the trace correction); a new block tensor."""
        if len(scales) == 1:  # the scalar stays outside: one pass fewer, and z^2 h >= 0 needs no |.|
            zz = self._squared(noises[0], h_prev)
            return Estimate(zz.mul_(h_prev), scales[0], nonnegative=not self.trace_correction)
        est: torch.Tensor | None = None
        for noise, scale in zip(noises, scales):
            zz = self._squared(noise, h_prev)
            est = zz.mul_(scale) if est is None else est.add_(zz, alpha=scale)
        assert est is not None
        return Estimate(est.mul_(h_prev), 1.0, nonnegative=False)

    def _squared(self, noise: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        z = noise[0].to(like.dtype)  # the noise is fp32; float64 parameters keep float64 state
        zz = z * z
        return zz.sub_(1.0) if self.trace_correction else zz

    # ------------------------------------------------------------------ the step
    def _probe(self, closure: Closure, seeds: Sequence[int], l0: float | None) -> tuple[list[float], list[float]]:
        """Two-point probes along each seed; returns (projected grads, second differences).

        Without ``l0`` (a step that keeps h) there are no second differences. Leaves the last
        seed displaced (by -eps u) for the fused restore of the final pass.
        """
        grads, second, losses = [], [], [] if l0 is None else [l0]
        for i, seed in enumerate(seeds):
            plus, minus = self._two_point(closure, seed)
            if i < len(seeds) - 1:
                self._restore(seed)
            grads.append((plus - minus) / (2.0 * self.eps))
            if l0 is not None:
                second.append(plus + minus - 2.0 * l0)
            losses += [plus, minus]
        self.zo_state["last_losses"] = losses
        return grads, second

    def _warm_start(self, closure: Closure, l0: float) -> None:
        """h <- clamp(|mean_k est_k|) from ``warmup_probes`` probes at the initial h.

        2 forwards per probe; the h it writes is floored at ``h_min`` (default 1e-4).
        """
        k = self.warmup_probes
        seeds = [self._seed(WARMUP_SAMPLE_OFFSET + i) for i in range(k)]
        _, second = self._probe(closure, seeds, l0)
        self._restore(seeds[-1])
        scales = [d / (2.0 * self.eps**2 * k) for d in second]

        def kernel(block: Block, noises: Noises) -> None:
            h = block.view(block.state["hessian"])
            self._store_h(h, self._estimate(noises, scales, self.effective_h(h, block.group)), 1.0, block.group)
            if not self.abs_after_ema and block.group["h_min"] is None:
                h.clamp_(min=H_FLOOR)

        self._sweep(seeds, kernel)
        self.zo_state["warm_started"] = True

    def _descend(self, block: Block, noises: Noises, grads: Sequence[float], root: torch.Tensor) -> None:
        """theta <- theta (1 - lr wd) - lr / n sum_i c_i z_i / root; overwrites the noise (its last use).

        z / root, then an add with alpha (one rounding, as ZO-SGD's update): at h = 1 this is
        ZO-SGD bit for bit (a fused addcdiv rounds twice).
        """
        g = block.group
        block.decay_weights()
        for noise, c in zip(noises, grads):
            z = noise[0].to(root.dtype)  # a copy only for float64 parameters
            block.param.add_(z.div_(root), alpha=-g["lr"] * c / len(grads))

    def _frozen_h_step(self, closure: Closure) -> float:
        """A step between h refreshes: 2n forwards, h as it is, the same preconditioned update."""
        n = self.n_samples
        seeds = [self._seed(i) for i in range(n)]
        grads, _ = self._probe(closure, seeds, None)
        self.zo_state["last_projected_grads"] = grads

        def kernel(block: Block, noises: Noises) -> None:
            self._descend(block, noises, grads, self.root_h(block))

        self._update(seeds, kernel)
        losses = self.zo_state["last_losses"]
        return sum(losses) / len(losses)

    def _zo_step(self, closure: Closure) -> float:
        if self.zo_state["updates"] % self.hessian_every:
            return self._frozen_h_step(closure)
        (l0,) = self._reduce(self._forward(closure))
        if self.warmup_probes and not self.zo_state.get("warm_started", False):
            self._warm_start(closure, l0)
        n = self.n_samples
        seeds = [self._seed(i) for i in range(n)]
        grads, second = self._probe(closure, seeds, l0)
        self.zo_state["last_projected_grads"] = grads
        scales = [d / (2.0 * self.eps**2 * n) for d in second]
        alphas = [self.alpha_at(g) for g in self.param_groups]
        hook = self.estimate_hook

        def kernel(block: Block, noises: Noises) -> None:
            g = block.group
            h = block.view(block.state["hessian"])
            est = self._estimate(noises, scales, self.effective_h(h, g))
            if hook is not None:
                hook(block, est.full())
            self._store_h(h, est, alphas[block.slot.group_index], g)
            # est is spent: its buffer takes sqrt(h_t), so the kernel holds one block temporary
            self._descend(block, noises, grads, self._root_h(h, g, out=est.values))

        self._update(seeds, kernel)
        return l0
