"""ZO-SGD-Sign (ZO-signSGD, Liu et al. 2019), the paper's coordinate-wise sign.

    theta <- theta - lr sign(c) sign(z)            (default, ``variant="paper"``)
    theta <- theta - lr sign(c) z                  (``variant="zo-bench"``: ZO-Bench's code)

The update ignores |c| and has the same magnitude in every coordinate, so lr must be much
smaller than ZO-SGD's.
"""

from __future__ import annotations

import math

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer, check_choice

VARIANTS = ("paper", "zo-bench")


class ZOSGDSign(ZOOptimizer):
    """Sign ZO-SGD. 2 forwards, no state."""

    aliases = ("zo-sgd-sign", "zosgdsign", "zo-sign", "zo_sgd_sign")
    summary = "theta -= lr sign(c) sign(z)"
    lr_by_mode = {"full": 1e-7, "lora": 1e-5, "prefix": 1e-4}  # starting points from the ZO-Bench grids
    reference = "zotune.optim.reference:RefZOSGDSign"
    lazy_capable = True  # the kernel captures its per-step values and reads its own block's state only
    test_kwargs = dict(lr=1e-3)

    def __init__(self, params, lr: float = 1e-7, eps: float = 1e-3, weight_decay: float = 0.0,
                 variant: str = "paper", **engine):
        check_choice("variant", variant, VARIANTS)
        self.variant = variant
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, **engine)

    def _zo_step(self, closure: Closure) -> float:
        seed = self._seed()
        plus, minus, c = self._spsa(closure, seed)
        sign_c = math.copysign(1.0, c) if c != 0.0 else 0.0

        def kernel(block: Block, noises: Noises) -> None:
            g = block.group
            z = noises[0][0]
            block.decay_weights()
            direction = z.sign() if self.variant == "paper" else z
            block.param.add_(direction, alpha=-g["lr"] * sign_c)

        self._update([seed], kernel)
        return 0.5 * (plus + minus)
