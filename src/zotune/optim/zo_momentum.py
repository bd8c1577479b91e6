"""ZO-SGD-MMT (ZO-Bench): SPSA gradient into heavy-ball momentum (PyTorch SGD, dampening 0).

    g = c z;  m <- beta m + g;  theta <- theta - lr (m + wd theta)
"""

from __future__ import annotations

import torch

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer, check_range


class ZOSGDMomentum(ZOOptimizer):
    """ZO-SGD with heavy-ball momentum. 2 forwards, state: one fp32 buffer ``m`` (1x params).

    Args:
        lr: learning rate (ZO-Bench grid 1e-5 ... 1e-8 for OPT full-parameter).
        momentum: beta (ZO-Bench: 0.9).
        weight_decay: decoupled decay (ZO-Bench silently ignores it; 0 reproduces ZO-Bench).
    """

    aliases = ("zo-sgd-mmt", "zosgdmmt", "zo-momentum", "zo_sgd_momentum")
    summary = "m = beta m + c z; theta -= lr m"
    state_buffers = ("momentum",)
    lr_by_mode = {"full": 1e-7, "lora": 5e-6, "prefix": 1e-3}  # starting points from the ZO-Bench grids
    reference = "zotune.optim.reference:RefZOSGDMomentum"
    lazy_capable = True  # the kernel captures its per-step values and reads its own block's state only
    test_kwargs = dict(lr=5e-3, momentum=0.9)

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, **engine):
        check_range("momentum", momentum, 0.0, 1.0)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), eps=eps, **engine)

    def init_state(self, param: torch.Tensor, state: dict) -> None:
        state["momentum"] = self.zeros_state(param)

    def _zo_step(self, closure: Closure) -> float:
        seed = self._seed()
        plus, minus, c = self._spsa(closure, seed)

        def kernel(block: Block, noises: Noises) -> None:
            g = block.group
            m = block.view(block.state["momentum"])
            m.mul_(g["momentum"]).add_(noises[0][0], alpha=c)
            block.decay_weights()
            block.param.add_(m, alpha=-g["lr"])

        self._update([seed], kernel)
        return 0.5 * (plus + minus)
