"""HELENE (Zhao et al., EMNLP 2025) -- EXPERIMENTAL best-available reconstruction, no public code.

The rule below is reconstructed from the abstract (arXiv 2411.10696), the ICLR reviews and a
third-party formula page (docs/methods.md, "HELENE"); it has not been checked against the
paper's Algorithms 1-2:

    g_t     = c_t z_t,  c_t = (L(theta + eps z) - L(theta - eps z)) / (2 eps)     # SPSA
    a_t     = beta1 + (1 - beta1) exp(-t / T)                     # annealing: 1 -> beta1
    m_t     = beta1 m_{t-1} + a_t g_t                             # momentum_form="anneal"
            (or (1 - a_t) m_{t-1} + a_t g_t                       # momentum_form="ema")
    every k steps: h_t = beta2 h_{t-k} + (1 - beta2) B g_t^2      # A-GNB with the ZO gradient
    theta  <- theta - lr m_t / (gamma max(h_t, lambda_l) + delta)  # clip="floor", per-layer lambda
           (or theta - lr clip(m_t / max(gamma h_t, delta), -lambda_l, lambda_l))   # clip="sophia"

lambda_l is the ``clip_threshold`` of the parameter's group: one group per layer (parameter
tensor) gives per-layer thresholds.
"""

from __future__ import annotations

import math

import torch

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer, check_choice, check_positive_int, check_range

MOMENTUM_FORMS = ("anneal", "ema")
CLIP_FORMS = ("floor", "sophia")


class HELENE(ZOOptimizer):
    """EXPERIMENTAL: HELENE as reconstructed in docs/methods.md (unverified). 2 forwards; state m, h (2x).

    Args:
        params: parameters, parameter groups (one per layer for per-layer lambda), or an
            ``nn.Module``.
        lr: learning rate eta (not published; the experiments "follow MeZO's settings").
        eps: perturbation scale.
        betas: (beta1, beta2): momentum floor of the anneal and the Hessian EMA.
        anneal_steps: T of the anneal a_t = beta1 + (1 - beta1) exp(-t / T).
        hessian_interval: k, refresh h every k steps (Sophia: 10); t counts updates from 0.
        gamma: Hessian scale gamma in the denominator.
        clip_threshold: lambda, the per-layer floor of h (``clip="floor"``) or the bound of
            the ratio (``clip="sophia"``). Per parameter group.
        denom_eps: delta in the denominator.
        gnb_scale: B in the A-GNB estimate B g^2 (the batch size; 1 gives g^2).
        momentum_form: ``"anneal"`` (beta1 m + a_t g) or ``"ema"`` ((1 - a_t) m + a_t g).
        clip: ``"floor"`` or ``"sophia"`` (see the module docstring).
        weight_decay: decoupled decay ``theta -= lr wd theta``.
        **engine: see :class:`~zotune.optim.engine.ZOOptimizer`.

    Example:
        >>> import torch
        >>> from zotune.optim import HELENE
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = HELENE([w], lr=1e-2, seed=0)
        >>> for _ in range(200):
        ...     _ = opt.step(lambda: (w ** 2).sum())
        >>> bool((w ** 2).sum() < 3.0)
        True
    """

    aliases = ("helene",)
    summary = "EXPERIMENTAL: m = b1 m + a_t c z; h = b2 h + (1-b2) c^2 z^2 every k; theta -= lr m/max(h, lam)"
    state_buffers = ("momentum", "hessian")
    lr_by_mode = {"full": 1e-6, "lora": 5e-5, "prefix": 1e-2}  # the same starting points as ZO-SGD
    reference = "zotune.optim.reference_methods:RefHELENE"
    lazy_capable = True  # the kernel captures its per-step values and reads its own block's state only
    test_kwargs = dict(lr=1e-3, hessian_interval=2)

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        anneal_steps: float = 1000.0,
        hessian_interval: int = 10,
        gamma: float = 1.0,
        clip_threshold: float = 1.0,
        denom_eps: float = 1e-8,
        gnb_scale: float = 1.0,
        momentum_form: str = "anneal",
        clip: str = "floor",
        **engine,
    ):
        check_range("betas[0]", betas[0], 0.0, 1.0)
        check_range("betas[1]", betas[1], 0.0, 1.0)
        check_range("anneal_steps", anneal_steps, 0.0, low_open=True)
        check_positive_int("hessian_interval", hessian_interval)
        for name, value in (("gamma", gamma), ("gnb_scale", gnb_scale)):
            check_range(name, value, 0.0, low_open=True)
        for name, value in (("clip_threshold", clip_threshold), ("denom_eps", denom_eps)):
            check_range(name, value, 0.0)
        check_choice("momentum_form", momentum_form, MOMENTUM_FORMS)
        check_choice("clip", clip, CLIP_FORMS)
        if clip == "sophia" and denom_eps <= 0:
            raise ValueError("clip='sophia' needs denom_eps > 0")
        self.anneal_steps, self.hessian_interval = float(anneal_steps), int(hessian_interval)
        self.gnb_scale, self.momentum_form, self.clip = float(gnb_scale), momentum_form, clip
        defaults = dict(lr=lr, betas=tuple(betas), gamma=gamma, clip_threshold=clip_threshold,
                        denom_eps=denom_eps, weight_decay=weight_decay)
        super().__init__(params, defaults, eps=eps, **engine)

    def init_state(self, param: torch.Tensor, state: dict) -> None:
        state["momentum"] = self.zeros_state(param)
        state["hessian"] = self.zeros_state(param)

    def anneal(self, beta1: float, t: int) -> float:
        """a_t = beta1 + (1 - beta1) exp(-t / T): 1 at t = 0, decays to beta1."""
        return beta1 + (1.0 - beta1) * math.exp(-t / self.anneal_steps)

    def _zo_step(self, closure: Closure) -> float:
        seed = self._seed()
        plus, minus, c = self._spsa(closure, seed)
        t = self.zo_state["updates"]
        refresh = t % self.hessian_interval == 0

        def kernel(block: Block, noises: Noises) -> None:
            g = block.group
            beta1, beta2 = g["betas"]
            z = noises[0][0]
            m, h = block.view(block.state["momentum"]), block.view(block.state["hessian"])
            a = self.anneal(beta1, t)
            m.mul_(beta1 if self.momentum_form == "anneal" else 1.0 - a).add_(z, alpha=a * c)
            if refresh:
                h.mul_(beta2).addcmul_(z, z, value=(1.0 - beta2) * self.gnb_scale * c * c)
            block.decay_weights()
            lam = g["clip_threshold"]
            if self.clip == "floor":
                denom = h.clamp(min=lam).mul_(g["gamma"]).add_(g["denom_eps"])
                block.param.addcdiv_(m, denom, value=-g["lr"])
            else:
                ratio = m / (h * g["gamma"]).clamp_(min=g["denom_eps"])
                block.param.add_(ratio.clamp_(-lam, lam), alpha=-g["lr"])

        self._update([seed], kernel)
        return 0.5 * (plus + minus)
