"""Reference oracles of FZOO, Sparse-MeZO and DiZO (see :mod:`zotune.optim.reference`).

Each materialises every direction in full and writes the update exactly as docs/methods.md
("FZOO", "Sparse-MeZO", "DiZO") does. One parameter group, no sharding.
"""

from __future__ import annotations

import math

import torch

from zotune.optim.noise import mix_seed
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
    """The k-th smallest |theta| (by a full sort), k = max(1, round((1 - sparsity) n)); 0 means
    no magnitudes to select by (a zero-initialised tensor): +inf, every weight."""
    ordered = torch.sort(param.detach().abs().flatten()).values
    k = min(ordered.numel(), max(1, math.floor((1.0 - sparsity) * ordered.numel() + 0.5)))
    return ordered[k - 1] if ordered[k - 1] > 0 else torch.tensor(math.inf, dtype=ordered.dtype)


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


class RefDiZO(ReferenceZO):
    """DiZO: ZO-SGD steps; every (interval + 1)-th step a K-iteration search of one scale per matrix."""

    SAMPLE = (1 << 40) + 2  # the projection z's mix_seed slot, as the fast code

    def _step(self, closure: Closure) -> None:
        for st, p in zip(self.state, self.params):
            if p.dim() >= 2:
                st.setdefault("anchor", p.detach().clone())
        interval = int(self.hp.get("interval", 50))
        if self.step_count % (interval + 1) != interval:
            z = self.noise()
            c = self.spsa(closure, z)
            self.decay()
            for p, zk in zip(self.params, z):
                p.sub_(self.hp["lr"] * c * zk)
            return
        self._project(closure)

    def _project(self, closure: Closure) -> None:
        tau = self.hp.get("clip_range", 0.2)
        eps_g, size = self.hp.get("projection_eps", 0.1), self.hp.get("projection_step", 2.0)
        proj = [k for k, p in enumerate(self.params) if p.dim() >= 2 and k not in self.frozen]
        anchor = {k: self.state[k]["anchor"] for k in proj}
        t = {k: float((self.params[k] - anchor[k]).norm()) for k in proj}
        gamma = dict(t)
        for it in range(int(self.hp.get("projection_iters", 10))):
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.step_count, self.SAMPLE, it))
            normal = torch.randn(len(self.params), generator=gen, dtype=torch.float64)
            z = {k: min(max(float(normal[k]), -tau / eps_g * t[k]), tau / eps_g * t[k]) for k in proj}

            def offsets(sign: float, gamma: dict = gamma, z: dict = z) -> list[torch.Tensor]:
                out = [torch.zeros_like(p) for p in self.params]
                for k in proj:
                    p = self.params[k]
                    scale = (gamma[k] + sign * eps_g * z[k]) / (t[k] + 1e-8)
                    out[k] = anchor[k] + (p - anchor[k]) * scale - p
                return out

            grad = (self.loss_at(closure, offsets(1.0)) - self.loss_at(closure, offsets(-1.0))) / (2 * eps_g)
            gamma = {k: min(max(gamma[k] - size * t[k] * grad * z[k], (1 - tau) * t[k]), (1 + tau) * t[k])
                     for k in proj}
        for k in proj:
            p = self.params[k]
            p.copy_(anchor[k] + (p - anchor[k]) * (gamma[k] / (t[k] + 1e-8)))
