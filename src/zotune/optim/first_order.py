"""First-order baselines that run through the same training loop as the ZO optimizers.

``zotune train --optimizer adamw`` fine-tunes with backpropagation, as the MeZO paper's
"FT" rows do, so that accuracy and memory can be compared with zeroth-order training on
the same model, data and loop. These classes are deliberately *not* in the ZO registry
(:func:`zotune.optim.get`): they have no perturbation, no seeds and no reference oracle.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> opt = FirstOrderAdamW([w], lr=0.1)
    >>> for _ in range(100):
    ...     _ = opt.step(lambda: (w ** 2).sum())
    >>> bool((w ** 2).sum() < 0.05), opt.zo_state["forwards"]
    (True, 100)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from zotune.errors import UserError

__all__ = ["FIRST_ORDER", "FirstOrderAdamW", "get_first_order"]


class FirstOrderAdamW(torch.optim.AdamW):
    """AdamW whose ``step(closure)`` runs the forward *and* the backward pass.

    The closure returns a differentiable loss (the ZO loop's closure does: zotune's objectives
    do not disable autograd). Counters follow the ZO optimizers' ``zo_state`` so the loop,
    checkpoints and reports treat both alike: ``forwards`` counts forward passes (one per step;
    each step also runs one backward, about two forwards' worth of compute).

    Args:
        params: tensors, parameter groups, or an ``nn.Module`` (its trainable parameters).
        lr: learning rate (MeZO's FT-Adam grid on OPT: 1e-5 .. 8e-5 for full fine-tuning).
        eps: accepted and ignored: the ZO loop passes its perturbation scale here. Adam's own
            epsilon is ``adam_eps``.
        weight_decay: decoupled weight decay.
        seed, distribution: accepted and ignored (no random directions).
        comm: must be ``None``; data-parallel first-order training is out of scope.
        betas, adam_eps: as ``torch.optim.AdamW``.
    """

    aliases = ("adamw", "fo-adamw", "ft-adam")
    forwards_per_step: float = 1

    def __init__(self, params: Iterable[Any] | nn.Module, lr: float = 1e-3, eps: float | None = None,
                 weight_decay: float = 0.0, seed: int = 0, distribution: str = "gaussian", comm: Any = None,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8) -> None:
        if comm is not None:
            raise UserError("--optimizer adamw runs in one process; launch it without torchrun")
        if isinstance(params, nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
        super().__init__(params, lr=lr, betas=tuple(betas), eps=adam_eps, weight_decay=weight_decay)
        self.zo_state: dict[str, Any] = {"step": 0, "forwards": 0, "backwards": 0, "skipped_steps": 0,
                                         "last_projected_grads": [], "seed": int(seed)}

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Zero the gradients, run ``closure`` with autograd on, backpropagate, update.

        A non-finite loss skips the update (weights untouched, counted in ``skipped_steps``);
        an exception in the closure propagates before anything is updated.
        """
        if closure is None:
            raise ValueError("FirstOrderAdamW.step needs a closure that returns the loss")
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            self.zo_state["forwards"] += 1
            self.zo_state["step"] += 1
            if not math.isfinite(float(loss.detach())):
                self.zo_state["skipped_steps"] += 1
                return loss.detach()
            loss.backward()
            self.zo_state["backwards"] += 1
        super().step()
        self.zero_grad(set_to_none=True)  # free the gradients: peak memory is measured per process
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zo_state"] = dict(self.zo_state)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.zo_state.update(state_dict.pop("zo_state", {}))
        super().load_state_dict(state_dict)


#: first-order optimizers by name (kept apart from the ZO registry and its common tests)
FIRST_ORDER: dict[str, type[torch.optim.Optimizer]] = {"adamw": FirstOrderAdamW}


def get_first_order(name: str) -> type[torch.optim.Optimizer] | None:
    """The first-order class for ``name`` (``adamw``, ``FirstOrderAdamW``, ...), or ``None``."""
    key = name.lower().replace("-", "").replace("_", "")
    for cls in FIRST_ORDER.values():
        names = {cls.__name__.lower(), *(a.replace("-", "") for a in getattr(cls, "aliases", ()))}
        if key in names:
            return cls
    return None
