"""Sparse-MeZO (Liu et al., arXiv 2402.15751): ZO-SGD on the small-magnitude weights only.

Per tensor a threshold h is fixed at the first step: the k-th smallest |theta| with
k = round((1 - sparsity) n) (a tensor whose threshold is 0, such as LoRA's zero-initialised B, is
perturbed whole). Every step perturbs and updates only the weights at or below it, with the mask
taken from the current (unperturbed) weights:

    u = 1[|theta| <= h] * z,  c = (L(theta + eps u) - L(theta - eps u)) / (2 eps)
    theta <- theta - lr c u

The mask is computed in the first pass of a step, from the unperturbed weights, and kept for
the step's other passes (1 byte per perturbed weight, dropped at the end of the step): with
in-place perturbation |theta + eps z| no longer tells which weights were below h
(docs/methods.md, "Sparse-MeZO").
"""

from __future__ import annotations

import math

import torch

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer, check_range


def magnitude_threshold(param: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The k-th smallest |theta| of a tensor, k = max(1, round((1 - sparsity) n)): the weights at
    or below it are the ones Sparse-MeZO perturbs (ties may add a few). A threshold of 0 (at least
    k zeros, e.g. LoRA's zero-initialised B) is +inf, the whole tensor: with h = 0 its weights
    would leave the mask at their first update and never move again."""
    flat = param.detach().abs().flatten()
    k = min(flat.numel(), max(1, math.floor((1.0 - sparsity) * flat.numel() + 0.5)))
    h = flat.kthvalue(k).values
    return torch.full_like(h, math.inf) if h == 0 else h


class SparseMeZO(ZOOptimizer):
    """Sparse-MeZO. 2 forwards; state: one threshold per tensor (+ a transient 1-byte mask per weight).

    Args:
        lr: learning rate (small weights tolerate larger steps than MeZO's, per the paper).
        eps: perturbation scale.
        sparsity: fraction of each tensor that is *not* perturbed (the largest weights).
        weight_decay: decoupled decay (MeZO's form).
    """

    aliases = ("sparse-mezo", "s-mezo", "smezo", "sparse_mezo")
    summary = "ZO-SGD along u = 1[|theta| <= h] z, h = per-tensor magnitude quantile (1 - sparsity)"
    lr_by_mode = {"full": 1e-6, "lora": 5e-5, "prefix": 1e-2}  # MeZO's: the paper tunes lr per task
    reference = "zotune.optim.reference_sparse:RefSparseMeZO"
    test_kwargs = {"lr": 1e-2, "sparsity": 0.5}

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, sparsity: float = 0.75,
                 weight_decay: float = 0.0, **engine):
        check_range("sparsity", sparsity, 0.0, 1.0)
        self.sparsity = float(sparsity)
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, **engine)

    def init_state(self, param: torch.Tensor, state: dict) -> None:
        local, _, shape = self.comm.local_rows(param)
        if tuple(local.shape[:1]) != tuple(shape[:1]):
            raise ValueError("SparseMeZO does not support row-sharded parameters (a threshold needs the whole tensor)")
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        source = state.get("master", param)  # a low-precision parameter's fp32 master
        state["threshold"] = magnitude_threshold(source.to(dtype), self.sparsity)

    def direction(self, block: Block, noise: list[torch.Tensor]) -> torch.Tensor:
        key = (block.slot.index, block.r0)
        mask = self._masks.get(key)
        if mask is None:  # the step's first pass: the weights are not displaced yet
            mask = self._masks[key] = block.param.abs() <= block.state["threshold"]
        return noise[0] * mask

    def _zo_step(self, closure: Closure) -> float:
        self._masks = {}
        seed = self._seed()
        plus, minus, c = self._spsa(closure, seed)

        def kernel(block: Block, noises: Noises) -> None:
            u = self.direction(block, noises[0])
            block.decay_weights()
            block.param.add_(u, alpha=-block.group["lr"] * c)

        try:
            self._update([seed], kernel)
        finally:
            self._masks = {}
        return 0.5 * (plus + minus)
