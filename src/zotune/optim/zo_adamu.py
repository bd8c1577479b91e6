"""ZO-AdaMU (Jiang et al., AAAI 2024): SPSA along a momentum/noise mixture, Algorithm 1.

Per step t, with (alpha, beta1, beta2) = A_phi(t) and two normal streams z1, z2 of the seed
(docs/methods.md, "ZO-AdaMU": the paper's algorithm with a pure-function anneal):

    zd  = sqrt(alpha) z1                     ~ N(0, alpha)
    zdd = m_{t-1} + sqrt(1 - alpha) z2       ~ N(m_{t-1}, 1 - alpha)
    m_t = beta1 zd + (1 - beta1) zdd         # perturbation direction AND update direction
    g   = (L(theta + eps m_t) - L(theta - eps m_t)) / (2 eps)
    v_t = beta2 zd^2 + (1 - beta2) zdd^2     # recomputed, not stored
    theta <- theta - lr (g m_t / sqrt(v_t + sigma) + wd theta);  store m_t

Anneal (one pure function of t per variable; T3 = ``total_steps``, T2 = 0.8 T3 by default):

    A_phi(t) = 1                                                          t < T1
    A_phi(t) = 0.5 + 0.5 cos(pi (t - T1) / (T3 - phi (t - T1)(T3 - T2)/(T2 - T1)))   T1 <= t < T2
    A_phi(t) = A_phi(T2)    ("frozen", the code's behaviour)                 t >= T2
               or (alpha, beta1, beta2) = (0.5, 0.9, 0.01)  ("paper", its text)

with phi = (1.0, 0.1, 1.5) for (alpha, beta1, beta2). In the warm-up (all three = 1) the
update is the sign-normalised step theta -= lr g z1 / sqrt(z1^2 + sigma) ~ lr g sign(z1).
"""

from __future__ import annotations

import math

import torch

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer, check_choice, check_range

PHASE3_POLICIES = ("frozen", "paper")
#: the paper's text for phase 3: (alpha, beta1, beta2)
PAPER_PHASE3 = (0.5, 0.9, 0.01)


def anneal(t: float, phi: float, t1: float, t2: float, t3: float) -> float:
    """A_phi(t) of ZO-AdaMU's Eq. 7 in its intended pure-function form (phase 3 frozen).

    >>> round(anneal(5000, 1.0, 1024, 16000, 20000), 3), round(anneal(20000, 1.0, 1024, 16000, 20000), 3)
    (0.895, 0.01)
    """
    if t < t1:
        return 1.0
    t = min(t, t2)
    denominator = t3 - phi * (t - t1) * (t3 - t2) / (t2 - t1)
    return 0.5 + 0.5 * math.cos(math.pi * (t - t1) / denominator)


class ZOAdaMU(ZOOptimizer):
    """ZO-AdaMU. 2 forwards, state: ``momentum`` (1x params, fp32); 2 normals per element.

    Args:
        params: parameters, parameter groups, or an ``nn.Module``.
        lr: learning rate eta (paper: 1e-4 full-parameter, 1e-4 prefix, 1e-2 LoRA).
        eps: perturbation scale (paper: 1e-3 full-parameter, 1e-2 prefix, 1e-1 LoRA).
        weight_decay: decoupled decay (MeZO's form; the paper uses 0).
        total_steps: T3, the length of the run (the anneal depends on it; paper/code: 20K).
        t1: end of the warm-up, T1 (1024).
        t2: end of the cosine phase, T2 (default ``0.8 * total_steps``).
        phi: (phi_alpha, phi_beta1, phi_beta2), the anneal shapes (1.0, 0.1, 1.5).
        phase3: ``"frozen"`` (A_phi(T2), what the code implies) or ``"paper"`` (constants
            alpha, beta1, beta2 = 0.5, 0.9, 0.01 from the text).
        sigma: the denominator constant in sqrt(v + sigma) (1e-8).
        fixed: constant (alpha, beta1, beta2) instead of the anneal (ablations, tests).
        **engine: see :class:`~zotune.optim.engine.ZOOptimizer`.

    Example:
        >>> import torch
        >>> from zotune.optim import ZOAdaMU
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = ZOAdaMU([w], lr=0.01, total_steps=100, t1=10, seed=0)
        >>> for _ in range(100):
        ...     _ = opt.step(lambda: (w ** 2).sum())
        >>> opt.coefficients(0), opt.coefficients(99) == opt.coefficients(80)
        ((1.0, 1.0, 1.0), True)
    """

    aliases = ("zo-adamu", "adamu", "zoadamu", "zo_adamu")
    summary = "m = b1 sqrt(a) z1 + (1-b1)(m + sqrt(1-a) z2); theta -= lr g m / sqrt(v + sigma)"
    noise_streams = 2
    state_buffers = ("momentum",)
    lr_by_mode = {"full": 1e-4, "lora": 1e-2, "prefix": 1e-4}  # starting points from the ZO-AdaMU paper
    reference = "zotune.optim.reference_methods:RefZOAdaMU"
    test_kwargs = dict(lr=1e-3, total_steps=10, t1=2)  # short anneal: all three phases in 6 steps

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        total_steps: int = 20000,
        t1: int = 1024,
        t2: int | None = None,
        phi: tuple[float, float, float] = (1.0, 0.1, 1.5),
        phase3: str = "frozen",
        sigma: float = 1e-8,
        fixed: tuple[float, float, float] | None = None,
        **engine,
    ):
        t2 = int(0.8 * total_steps) if t2 is None else int(t2)
        if not 0 <= t1 < t2 <= total_steps:
            raise ValueError(f"need 0 <= t1 < t2 <= total_steps, got {t1}, {t2}, {total_steps}")
        if len(phi) != 3 or any(total_steps - p * (total_steps - t2) <= 0 for p in phi):
            raise ValueError(f"phi must be 3 values with T3 - phi (T3 - T2) > 0, got {phi}")
        check_choice("phase3", phase3, PHASE3_POLICIES)
        check_range("sigma", sigma, 0.0)
        if fixed is not None and (len(fixed) != 3 or not all(0.0 <= x <= 1.0 for x in fixed)):
            raise ValueError(f"fixed must be 3 values in [0, 1], got {fixed}")
        self.total_steps, self.t1, self.t2 = int(total_steps), int(t1), t2
        self.phi = tuple(float(p) for p in phi)
        self.phase3, self.sigma = phase3, float(sigma)
        self.fixed = None if fixed is None else tuple(float(x) for x in fixed)
        self._coefs = (1.0, 1.0, 1.0)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, **engine)

    def coefficients(self, t: int) -> tuple[float, float, float]:
        """(alpha, beta1, beta2) at update t (0-based; the paper's t = t + 1)."""
        if self.fixed is not None:
            return self.fixed  # type: ignore[return-value]
        step = t + 1
        if step >= self.t2 and self.phase3 == "paper":
            return PAPER_PHASE3
        a, b1, b2 = (anneal(step, p, self.t1, self.t2, self.total_steps) for p in self.phi)
        return a, b1, b2

    def init_state(self, param: torch.Tensor, state: dict) -> None:
        state["momentum"] = self.zeros_state(param)

    def direction(self, block: Block, noise: list[torch.Tensor]) -> torch.Tensor:
        """m_t from m_{t-1} (the state is overwritten only by the final update pass)."""
        alpha, beta1, _ = self._coefs
        m = block.view(block.state["momentum"]).mul(1.0 - beta1)  # in the state's dtype
        m.add_(noise[0], alpha=beta1 * math.sqrt(alpha))
        return m.add_(noise[1], alpha=(1.0 - beta1) * math.sqrt(1.0 - alpha))

    def _zo_step(self, closure: Closure) -> float:
        self._coefs = self.coefficients(self.zo_state["updates"])
        alpha, _, beta2 = self._coefs
        seed = self._seed()
        plus, minus = self._two_point(closure, seed)
        g = (plus - minus) / (2.0 * self.eps)
        self.zo_state["last_losses"] = [plus, minus]
        self.zo_state["last_projected_grads"] = [g]
        self.zo_state["last_coefficients"] = list(self._coefs)

        def kernel(block: Block, noises: Noises) -> None:
            group = block.group
            m_prev = block.view(block.state["momentum"])
            m = self.direction(block, noises[0])
            zd = noises[0][0].to(m_prev.dtype) * math.sqrt(alpha)  # a new tensor, in the state dtype
            zdd = torch.add(m_prev, noises[0][1], alpha=math.sqrt(1.0 - alpha))
            v = zd.mul_(zd).mul_(beta2).addcmul_(zdd, zdd, value=1.0 - beta2)
            block.decay_weights()
            block.param.addcdiv_(m, v.add_(self.sigma).sqrt_(), value=-group["lr"] * g)
            m_prev.copy_(m)

        self._update([seed], kernel)
        return 0.5 * (plus + minus)
