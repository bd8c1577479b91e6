"""ZO-SGD (MeZO, Malladi et al. 2023): SPSA gradient, plain SGD step.

    c = (L(theta + eps z) - L(theta - eps z)) / (2 eps)
    theta <- theta - lr (c z + wd theta)
"""

from __future__ import annotations

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer


class ZOSGD(ZOOptimizer):
    """MeZO / ZO-SGD. 2 forwards per step, no state beyond the step counter.

    Args:
        params: parameters, parameter groups, or an ``nn.Module``.
        lr: learning rate (MeZO OPT full-parameter: 1e-7 to 1e-6; LoRA 5e-5; prefix 1e-2).
        eps: perturbation scale (MeZO: 1e-3 full-parameter, 1e-2 LoRA, 1e-1 prefix).
        weight_decay: decoupled decay ``theta -= lr * wd * theta`` (MeZO's form).
        **engine: see :class:`~zotune.optim.engine.ZOOptimizer`.

    Example:
        >>> import torch
        >>> from zotune.optim import ZOSGD
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = ZOSGD([w], lr=0.05, eps=1e-3, seed=0)
        >>> for _ in range(100):
        ...     loss = opt.step(lambda: (w ** 2).sum())
        >>> bool((w ** 2).sum() < 0.3), opt.zo_state["forwards"]
        (True, 200)
    """

    aliases = ("mezo", "zo-sgd", "zosgd", "zo_sgd")
    summary = "theta -= lr * c z, c = (L+ - L-)/(2 eps)"
    lr_by_mode = {"full": 1e-6, "lora": 5e-5, "prefix": 1e-2}  # MeZO's OPT settings
    reference = "zotune.optim.reference:RefZOSGD"
    test_kwargs = dict(lr=1e-2)
    bench_variants = ({"layer_fraction": 0.25},)  # LeZO-style layer sampling, a quarter of the layers
    lazy_capable = True  # the kernel reads c, lr (snapshot) and its block only

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, **engine):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, **engine)

    def _zo_step(self, closure: Closure) -> float:
        seed = self._seed()
        plus, minus, c = self._spsa(closure, seed)

        def kernel(block: Block, noises: Noises) -> None:
            block.decay_weights()
            block.param.add_(noises[0][0], alpha=-block.group["lr"] * c)

        self._update([seed], kernel)
        return 0.5 * (plus + minus)
