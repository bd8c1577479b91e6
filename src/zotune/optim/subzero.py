"""SubZero (Yu et al., arXiv 2410.08989; code zimingyy/SubZero): random subspace perturbations.

Each weight matrix W (m x n) is perturbed inside a random subspace spanned by orthonormal
U (m x r) and V (n x r), refreshed every T steps; only a small r x r Gaussian core Z is new
each step:

    z = sqrt(m n) / r * U Z V^T      (the scale gives E ||z||^2 = m n, as for a dense z)
    c = (L(W + eps z) - L(W - eps z)) / (2 eps)
    W <- W - lr (c z + wd W)

Vectors (biases, norms) use a dense Gaussian z with the same c. U and V come from a QR of a
Gaussian with R's diagonal signs fixed (Haar); the authors' QR leaves the signs, which does
not change the distribution of z because Z is symmetric.
"""

from __future__ import annotations

import math

import torch

from zotune.optim.engine import Closure, check_positive_int
from zotune.optim.lowrank import MatrixZO


class SubZero(MatrixZO):
    """SubZero: ZO-SGD along sqrt(mn)/r U Z V^T per matrix. 2 forwards; U, V cached per window.

    Args:
        params: parameters, parameter groups, or an ``nn.Module``.
        lr: learning rate (OPT full-parameter: 1e-7 as for MeZO).
        eps: perturbation scale (1e-3 full-parameter).
        rank: r (authors' README: 24); capped at min(m, n) per matrix.
        interval: T, steps between refreshes of U and V (authors' README: 1000).
        weight_decay: decoupled decay ``theta -= lr * wd * theta``.
        **engine: see :class:`~zotune.optim.engine.ZOOptimizer`.

    Example:
        >>> import torch
        >>> from zotune.optim import SubZero
        >>> w = torch.nn.Parameter(torch.ones(4, 3))
        >>> opt = SubZero([w], lr=0.02, rank=2, interval=5, seed=0)
        >>> for _ in range(200):
        ...     _ = opt.step(lambda: (w ** 2).sum())
        >>> bool((w ** 2).sum() < 1.0)
        True
    """

    aliases = ("subzero", "sub-zero", "subzero-sgd")
    summary = "c from W +- eps sqrt(mn)/r U Z V^T (U, V orthonormal, refreshed every T steps)"
    lr_by_mode = {"full": 1e-6, "lora": 5e-5, "prefix": 1e-2}  # as ZO-SGD: E ||z||^2 is the same (docs/methods.md)
    reference = "zotune.optim.reference_lowrank:RefSubZero"
    test_kwargs = dict(lr=1e-3, rank=3, interval=2)

    def __init__(self, params, lr: float = 1e-7, eps: float = 1e-3, rank: int = 24, interval: int = 1000,
                 weight_decay: float = 0.0, **engine):
        check_positive_int("rank", rank)
        check_positive_int("interval", interval)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, rank=int(rank), interval=int(interval)),
                         eps=eps, **engine)

    def factors(self, param: torch.Tensor, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        slot = (self._slots or [])[index]
        g = self.param_groups[slot.group_index]
        m, n = self.dims(param)
        r = min(g["rank"], m, n)
        window = self.step_count // g["interval"]
        u = self.window_factor(param, index, "subzero.U", window, m, r, kind="orthonormal")
        v = self.window_factor(param, index, "subzero.V", window, n, r, kind="orthonormal")
        core = self.step_gaussian(param, index, seed, r, r)
        return (u @ core).mul_(math.sqrt(m * n) / r), v.T

    def _zo_step(self, closure: Closure) -> float:
        return self._sgd_step(closure)
