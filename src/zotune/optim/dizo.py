"""DiZO (Tan et al. 2025, arXiv 2502.03304; code Skilteee/DiZO): ZO-SGD plus a zeroth-order search,
every kappa steps, of one scale per weight matrix that projects the distance travelled from
the initial weights theta0.

Steps are of two kinds. ``interval`` (kappa) ZO-SGD steps, then one *projection step*:

    t_i = |theta_i - theta0_i|                       per matrix i (>= 2-D parameter), fp64
    gamma_i = t_i
    repeat ``projection_iters`` (K) times, with z_i ~ N(0, 1) clipped to +-(tau / eps_g) t_i:
        l+- = L(theta0 + (theta - theta0) (gamma +- eps_g z) / t)
        g   = (l+ - l-) / (2 eps_g)
        gamma_i <- clip(gamma_i - step t_i g z_i, (1 - tau) t_i, (1 + tau) t_i)
    theta_i <- theta0_i + (theta_i - theta0_i) gamma_i / t_i

so a projection step costs 2K forwards and the mean over kappa + 1 steps is
(2 kappa + 2K) / (kappa + 1). The authors run the round inside the step that ends each kappa
steps, on K fresh batches; here it is a step of its own on the step's batch, so that a
failure or a NaN loss inside it leaves the weights as they were (docs/methods.md, "DiZO").
"""

from __future__ import annotations

import math

import torch

from zotune.optim.engine import Closure, NonFiniteLoss, ZOOptimizer, check_positive_int, check_range
from zotune.optim.noise import mix_seed
from zotune.optim.zo_sgd import ZOSGD

#: the ``sample`` slot of mix_seed for the projection round's z (a projection step's own seed)
_PROJECTION_SAMPLE = (1 << 40) + 2
_TINY = 1e-8  # the authors' guard in gamma / (t + 1e-8)


class DiZO(ZOOptimizer):
    """DiZO. ZO-SGD steps (2 forwards) and, after every ``interval`` of them, a projection step
    (2 ``projection_iters`` forwards). State: ``anchor``, a copy of each matrix at the first step.

    Args:
        lr, eps, weight_decay: of the ZO-SGD steps (the authors' README: lr 1e-6, eps 1e-3 on OPT-2.7B).
        interval: kappa, ZO-SGD steps between projection steps (published grid 50 ... 400).
        projection_iters: K, iterations of the scale search per projection step (code: 10).
        projection_eps: eps_g, perturbation of the scales (code: 0.1; grid 0.1, 0.05).
        projection_step: step size of the scale search (code: 2.0; grid 2.0, 1.0).
        clip_range: tau, scales stay within (1 +- tau) of the distance travelled (code: 0.2).
    """

    aliases = ("dizo",)
    summary = "ZO-SGD; every kappa steps a ZO search of one scale per matrix on |theta - theta0|"
    forwards_per_step = (2 * 50 + 2 * 10) / 51
    state_buffers = ("anchor",)  # matrices only; vectors are not projected
    lr_by_mode = {"full": 1e-6}  # the authors' README (OPT-2.7B, SST-2)
    reference = "zotune.optim.reference_sparse:RefDiZO"
    lazy_capable = True  # plain steps only: a projection step reads theta (lazy_step_ok)
    test_kwargs = {"lr": 1e-2, "interval": 1, "projection_iters": 2}

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 interval: int = 50, projection_iters: int = 10, projection_eps: float = 0.1,
                 projection_step: float = 2.0, clip_range: float = 0.2, **engine):
        check_positive_int("interval", interval)
        check_positive_int("projection_iters", projection_iters)
        check_range("projection_eps", projection_eps, 0.0, low_open=True)
        check_range("projection_step", projection_step, 0.0)
        check_range("clip_range", clip_range, 0.0, 0.5)  # keeps gamma +- eps_g z > 0
        self.interval, self.projection_iters = int(interval), int(projection_iters)
        self.projection_eps, self.projection_step = float(projection_eps), float(projection_step)
        self.clip_range = float(clip_range)
        self.forwards_per_step = (2 * self.interval + 2 * self.projection_iters) / (self.interval + 1)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, **engine)

    def init_state(self, param: torch.Tensor, state: dict) -> None:
        if param.dim() >= 2:
            source = state.get("master", param.detach())  # the fp32 master of a low-precision weight
            state["anchor"] = self.zeros_state(param).copy_(source)

    def is_projection_step(self, step: int | None = None) -> bool:
        """Steps kappa, 2 kappa + 1, ... (every kappa + 1-th, 0-based) are projection steps."""
        step = self.step_count if step is None else step
        return step % (self.interval + 1) == self.interval

    def lazy_step_ok(self) -> bool:
        return not self.is_projection_step()  # the projection search reads theta before it displaces

    def _zo_step(self, closure: Closure) -> float:
        if self.is_projection_step():
            return self._projection_step(closure)
        return ZOSGD._zo_step(self, closure)  # every other step is exactly a ZO-SGD step

    # ------------------------------------------------------------------ the projection step
    def _projected(self) -> list:
        """(slot, theta (fp32 target), anchor) of the matrices in this step's layer subset."""
        out = []
        for slot in self.active_slots():
            state = self.state[slot.param]
            if "anchor" in state:
                if slot.local_rows != slot.layout.rows:
                    raise ValueError("DiZO does not support row-sharded parameters (a scale needs a whole matrix)")
                theta = slot.master if slot.master is not None else slot.data
                out.append((slot, theta, state["anchor"].view(theta.shape)))
        return out

    def _set_scales(self, projected: list, scales: list[float]) -> None:
        """Weights theta0 + (theta - theta0) s per matrix (theta itself is kept in the master, if any)."""
        for (slot, theta, anchor), s in zip(projected, scales):
            if slot.master is not None:
                slot.data.copy_(torch.lerp(anchor, theta, s) if s != 1.0 else theta)
            elif s != 1.0:
                slot.data.sub_(anchor).mul_(s).add_(anchor)

    def _unset_scales(self, projected: list, scales: list[float]) -> None:
        """Back to theta: exact from the master, else by the inverse scaling (within a rounding)."""
        for (slot, theta, anchor), s in zip(projected, scales):
            if slot.master is not None:
                slot.data.copy_(theta)
            elif s != 1.0:
                slot.data.sub_(anchor).div_(s).add_(anchor)

    def _loss_at_scales(self, closure: Closure, projected: list, scales: list[float]) -> float:
        self._set_scales(projected, scales)
        try:
            (loss,) = self._reduce(self._forward(closure))
        finally:
            self._unset_scales(projected, scales)
        return loss

    def _projection_step(self, closure: Closure) -> float:
        projected, dists = [], []
        for slot, theta, anchor in self._projected():
            dist = float(torch.sub(theta, anchor).double().norm())
            if dist > 0:  # a matrix still at theta0 has nothing to scale (and would divide by 0)
                projected.append((slot, theta, anchor))
                dists.append(dist)
        gammas = list(dists)
        tau, eps_g = self.clip_range, self.projection_eps
        n_slots = len(self._slots or [])
        losses = []
        for k in range(self.projection_iters):
            gen = torch.Generator().manual_seed(mix_seed(self.zo_state["seed"], self.step_count, _PROJECTION_SAMPLE, k))
            normal = torch.randn(n_slots, generator=gen, dtype=torch.float64).tolist()
            zs = [min(max(normal[slot.index], -tau / eps_g * t), tau / eps_g * t)
                  for (slot, _, _), t in zip(projected, dists)]
            plus = self._loss_at_scales(closure, projected, [(g + eps_g * z) / (t + _TINY)
                                                             for g, z, t in zip(gammas, zs, dists)])
            minus = self._loss_at_scales(closure, projected, [(g - eps_g * z) / (t + _TINY)
                                                              for g, z, t in zip(gammas, zs, dists)])
            grad = (plus - minus) / (2.0 * eps_g)
            gammas = [min(max(g - self.projection_step * t * grad * z, (1 - tau) * t), (1 + tau) * t)
                      for g, z, t in zip(gammas, zs, dists)]
            losses += [plus, minus]
        if not all(math.isfinite(g) for g in gammas):
            raise NonFiniteLoss(losses)
        final = [g / (t + _TINY) for g, t in zip(gammas, dists)]
        for (slot, theta, anchor), s in zip(projected, final):
            theta.copy_(torch.lerp(anchor, theta, s))
            if slot.master is not None:
                slot.data.copy_(theta)
        self.zo_state["last_losses"] = losses
        self.zo_state["last_projected_grads"] = []
        self.zo_state["last_scales"] = final
        return 0.5 * (losses[-2] + losses[-1])
