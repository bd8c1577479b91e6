"""FZOO (Dang et al. 2025, arXiv 2506.09034; code DKmiyan/FZOO): N one-sided Rademacher queries,
the step normalised by the standard deviation of their losses.

Per step, with u_1 ... u_N Rademacher directions of the step seed:

    l0    = L(theta),   l_i = L(theta + eps u_i)                       # N + 1 forwards
    sigma = std(l_1, ..., l_N)                                           # population std
    theta <- theta - lr sum_i (l_i - l0) / (N sigma) u_i

On a locally linear loss l_i - l0 = eps g.u_i and sigma = eps std_i(g.u_i), so the step does not
depend on eps or on |g|: a normalised step, of norm about lr sqrt(d / N) for d weights. As in the authors'
code, the projected gradients are divided by sigma and not by eps (docs/methods.md, "FZOO").
"""

from __future__ import annotations

import math

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer, check_positive_int


class FZOO(ZOOptimizer):
    """FZOO: N + 1 forwards per step (N = ``n_queries``), no state.

    Args:
        lr: learning rate (the authors' script: 1e-5 for full-parameter OPT, eps 1e-3, N 8).
        eps: perturbation scale.
        n_queries: one-sided queries per step (N >= 2: sigma needs two losses).
        weight_decay: decoupled decay (MeZO's form; the authors' code has none).
        distribution: ``"rademacher"`` (the paper's) or ``"gaussian"``.
    """

    aliases = ("fzoo",)
    summary = "N one-sided Rademacher queries; theta -= lr sum_i (l_i - l0) u_i / (N std(l))"
    forwards_per_step = 9
    lr_by_mode = {"full": 1e-5}  # the authors' fzoo.sh (OPT-1.3B, full parameters)
    reference = "zotune.optim.reference_sparse:RefFZOO"
    test_kwargs = {"lr": 1e-3, "n_queries": 4, "distribution": "rademacher"}

    def __init__(self, params, lr: float = 1e-5, eps: float = 1e-3, n_queries: int = 8,
                 weight_decay: float = 0.0, distribution: str = "rademacher", **engine):
        check_positive_int("n_queries", n_queries)
        if n_queries < 2:
            raise ValueError(f"n_queries must be >= 2 (the step divides by the std of the losses), got {n_queries}")
        self.n_queries = int(n_queries)
        self.forwards_per_step = self.n_queries + 1
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, distribution=distribution,
                         **engine)

    def _zo_step(self, closure: Closure) -> float:
        n = self.n_queries
        (l0,) = self._reduce(self._forward(closure))
        seeds = [self._seed(i) for i in range(n)]
        losses = []
        for i, seed in enumerate(seeds):
            self._displace(seed, self.eps)
            (loss,) = self._reduce(self._forward(closure))
            losses.append(loss)
            if i < n - 1:  # the last displacement is undone by the update pass itself
                self._restore(seed)
        mean = sum(losses) / n
        sigma = math.sqrt(sum((x - mean) ** 2 for x in losses) / n)
        # all N losses equal: no direction information, no step (the code would divide by 0)
        coefs = [(x - l0) / (n * sigma) if sigma > 0 else 0.0 for x in losses]
        self.zo_state["last_losses"] = [l0, *losses]
        self.zo_state["last_projected_grads"] = coefs

        def kernel(block: Block, noises: Noises) -> None:
            block.decay_weights()
            lr = block.group["lr"]
            for c, noise in zip(coefs, noises):
                if c:
                    block.param.add_(noise[0], alpha=-lr * c)

        self._update(seeds, kernel)
        return l0
