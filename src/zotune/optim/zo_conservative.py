"""ZO-SGD-Cons (ZO-Bench, paper definition): keep the best of three candidates.

    theta <- argmin over {theta - lr g, theta + lr g, theta} of L(.; B),  g = c z

Plain SGD displacements (exactly what the paper defines; ZO-Bench's published sweeps ran HF
AdamW here by accident; docs/methods.md, "ZO-SGD and the ZO-Bench family"). 5 forwards per step, no state.
"""

from __future__ import annotations

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer


class ZOSGDConservative(ZOOptimizer):
    """Conservative ZO-SGD: a step is taken only if it lowers the minibatch loss.

    Forwards: L(theta), L(theta +- eps z), L(theta - lr g), L(theta + lr g).
    """

    aliases = ("zo-sgd-cons", "zosgdcons", "zo-cons", "zo_sgd_conservative")
    summary = "theta = argmin_{theta, theta -+ lr c z} L"
    forwards_per_step = 5
    lr_by_mode = {"full": 1e-6, "lora": 5e-5, "prefix": 1e-2}  # starting points from the ZO-Bench grids
    reference = "zotune.optim.reference:RefZOSGDConservative"
    test_kwargs = dict(lr=1e-2)

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, **engine):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, **engine)

    def _zo_step(self, closure: Closure) -> float:
        seed = self._seed()
        (base,) = self._reduce(self._forward(closure))
        plus, minus = self._two_point(closure, seed)
        c = (plus - minus) / (2.0 * self.eps)
        step = [g["lr"] * c for g in self.param_groups]  # displacement lr*c along z, per group
        # from theta - eps z to theta - lr c z, then to theta + lr c z
        self._displace(seed, [self.eps - s for s in step])
        (down,) = self._reduce(self._forward(closure))
        self._displace(seed, [2.0 * s for s in step])
        (up,) = self._reduce(self._forward(closure))
        sign = 0.0  # stay at theta
        if down < base and down <= up:
            sign = -1.0
        elif up < base:
            sign = 1.0
        self.zo_state["last_losses"] = [base, plus, minus, down, up]
        self.zo_state["last_projected_grads"] = [c]
        self.zo_state["last_choice"] = sign

        def kernel(block: Block, noises: Noises) -> None:
            if sign != 0.0:
                block.decay_weights()
                block.param.add_(noises[0][0], alpha=sign * block.group["lr"] * c)

        self._update([seed], kernel)
        return min(base, down, up)
