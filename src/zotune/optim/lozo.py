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

    def _projection(self, slot, window: int) -> torch.Tensor:
        """V_{w-1}^T V_w / n: carries momentum from window w - 1 into window w (a refresh of V)."""
        g = self.param_groups[slot.group_index]
        v_old = self.column_factor(slot.param, slot.index, window - 1, g)
        v_new = self.column_factor(slot.param, slot.index, window, g)
        return v_old.T @ v_new / v_new.shape[0]

    def _catch_up(self, slot) -> tuple[list[tuple[torch.Tensor | None, float, float, torch.Tensor | None]],
                                       torch.Tensor | None]:
        """What LOZO-M's rule did to this parameter on the steps it was sampled out (see the class doc).

        Returns the segments of skipped steps, one per window of V they fall in, as (projection
        into the window or None, sum of beta^i over the segment, beta^(steps), V^T of the window;
        None for vectors), and the projection at this step (or None).
        """
        g, t = self.param_groups[slot.group_index], self.step_count
        beta, nu = g["beta"], g["interval"]
        t0 = self.state[slot.param].get("last_step", t - 1)  # a checkpoint from before: no gap
        matrix = self.is_matrix(slot.param)
        segments = []
        if t0 < 0:  # never updated: the momentum is zero
            return segments, None
        window, s = t0 // nu, t0 + 1
        while s < t:
            w = s // nu if matrix else window
            end = min(t, (w + 1) * nu) if matrix else t
            j = end - s
            segments.append((self._projection(slot, w) if w != window else None,
                             beta * (1.0 - beta**j) / (1.0 - beta), beta**j,
                             self.column_factor(slot.param, slot.index, w, g).T if matrix else None))
            window, s = w, end
        final = self._projection(slot, t // nu) if matrix and t // nu != window else None
        return segments, final

    def _zo_step(self, closure: Closure) -> float:
        seed = self._seed()
        plus, minus, c = self._spsa(closure, seed)
        first = self.zo_state["updates"] == 0
        active = self.active_slots()
        with single_threaded():
            plans = {} if first else {slot.index: self._catch_up(slot) for slot in active}

        def kernel(block: Block, noises: Noises) -> None:
            g = block.group
            beta, lr = g["beta"], g["lr"]
            st = block.state
            segments, final = plans.get(block.slot.index, ([], None))
            if "momentum_factor" in st:
                a, b = self._factors[seed][block.slot.index]
                m = st["momentum_factor"][block.r0 : block.r1]
                u = self.row_factor(block, a)
            else:
                m, u = block.view(st["momentum"]), noises[0][0]
            # the momentum's steps while the layer was sampled out (layer_fraction), applied now
            for proj, coef, decay, vt in segments:
                if proj is not None:
                    m.copy_(low_rank_product(m, proj))
                block.param.add_(m if vt is None else low_rank_product(m, vt), alpha=-lr * coef)
                m.mul_(decay)
            if first:
                m.copy_(u).mul_(c)
            else:
                if final is not None:
                    m.copy_(low_rank_product(m, final))
                m.mul_(beta).add_(u, alpha=(1.0 - beta) * c)
            block.decay_weights()
            block.param.add_(m if "momentum" in st else low_rank_product(m, b), alpha=-lr)

        self._ensure_factors([seed])
        self._update([seed], kernel)
        for slot in active:
            self.state[slot.param]["last_step"] = self.step_count
        return 0.5 * (plus + minus)
