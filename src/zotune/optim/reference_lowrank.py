"""Reference oracles of LOZO, LOZO-M, SubZero and ZO-Muon (see :mod:`zotune.optim.reference`).

Each builds the full factors of every matrix with the same seeds as the fast code
(:func:`zotune.optim.lowrank.step_seed` / :func:`~zotune.optim.lowrank.window_seed`), forms the
whole m x n perturbation, evaluates losses at explicit points and writes the update as the
papers do, one parameter at a time, with no blocks, threads or caches. One parameter group.
"""

from __future__ import annotations

import math

import torch

from zotune.optim.lowrank import gaussian, matrix_dims, newton_schulz5, orthonormal, step_seed, window_seed
from zotune.optim.noise import mix_seed
from zotune.optim.reference import Closure, ReferenceZO


class _RefMatrix(ReferenceZO):
    """Shared: which parameters are matrices, and their factors by seed and window."""

    def dims(self, p: torch.Tensor) -> tuple[int, int] | None:
        return matrix_dims(tuple(p.shape))

    def step_seed(self, sample: int = 0) -> int:
        return mix_seed(self.seed, self.step_count, sample)

    def step_gaussian(self, k: int, sample: int, rows: int, cols: int) -> torch.Tensor:
        return gaussian(step_seed(self.step_seed(sample), k), rows, cols, dtype=self.params[k].dtype)

    def window_factor(self, k: int, name: str, window: int, rows: int, cols: int, orth: bool) -> torch.Tensor:
        make = orthonormal if orth else gaussian
        return make(window_seed(self.seed, name, window, k), rows, cols, dtype=self.params[k].dtype)

    def dense(self, sample: int = 0) -> list[torch.Tensor]:
        return self.noise(sample=sample)

    def directions(self, matrix_direction, sample: int = 0) -> list[torch.Tensor]:
        """Full directions: ``matrix_direction(k, m, n)`` for matrices, dense z for the rest."""
        z = self.dense(sample)
        out = []
        for k, p in enumerate(self.params):
            dims = self.dims(p)
            out.append(z[k] if dims is None else matrix_direction(k, *dims).reshape(p.shape))
        # layer_fraction: layers outside the step's subset are not perturbed
        return [torch.zeros_like(u) if k in getattr(self, "frozen", ()) else u for k, u in enumerate(out)]

    def sgd(self, closure: Closure, directions: list[torch.Tensor]) -> None:
        c = self.spsa(closure, directions)
        self.decay()
        for p, u in zip(self.params, directions):
            p.sub_(self.hp["lr"] * c * u)


class RefLOZO(_RefMatrix):
    def u_v(self, k: int, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.hp.get("rank", 2)
        window = self.step_count // self.hp.get("interval", 50)
        return self.step_gaussian(k, 0, m, r), self.window_factor(k, "lozo.V", window, n, r, orth=False)

    def _step(self, closure: Closure) -> None:
        def direction(k, m, n):
            u, v = self.u_v(k, m, n)
            return u @ v.T

        self.sgd(closure, self.directions(direction))


class RefLOZOM(RefLOZO):
    def catch_up(self, k: int, beta: float, lr: float, nu: int) -> None:
        """LOZO-M's rule on the steps parameter k was sampled out, replayed one step at a time:
        no estimate (c = 0), so the momentum decays (projected at each refresh of V) and moves W."""
        st, p, dims = self.state[k], self.params[k], self.dims(self.params[k])
        t0 = st.get("t0")
        if t0 is None:
            return
        for s in range(t0 + 1, self.step_count):
            if dims is None:
                st["m"] = beta * st["m"]
                p.sub_(lr * st["m"])
                continue
            n, r = dims[1], st["M"].shape[1]
            v = self.window_factor(k, "lozo.V", s // nu, n, r, orth=False)
            if s % nu == 0:
                v_old = self.window_factor(k, "lozo.V", s // nu - 1, n, r, orth=False)
                st["M"] = st["M"] @ v_old.T @ v / n
            st["M"] = beta * st["M"]
            p.sub_(lr * (st["M"] @ v.T).reshape(p.shape))

    def _step(self, closure: Closure) -> None:
        beta, lr, nu = self.hp.get("beta", 0.9), self.hp["lr"], self.hp.get("interval", 50)

        def direction(k, m, n):
            u, v = self.u_v(k, m, n)
            return u @ v.T

        c = self.spsa(closure, self.directions(direction))
        z = self.dense()
        if self.updates:
            for k in range(len(self.params)):
                if k not in self.frozen:
                    self.catch_up(k, beta, lr, nu)
        self.decay()
        for k, p in enumerate(self.params):
            st, dims = self.state[k], self.dims(p)
            st["t0"] = self.step_count  # (put back for the step's sampled-out layers by step())
            if dims is None:
                g = c * z[k]
                st["m"] = g if self.updates == 0 else beta * st.get("m", torch.zeros_like(p)) + (1 - beta) * g
                p.sub_(lr * st["m"])
                continue
            m, n = dims
            u, v = self.u_v(k, m, n)
            if self.updates == 0:
                st["M"] = c * u
            else:
                st.setdefault("M", torch.zeros_like(u))  # a layer sampled out until now
                if self.step_count % nu == 0 and self.step_count > 0:
                    v_old = self.window_factor(k, "lozo.V", self.step_count // nu - 1, n, v.shape[1], orth=False)
                    st["M"] = st["M"] @ v_old.T @ v / n
                st["M"] = beta * st["M"] + (1 - beta) * c * u
            p.sub_(lr * (st["M"] @ v.T).reshape(p.shape))


class RefSubZero(_RefMatrix):
    def _step(self, closure: Closure) -> None:
        def direction(k, m, n):
            r = min(self.hp.get("rank", 24), m, n)
            window = self.step_count // self.hp.get("interval", 1000)
            u = self.window_factor(k, "subzero.U", window, m, r, orth=True)
            v = self.window_factor(k, "subzero.V", window, n, r, orth=True)
            core = self.step_gaussian(k, 0, r, r)
            return math.sqrt(m * n) / r * (u @ core @ v.T)

        self.sgd(closure, self.directions(direction))


class RefZOMuon(_RefMatrix):
    def _step(self, closure: Closure) -> None:
        n_q, eps, lr = int(self.hp.get("queries", 4)), self.eps, self.hp["lr"]
        rank, window = self.hp.get("rank", 64), self.step_count // self.hp.get("interval", 100)
        basis = {}
        for k, p in enumerate(self.params):
            dims = self.dims(p)
            if dims is not None:
                basis[k] = self.window_factor(k, "zomuon.P", window, dims[0], min(rank, dims[0]), orth=True)
        l0 = self.loss_at(closure, None)
        us, zs, grads = [], [], []
        for i in range(n_q):
            u = {k: self.step_gaussian(k, i, b.shape[1], self.dims(self.params[k])[1]) for k, b in basis.items()}
            z = self.dense(sample=i)
            offsets = [torch.zeros_like(p) if k in getattr(self, "frozen", ()) else
                       eps * (basis[k] @ u[k]).reshape(p.shape) if k in basis else eps * z[k]
                       for k, p in enumerate(self.params)]
            grads.append((self.loss_at(closure, offsets) - l0) / eps)
            us.append(u)
            zs.append(z)
        wd = self.hp.get("weight_decay", 0.0)
        for k, p in enumerate(self.params):
            if k in basis:
                g = sum(grads[i] * us[i][k] for i in range(n_q)) / n_q
                o = newton_schulz5(g) if self.hp.get("orthogonalize", True) else g
                p.sub_(lr * ((basis[k] @ o).reshape(p.shape) + wd * p))
            else:
                vlr = lr * self.hp.get("vector_lr_scale", 1e-5)
                p.sub_(vlr * (sum(grads[i] * zs[i][k] for i in range(n_q)) / n_q + wd * p))

