"""LOZO and LOZO-M (Chen et al., ICLR 2025, arXiv 2410.07698; code optsuite/LOZO).

Each weight matrix W (m x n) is perturbed along a rank-r matrix instead of a dense z:

    U ~ N(0, 1)^{m x r} fresh every step,  V ~ N(0, 1)^{n x r} kept for nu steps ("lazy")
    c = (L(W + eps U V^T) - L(W - eps U V^T)) / (2 eps)
    LOZO:    W <- W - lr (c U V^T + wd W)
    LOZO-M:  M <- beta M + (1 - beta) c U     (M is m x r: momentum in the subspace of V)
             at a V refresh first M <- M V_old^T V_new / n (the old momentum carried over)
             W <- W - lr (M V^T + wd W)

Vectors (biases, norms) use a dense Gaussian z with the same c (LOZO-M: momentum
``m <- beta m + (1 - beta) c z``). As in the authors' code the estimate is not divided by r,
and LOZO-M's first update sets M = c U (m = c z) without the (1 - beta) factor.
"""

from __future__ import annotations

import torch

from zotune.optim.engine import Block, Closure, Noises, check_positive_int, check_range
from zotune.optim.lowrank import MatrixZO, low_rank_product, single_threaded, work_dtype


class LOZO(MatrixZO):
    """LOZO: ZO-SGD along U V^T per matrix. 2 forwards, no state; V (n x r) cached per window.

    Args:
        params: parameters, parameter groups, or an ``nn.Module``.
        lr: learning rate (authors, OPT-13B full-parameter: 1e-7 or 1e-6).
        eps: perturbation scale (authors: 1e-3).
        rank: r, the rank of U V^T (authors: 1 or 2).
        interval: nu, steps between refreshes of V (authors: 50 or 100).
        weight_decay: decoupled decay ``theta -= lr * wd * theta``.
        **engine: see :class:`~zotune.optim.engine.ZOOptimizer`.

    Example:
        >>> import torch
        >>> from zotune.optim import LOZO
        >>> w = torch.nn.Parameter(torch.ones(4, 3))
        >>> opt = LOZO([w], lr=0.02, rank=1, interval=5, seed=0)
        >>> for _ in range(200):
        ...     _ = opt.step(lambda: (w ** 2).sum())
        >>> bool((w ** 2).sum() < 1.0)
        True
    """

    aliases = ("lozo", "lowrank-zo", "lozo-sgd")
    summary = "c from W +- eps U V^T (V refreshed every nu steps); W -= lr c U V^T"
    # authors' full-parameter range is 1e-7 to 1e-6 (OPT-13B); LoRA/prefix as for ZO-SGD (docs/methods.md)
    lr_by_mode = {"full": 1e-6, "lora": 5e-5, "prefix": 1e-2}
    reference = "zotune.optim.reference_lowrank:RefLOZO"
    # short windows so that 6 oracle steps cross refreshes of V
    test_kwargs = dict(lr=1e-2, rank=2, interval=2)

    def __init__(self, params, lr: float = 1e-7, eps: float = 1e-3, rank: int = 2, interval: int = 50,
                 weight_decay: float = 0.0, **engine):
        check_positive_int("rank", rank)
        check_positive_int("interval", interval)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, rank=int(rank), interval=int(interval)),
                         eps=eps, **engine)

    def window(self, interval: int) -> int:
        return self.step_count // interval

    def column_factor(self, param: torch.Tensor, index: int, window: int, group: dict) -> torch.Tensor:
        """V (n x r) of a window."""
        _, n = self.dims(param)
        return self.window_factor(param, index, "lozo.V", window, n, group["rank"])

    def factors(self, param: torch.Tensor, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        group = self._group(index)
        m, _ = self.dims(param)
        u = self.step_gaussian(param, index, seed, m, group["rank"])
        v = self.column_factor(param, index, self.window(group["interval"]), group)
        return u, v.T

    def _group(self, index: int) -> dict:
        slot = (self._slots or [])[index]
        return self.param_groups[slot.group_index]

    def _zo_step(self, closure: Closure) -> float:
        return self._sgd_step(closure)


class LOZOM(LOZO):
    """LOZO-M: LOZO with momentum kept as an m x r factor per matrix. 2 forwards.

    State: ``momentum_factor`` (m x r) per matrix, a full ``momentum`` for vectors.

    Args:
        beta: momentum coefficient (authors: 0.9).
        lr, eps, rank, interval, weight_decay, **engine: as :class:`LOZO`.
    """

    aliases = ("lozo-m", "lozom", "lozo-momentum")
    summary = "LOZO with momentum M (m x r): M = beta M + (1 - beta) c U; W -= lr M V^T"
    reference = "zotune.optim.reference_lowrank:RefLOZOM"
    test_kwargs = dict(lr=1e-2, rank=2, interval=2, beta=0.9)  # crosses V refreshes: the projection

    def __init__(self, params, lr: float = 1e-7, eps: float = 1e-3, rank: int = 2, interval: int = 50,
                 beta: float = 0.9, weight_decay: float = 0.0, **engine):
        check_range("beta", beta, 0.0, 1.0)
        super().__init__(params, lr=lr, eps=eps, rank=rank, interval=interval, weight_decay=weight_decay,
                         **engine)
        for g in self.param_groups:
            g.setdefault("beta", float(beta))

    def init_state(self, param: torch.Tensor, state: dict) -> None:
        if self.is_matrix(param):
            local = self.comm.local_rows(param)[0]
            rank = self.param_groups[self._index_group(param)]["rank"]
            state["momentum_factor"] = torch.zeros(local.shape[0], rank, dtype=work_dtype(param.dtype),
                                                   device=local.device)
        else:
            state["momentum"] = self.zeros_state(param)

    def _index_group(self, param: torch.Tensor) -> int:
        for gi, g in enumerate(self.param_groups):
            if any(p is param for p in g["params"]):
                return gi
        raise KeyError("parameter not in this optimizer")

    def _mixing(self) -> dict[int, torch.Tensor]:
        """Per matrix, V_old^T V_new / n at a refresh of V (the first step of a window > 0)."""
        out = {}
        for slot in self._slots or []:
            if not self.is_matrix(slot.param):
                continue
            g = self.param_groups[slot.group_index]
            w = self.window(g["interval"])
            if w == 0 or self.step_count % g["interval"]:
                continue
            v_old = self.column_factor(slot.param, slot.index, w - 1, g)
            v_new = self.column_factor(slot.param, slot.index, w, g)
            out[slot.index] = v_old.T @ v_new / v_new.shape[0]
        return out

    def _zo_step(self, closure: Closure) -> float:
        seed = self._seed()
        plus, minus, c = self._spsa(closure, seed)
        first = self.zo_state["updates"] == 0
        with single_threaded():
            mixing = {} if first else self._mixing()

        def kernel(block: Block, noises: Noises) -> None:
            g = block.group
            beta = g["beta"]
            st = block.state
            if "momentum_factor" in st:
                a, b = self._factors[seed][block.slot.index]
                m = st["momentum_factor"][block.r0 : block.r1]
                u = self.row_factor(block, a)
                if first:
                    m.copy_(u).mul_(c)
                else:
                    if block.slot.index in mixing:
                        m.copy_(low_rank_product(m, mixing[block.slot.index]))
                    m.mul_(beta).add_(u, alpha=(1.0 - beta) * c)
                step = low_rank_product(m, b)
            else:
                m = block.view(st["momentum"])
                if first:
                    m.copy_(noises[0][0]).mul_(c)
                else:
                    m.mul_(beta).add_(noises[0][0], alpha=(1.0 - beta) * c)
                step = m
            block.decay_weights()
            block.param.add_(step, alpha=-g["lr"])

        self._ensure_factors([seed])
        self._update([seed], kernel)
        return 0.5 * (plus + minus)
