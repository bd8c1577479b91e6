"""Reference oracles of HiZOO, HiZOO-L, ZO-AdaMU and HELENE (see :mod:`zotune.optim.reference`).

Each materialises z, forms every quantity as a full tensor and writes the update exactly as
docs/methods.md (sections HiZOO, HiZOO-L, ZO-AdaMU, HELENE) does. One parameter group, no sharding.
"""

from __future__ import annotations

import math

import torch

from zotune.optim.reference import Closure, ReferenceZO

# same constants as the fast implementations (part of their documented behaviour)
_H_FLOOR = 1e-4
_WARMUP_OFFSET = 1 << 20


class RefHiZOO(ReferenceZO):
    """HiZOO: the 2025-code estimator, the paper's (z^2 - 1) form, PeFoo's abs-after-EMA,
    clamping, warm start, alpha schedules, and HiZOO-multi (docs/methods.md, "HiZOO").

    ``multi_formula=True`` forces the n-sample formulas even for n = 1.
    """

    def _effective(self, h: torch.Tensor) -> torch.Tensor:
        if not self.hp.get("abs_after_ema", False):
            return h
        floor = self.hp.get("h_min")
        return h.abs().clamp(min=_H_FLOOR if floor is None else floor, max=self.hp.get("h_max"))

    def _clamp(self, h: torch.Tensor) -> torch.Tensor:
        lo, hi = self.hp.get("h_min"), self.hp.get("h_max")
        if self.hp.get("abs_after_ema", False):
            return h if hi is None else h.clamp(-hi, hi)
        return h if lo is None and hi is None else h.clamp(lo, hi)

    def _alpha(self) -> float:
        alpha, t = self.hp.get("alpha", 1e-6), self.updates
        schedule = self.hp.get("alpha_schedule", "constant")
        if schedule == "constant" or alpha == 0:
            return alpha
        horizon = self.hp.get("alpha_decay_steps") or 1.0 / alpha
        if schedule == "harmonic":
            return alpha / (1.0 + t / horizon)
        return alpha * max(0.0, 1.0 - t / horizon)

    def _second_differences(self, closure: Closure, zs: list[list[torch.Tensor]], h: list[torch.Tensor],
                            l0: float) -> tuple[list[float], list[float]]:
        grads, second = [], []
        for z in zs:
            u = [zk / self._effective(hk).sqrt() for zk, hk in zip(z, h)]
            plus = self.loss_at(closure, [self.eps * uk for uk in u])
            minus = self.loss_at(closure, [-self.eps * uk for uk in u])
            grads.append((plus - minus) / (2 * self.eps))
            second.append(plus + minus - 2 * l0)
        return grads, second

    def _sigma_prime(self, zs, second, h) -> list[torch.Tensor]:
        """diag Sigma' = (1/2n) sum_i dL_i / eps^2 * h (z_i^2 - k), per parameter."""
        k = 1.0 if self.hp.get("trace_correction", False) else 0.0
        n = len(zs)
        return [
            sum(second[i] / (2 * n * self.eps**2) * self._effective(h[j]) * (zs[i][j] ** 2 - k) for i in range(n))
            for j in range(len(self.params))
        ]

    def _new_h(self, h: torch.Tensor, est: torch.Tensor, alpha: float) -> torch.Tensor:
        if self.hp.get("abs_after_ema", False):
            return self._clamp((1 - alpha) * h + alpha * est)
        return self._clamp((1 - alpha) * h + alpha * est.abs())

    def _step(self, closure: Closure) -> None:
        for st, p in zip(self.state, self.params):
            st.setdefault("h", torch.ones_like(p))
        h = [st["h"] for st in self.state]
        n = int(self.hp.get("n_samples", 1))
        if self.updates % int(self.hp.get("hessian_every", 1)):
            # between h refreshes: two-point probes with the frozen h, the same preconditioned step
            zs = [self.noise(sample=i) for i in range(n)]
            grads = []
            for z in zs:
                u = [zk / self._effective(hk).sqrt() for zk, hk in zip(z, h)]
                plus = self.loss_at(closure, [self.eps * uk for uk in u])
                minus = self.loss_at(closure, [-self.eps * uk for uk in u])
                grads.append((plus - minus) / (2 * self.eps))
            self.decay()
            for j, p in enumerate(self.params):
                p.sub_(self.hp["lr"] / n * sum(grads[i] * zs[i][j] for i in range(n)) / self._effective(h[j]).sqrt())
            return
        l0 = self.loss_at(closure, None)
        probes = int(self.hp.get("warmup_probes", 0))
        if probes and not self.hp.get("_warm", False):
            zs = [self.noise(sample=_WARMUP_OFFSET + i) for i in range(probes)]
            _, second = self._second_differences(closure, zs, h, l0)
            est = self._sigma_prime(zs, second, h)
            h = [self._new_h(hk, ek, 1.0) for hk, ek in zip(h, est)]
            if not self.hp.get("abs_after_ema", False) and self.hp.get("h_min") is None:
                h = [hk.clamp(min=_H_FLOOR) for hk in h]
            self.hp["_warm"] = True
        zs = [self.noise(sample=i) for i in range(n)]
        grads, second = self._second_differences(closure, zs, h, l0)
        alpha, lr = self._alpha(), self.hp["lr"]
        if n == 1 and not self.hp.get("multi_formula", False):
            # the single-sample formulas of docs/methods.md ("HiZOO"), literally
            z, d, c = zs[0], second[0], grads[0]
            if self.hp.get("trace_correction", False) or self.hp.get("abs_after_ema", False):
                k = 1.0 if self.hp.get("trace_correction", False) else 0.0
                est = [d / (2 * self.eps**2) * self._effective(hk) * (zk * zk - k) for hk, zk in zip(h, z)]
                h = [self._new_h(hk, ek, alpha) for hk, ek in zip(h, est)]
            else:
                h = [self._clamp((1 - alpha) * hk + abs(d) * hk * zk * zk * alpha / (2 * self.eps**2))
                     for hk, zk in zip(h, z)]
            self.decay()
            for p, hk, zk in zip(self.params, h, z):
                p.sub_(lr * c * zk / self._effective(hk).sqrt())
        else:
            est = self._sigma_prime(zs, second, h)
            h = [self._new_h(hk, ek, alpha) for hk, ek in zip(h, est)]
            self.decay()
            for j, p in enumerate(self.params):
                p.sub_(lr / n * sum(grads[i] * zs[i][j] for i in range(n)) / self._effective(h[j]).sqrt())
        for st, hk in zip(self.state, h):
            st["h"] = hk


class RefHiZOOLowRank(RefHiZOO):
    """HiZOO-L (docs/methods.md, "HiZOO-L"): h = R C^T / sum(R) for matrices, a full h for the rest."""

    def _h(self, k: int) -> torch.Tensor:
        st = self.state[k]
        if "R" in st:
            h = torch.outer(st["R"], st["C"]) / st["R"].sum()
            h = h.view(self.params[k].shape)
        else:
            h = st["h"]
        lo, hi = self.hp.get("h_min"), self.hp.get("h_max")
        return h if lo is None and hi is None else h.clamp(lo, hi)

    def _step(self, closure: Closure) -> None:
        for p, st in zip(self.params, self.state):
            if st:
                continue
            rows = p.shape[0] if p.dim() else 1
            cols = p.numel() // max(rows, 1)
            if p.dim() >= 2 and rows >= 2 and cols >= 2:
                st["R"] = torch.full((rows,), float(cols), dtype=p.dtype)
                st["C"] = torch.full((cols,), float(rows), dtype=p.dtype)
            else:
                st["h"] = torch.ones_like(p)
        z = self.noise()
        h = [self._h(k) for k in range(len(self.params))]
        l0 = self.loss_at(closure, None)
        u = [zk / hk.sqrt() for zk, hk in zip(z, h)]
        plus = self.loss_at(closure, [self.eps * uk for uk in u])
        minus = self.loss_at(closure, [-self.eps * uk for uk in u])
        c = (plus - minus) / (2 * self.eps)
        k_tr = 1.0 if self.hp.get("trace_correction", False) else 0.0
        alpha = self._alpha()
        for k in range(len(self.params)):
            sigma = (plus + minus - 2 * l0) / (2 * self.eps**2) * h[k] * (z[k] ** 2 - k_tr)
            st = self.state[k]
            if "R" in st:
                a = sigma.abs().reshape(st["R"].numel(), -1)
                st["R"] = (1 - alpha) * st["R"] + alpha * a.sum(dim=1)
                st["C"] = (1 - alpha) * st["C"] + alpha * a.sum(dim=0)
            else:
                st["h"] = (1 - alpha) * st["h"] + alpha * sigma.abs()
                lo, hi = self.hp.get("h_min"), self.hp.get("h_max")
                if lo is not None or hi is not None:
                    st["h"] = st["h"].clamp(lo, hi)
        self.decay()
        for k, p in enumerate(self.params):
            p.sub_(self.hp["lr"] * c * z[k] / self._h(k).sqrt())


class RefZOAdaMU(ReferenceZO):
    """ZO-AdaMU, Algorithm 1 with the pure-function anneal (docs/methods.md, "ZO-AdaMU")."""

    def _coefficients(self) -> tuple[float, float, float]:
        if self.hp.get("fixed") is not None:
            return tuple(self.hp["fixed"])  # type: ignore[return-value]
        t = self.updates + 1
        t3 = self.hp.get("total_steps", 20000)
        t1 = self.hp.get("t1", 1024)
        t2 = self.hp.get("t2") or int(0.8 * t3)
        if t >= t2 and self.hp.get("phase3", "frozen") == "paper":
            return 0.5, 0.9, 0.01
        out = []
        for phi in self.hp.get("phi", (1.0, 0.1, 1.5)):
            if t < t1:
                out.append(1.0)
            else:
                s = min(t, t2)
                out.append(0.5 + 0.5 * math.cos(math.pi * (s - t1) / (t3 - phi * (s - t1) * (t3 - t2) / (t2 - t1))))
        return tuple(out)  # type: ignore[return-value]

    def _step(self, closure: Closure) -> None:
        alpha, beta1, beta2 = self._coefficients()
        z1, z2 = self.noise(stream=0), self.noise(stream=1)
        m_prev = [st.get("m", torch.zeros_like(p)) for st, p in zip(self.state, self.params)]
        zd = [math.sqrt(alpha) * a for a in z1]
        zdd = [m + math.sqrt(1 - alpha) * b for m, b in zip(m_prev, z2)]
        m = [beta1 * a + (1 - beta1) * b for a, b in zip(zd, zdd)]
        g = self.spsa(closure, m)
        v = [beta2 * a * a + (1 - beta2) * b * b for a, b in zip(zd, zdd)]
        self.decay()
        for p, st, mk, vk in zip(self.params, self.state, m, v):
            p.sub_(self.hp["lr"] * g * mk / torch.sqrt(vk + self.hp.get("sigma", 1e-8)))
            st["m"] = mk


class RefHELENE(ReferenceZO):
    """HELENE, the best-available reconstruction of docs/methods.md ("HELENE")."""

    def _step(self, closure: Closure) -> None:
        z = self.noise()
        c = self.spsa(closure, z)
        beta1, beta2 = self.hp.get("betas", (0.9, 0.99))
        t = self.updates
        a = beta1 + (1 - beta1) * math.exp(-t / self.hp.get("anneal_steps", 1000.0))
        gamma, lam = self.hp.get("gamma", 1.0), self.hp.get("clip_threshold", 1.0)
        delta = self.hp.get("denom_eps", 1e-8)
        self.decay()
        for p, st, zk in zip(self.params, self.state, z):
            g = c * zk
            m, h = st.get("m", torch.zeros_like(p)), st.get("h", torch.zeros_like(p))
            if self.hp.get("momentum_form", "anneal") == "anneal":
                m = beta1 * m + a * g
            else:
                m = (1 - a) * m + a * g
            if t % self.hp.get("hessian_interval", 10) == 0:
                h = beta2 * h + (1 - beta2) * self.hp.get("gnb_scale", 1.0) * g * g
            if self.hp.get("clip", "floor") == "floor":
                p.sub_(self.hp["lr"] * m / (gamma * torch.clamp(h, min=lam) + delta))
            else:
                p.sub_(self.hp["lr"] * torch.clamp(m / torch.clamp(gamma * h, min=delta), -lam, lam))
            st["m"], st["h"] = m, h

