"""Reference oracles of FZOO and Sparse-MeZO (see :mod:`zotune.optim.reference`).

Each materialises every direction in full and writes the update exactly as docs/methods.md
("FZOO", "Sparse-MeZO") does. One parameter group, no sharding.
"""

from __future__ import annotations

import math

import torch

from zotune.optim.reference import Closure, ReferenceZO


class RefFZOO(ReferenceZO):
    """FZOO: l0, N one-sided losses, population std, theta -= lr sum (l_i - l0)/(N sigma) u_i."""

    def _step(self, closure: Closure) -> None:
        n = int(self.hp.get("n_queries", 8))
        l0 = self.loss_at(closure, None)
        directions = [self.noise(sample=i) for i in range(n)]
        losses = [self.loss_at(closure, [self.eps * u for u in us]) for us in directions]
        mean = sum(losses) / n
        sigma = math.sqrt(sum((x - mean) ** 2 for x in losses) / n)
        self.decay()
        if sigma == 0:
            return
        for us, loss in zip(directions, losses):
            for p, u in zip(self.params, us):
                p.sub_(self.hp["lr"] * (loss - l0) / (n * sigma) * u)


def _threshold(param: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The k-th smallest |theta| (by a full sort), k = max(1, round((1 - sparsity) n))."""
    ordered = torch.sort(param.detach().abs().flatten()).values
    k = min(ordered.numel(), max(1, math.floor((1.0 - sparsity) * ordered.numel() + 0.5)))
    return ordered[k - 1]


class RefSparseMeZO(ReferenceZO):
    """Sparse-MeZO: per-tensor thresholds from the first step's weights; each step
    u = 1[|theta| <= h] z, ZO-SGD along u."""

    def _step(self, closure: Closure) -> None:
        sparsity = float(self.hp.get("sparsity", 0.75))
        for st, p in zip(self.state, self.params):
            if "threshold" not in st:
                st["threshold"] = _threshold(p, sparsity)
        masks = [(p.abs() <= st["threshold"]).to(p.dtype) for p, st in zip(self.params, self.state)]
        u = [m * z for m, z in zip(masks, self.noise())]
        c = self.spsa(closure, u)
        self.decay()
        for p, uk in zip(self.params, u):
            p.sub_(self.hp["lr"] * c * uk)
