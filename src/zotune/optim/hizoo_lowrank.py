"""HiZOO-L (Zhao et al., ICLR 2025, Appendix D): HiZOO with an Adafactor-factored Hessian.

Each matrix parameter (>= 2-D, viewed as m rows of n = numel / m elements) stores row and
column factors R (m) and C (n) instead of a full h (docs/methods.md, "HiZOO-L"):

    h_ij  = R_i C_j / sum(R)                    # rank 1; R = n 1, C = m 1 at init, so h = 1
    est   = (l+ + l- - 2 l0) / (2 eps^2) * h_{t-1} * (z^2 - k)      # as HiZOO, per element
    R_t   = (1 - alpha_t) R_{t-1} + alpha_t |est| 1_n                # row sums of |est|
    C_t   = (1 - alpha_t) C_{t-1} + alpha_t 1_m^T |est|              # column sums of |est|
    theta <- theta - lr ((l+ - l-) / (2 eps) * z / sqrt(h_t) + wd theta)

1-D tensors (biases, norms) and matrices with a single row or column keep a full vector h,
as Adafactor does. The |.| is taken before the sums (positive factors). Since both factors
sum the same |est|, sum(R) = sum(C) is preserved and R C^T / sum(R) has the right row and
column sums.

Passes per step: 3 forwards and 4 regenerations of z (+eps, -2eps, one pass that forms the
row and column sums of |est|, then the fused restore + update, which needs the new C of all
blocks and therefore cannot be the same pass).
"""

from __future__ import annotations

import math

import torch

from zotune.optim.engine import Block, Closure, Noises
from zotune.optim.hizoo import HiZOO
from zotune.optim.lowrank import matrix_dims


class HiZOOLowRank(HiZOO):
    """HiZOO-L. 3 forwards, state: R, C per matrix (O(m + n)), a full h for 1-D tensors.

    Args:
        params: parameters, parameter groups, or an ``nn.Module``. Not for row-sharded
            (FSDP) parameters: the factors need the whole matrix.
        lr, eps, alpha, weight_decay, trace_correction, alpha_schedule, alpha_decay_steps:
            as :class:`~zotune.optim.HiZOO` (the paper gives HiZOO's values).
        h_min, h_max: clamp the effective h (the rank-1 product, or the full vector).
        **engine: see :class:`~zotune.optim.engine.ZOOptimizer`.

    Example:
        >>> import torch
        >>> from zotune.optim import HiZOOLowRank
        >>> w = torch.nn.Parameter(torch.ones(4, 3))
        >>> opt = HiZOOLowRank([w], lr=0.01, alpha=0.01, seed=0)
        >>> for _ in range(50):
        ...     _ = opt.step(lambda: (w ** 2).sum())
        >>> sorted(opt.state[w])[:2]
        ['_initialised', 'col']
    """

    aliases = ("hizoo-l", "hizool", "hizoo-lowrank", "hizoo_l")
    summary = "HiZOO with h ~ R C^T / sum(R) per matrix (Adafactor factors, |est| row/col sums)"
    forwards_per_step = 3
    state_buffers = ()  # R and C are O(rows + cols) per matrix; 1-D tensors keep a full h
    lr_by_mode = {"full": 1e-6, "lora": 1e-5, "prefix": 1e-2}  # starting points from the HiZOO paper
    reference = "zotune.optim.reference_methods:RefHiZOOLowRank"
    test_kwargs = dict(lr=1e-2, alpha=1e-2)
    bench_variants = ()  # HiZOO's lazy refresh (hessian_every) is not implemented for the factored h

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        alpha: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        trace_correction: bool = False,
        h_min: float | None = None,
        h_max: float | None = None,
        alpha_schedule: str = "constant",
        alpha_decay_steps: float | None = None,
        **engine,
    ):
        unsupported = sorted(set(engine) & {"abs_after_ema", "n_samples", "warmup_probes", "hessian_every"})
        if unsupported:
            raise ValueError(f"HiZOOLowRank does not support {unsupported} (use HiZOO)")
        super().__init__(
            params, lr=lr, eps=eps, alpha=alpha, weight_decay=weight_decay,
            trace_correction=trace_correction, h_min=h_min, h_max=h_max,
            alpha_schedule=alpha_schedule, alpha_decay_steps=alpha_decay_steps, **engine,
        )

    @staticmethod
    def factored_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
        """(rows, row_len) if a parameter of this shape gets R/C factors, else None."""
        return matrix_dims(shape)  # the same rule as the low-rank perturbation methods

    def init_state(self, param: torch.Tensor, state: dict) -> None:
        local, _, global_shape = self.comm.local_rows(param)
        dims = self.factored_shape(tuple(global_shape))
        if dims is None:
            state["hessian"] = self.zeros_state(param, 1.0)
            return
        if tuple(local.shape) != tuple(global_shape):
            raise ValueError("HiZOOLowRank does not support row-sharded parameters (use HiZOO)")
        m, n = dims
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        state["row"] = torch.full((m,), float(n), dtype=dtype, device=local.device)
        state["col"] = torch.full((n,), float(m), dtype=dtype, device=local.device)
        state["row_total"] = float(m * n)  # sum(R), kept as a float (deterministic)

    def _product(self, block: Block, row: torch.Tensor, col: torch.Tensor, total: float) -> torch.Tensor:
        """The block's rows of h = R C^T / sum(R), clamped to [h_min, h_max] (one pass over the block)."""
        h = torch.outer(row[block.r0 : block.r1] / total, col)
        g = block.group
        if g["h_min"] is not None or g["h_max"] is not None:
            h.clamp_(min=g["h_min"], max=g["h_max"])
        return h

    def _root_product(self, block: Block, row: torch.Tensor, col: torch.Tensor, total: float) -> torch.Tensor:
        """sqrt(h) of the block as the outer product of the factors' square roots (one pass)."""
        root = torch.outer((row[block.r0 : block.r1] / total).sqrt_(), col.sqrt())
        g = block.group
        if g["h_min"] is not None or g["h_max"] is not None:
            root.clamp_(min=None if g["h_min"] is None else math.sqrt(g["h_min"]),
                        max=None if g["h_max"] is None else math.sqrt(g["h_max"]))
        return root

    def root_h(self, block: Block) -> torch.Tensor:
        st = block.state
        if "row" in st:
            return self._root_product(block, st["row"], st["col"], st["row_total"])
        return super().root_h(block)

    def _zo_step(self, closure: Closure) -> float:
        (l0,) = self._reduce(self._forward(closure))
        seed = self._seed()
        grads, second = self._probe(closure, [seed], l0)
        self.zo_state["last_projected_grads"] = grads
        c = grads[0]
        scales = [second[0] / (2.0 * self.eps**2)]
        alphas = [self.alpha_at(g) for g in self.param_groups]
        hook = self.estimate_hook
        slots = [s for s in self.active_slots() if "row" in self.state[s.param]]  # layer subset only
        row_sums = {s.index: torch.zeros_like(self.state[s.param]["row"]) for s in slots}
        col_parts: dict[tuple[int, int], torch.Tensor] = {}

        def sums(block: Block, noises: Noises) -> None:  # pass 3: row/column sums of |est|
            st = block.state
            if "row" not in st:
                return
            est = self._estimate(noises, scales, self._product(block, st["row"], st["col"], st["row_total"]))
            if hook is not None:
                hook(block, est.full())
            magnitude = est.values if est.nonnegative else est.values.abs_()
            row_sums[block.slot.index][block.r0 : block.r1] = magnitude.sum(dim=1).mul_(abs(est.scale))
            col_parts[(block.slot.index, block.r0)] = magnitude.sum(dim=0).mul_(abs(est.scale))

        self._sweep([seed], sums)
        new: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for s in slots:
            st, a = self.state[s.param], alphas[s.group_index]
            col_sum = torch.zeros_like(st["col"])
            for key in sorted(k for k in col_parts if k[0] == s.index):  # fixed order: deterministic
                col_sum.add_(col_parts[key])
            row = st["row"].mul(1.0 - a).add_(row_sums[s.index], alpha=a)
            col = st["col"].mul(1.0 - a).add_(col_sum, alpha=a)
            new[s.index] = (row, col, float(row.double().sum()))

        def kernel(block: Block, noises: Noises) -> None:  # pass 4: restore + update
            st = block.state
            if "row" in st:
                root = self._root_product(block, *new[block.slot.index])
            else:
                h = block.view(st["hessian"])
                est = self._estimate(noises, scales, h)
                if hook is not None:
                    hook(block, est.full())
                self._store_h(h, est, alphas[block.slot.group_index], block.group)
                root = torch.sqrt(h, out=est.values)
            self._descend(block, noises, [c], root)

        self._update([seed], kernel)
        for s in slots:
            st = self.state[s.param]
            row, col, total = new[s.index]
            st["row"].copy_(row)
            st["col"].copy_(col)
            st["row_total"] = total
        return l0
