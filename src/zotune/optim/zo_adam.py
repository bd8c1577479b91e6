"""ZO-Adam (ZO-Bench / MeZO-Adam): the SPSA gradient fed to plain Adam, fp32 moments.

    g = c z;  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
    theta <- theta - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + adam_eps)

With SPSA, E[g_i^2] = |grad|^2 + 2 grad_i^2 is almost isotropic in high dimension, so this
behaves much like SGD normalised by a running |grad| (docs/methods.md, "ZO-SGD and the ZO-Bench family").
"""

from __future__ import annotations

import torch

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer, check_range


class ZOAdam(ZOOptimizer):
    """ZO-Adam. 2 forwards, state: ``exp_avg`` and ``exp_avg_sq`` (2x params, fp32).

    Args:
        lr: learning rate (ZO-Bench grid 1e-4 ... 1e-8).
        betas: Adam's (beta1, beta2).
        adam_eps: Adam's denominator epsilon (``eps`` is the perturbation scale).
        amsgrad: use max(v_hat) as in AMSGrad / ZO-AdaMM.
        weight_decay: decoupled (AdamW-style) decay.
    """

    aliases = ("zo-adam", "zoadam", "zo_adam", "mezo-adam")
    summary = "Adam on g = c z (bias-corrected, fp32 m and v)"
    state_buffers = ("exp_avg", "exp_avg_sq")
    lr_by_mode = {"full": 1e-5, "lora": 1e-4, "prefix": 1e-3}  # starting points from the ZO-Bench grids
    reference = "zotune.optim.reference:RefZOAdam"
    lazy_capable = True  # the kernel captures its per-step values and reads its own block's state only
    test_kwargs = dict(lr=1e-3)

    def __init__(self, params, lr: float = 1e-5, eps: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, amsgrad: bool = False, weight_decay: float = 0.0, **engine):
        check_range("betas[0]", betas[0], 0.0, 1.0)
        check_range("betas[1]", betas[1], 0.0, 1.0)
        defaults = dict(lr=lr, betas=tuple(betas), adam_eps=adam_eps, amsgrad=amsgrad, weight_decay=weight_decay)
        super().__init__(params, defaults, eps=eps, **engine)
        if amsgrad:
            self.state_buffers = (*self.state_buffers, "max_exp_avg_sq")

    def init_state(self, param: torch.Tensor, state: dict) -> None:
        for name in self.state_buffers:
            state[name] = self.zeros_state(param)

    def _zo_step(self, closure: Closure) -> float:
        seed = self._seed()
        plus, minus, c = self._spsa(closure, seed)
        t = self.zo_state["updates"] + 1

        def kernel(block: Block, noises: Noises) -> None:
            g = block.group
            beta1, beta2 = g["betas"]
            z = noises[0][0]
            m, v = block.view(block.state["exp_avg"]), block.view(block.state["exp_avg_sq"])
            m.mul_(beta1).add_(z, alpha=(1.0 - beta1) * c)
            v.mul_(beta2).addcmul_(z, z, value=(1.0 - beta2) * c * c)
            if g["amsgrad"]:
                v_max = block.view(block.state["max_exp_avg_sq"])
                torch.maximum(v_max, v, out=v_max)
                v = v_max
            denom = (v / (1.0 - beta2**t)).sqrt_().add_(g["adam_eps"])
            block.decay_weights()
            block.param.addcdiv_(m, denom, value=-g["lr"] / (1.0 - beta1**t))

        self._update([seed], kernel)
        return 0.5 * (plus + minus)


