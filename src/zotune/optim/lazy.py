"""The lazy fused update: a step's restore + update pass runs inside the next step's first pass.

An eager ZO-SGD step makes three passes over the trainable weights: ``+eps z``, ``-2 eps z``
and ``+eps z`` fused with the update. With ``lazy_update=True`` the third pass is not run at
the end of step ``t``: it is kept as a :class:`Part` (seeds, restore + update kernel, the
layer subset of step ``t``, a snapshot of the param groups) and run block by block in the
``+eps z'`` pass of step ``t + 1`` (ZO2 applies a pending update when it next touches a
block). Each block gets the same operations in the same order as in the eager run, so the
trajectory is bit-identical; what drops is one read + write of the weights per step (the noise
of both seeds is still regenerated, three generations of z per step as before).

Between steps the weights are therefore at ``theta - eps z`` with the update pending. It is
applied (:meth:`~zotune.optim.engine.ZOOptimizer.flush`) before anything can observe them:

* inside the optimizer: ``state_dict()``, ``load_state_dict()``, ``add_param_group()``,
  pickling/deepcopy, a step that reads theta first (a forward at theta, a method whose rule
  is not ``lazy_capable``), a change of the trainable set, an exception or NaN in a step;
* through hooks on the module the optimizer was built from (:class:`LazyHooks`): its forward
  (outside a step: evaluation, generation, a user's own call), ``state_dict()`` (safetensors,
  ``save_pretrained``) and ``load_state_dict()``;
* by :func:`flush_pending` (``checkpoint.trainable_state``, the trajectory fingerprint,
  zotune's evaluation, the replica check, the end of training).

A change of lr between steps needs no flush: the deferred kernel reads the snapshot of the
groups taken when the step ran, as the eager update did. ``zo_state`` is final at the end of
the step (the deferred pass changes no entry of it). What no hook can see is a direct read of
``p.data`` / ``named_parameters()`` by user code: call ``optimizer.flush()`` first. That is
why ``lazy_update`` is off by default and on in zotune's own loops (``zotune train``,
``ZOTrainer``, ``zotune race``, replay), which flush at every observation point.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from zotune.optim.blocks import Block, _Slot
    from zotune.optim.engine import ZOOptimizer


@dataclass
class Part:
    """One kernel of a sweep: its slots, the seeds whose noise it needs, its param groups."""

    slots: Sequence[_Slot]
    seeds: list[int]
    kernel: Callable[[Block, list[list[torch.Tensor]]], None]
    groups: Sequence[dict]


def group_snapshot(groups: Sequence[dict]) -> list[dict]:
    """Shallow copies of the param groups: a deferred kernel uses the hyperparameters of its step."""
    return [dict(g) for g in groups]


#: optimizers built with lazy_update=True (weakly held: an optimizer dies with its last reference)
_LAZY: weakref.WeakSet = weakref.WeakSet()


def register_lazy(optimizer: ZOOptimizer) -> None:
    _LAZY.add(optimizer)


def flush_pending(obj: nn.Module | torch.Tensor | Sequence[torch.Tensor] | None = None) -> int:
    """Apply the pending update of every lazy optimizer that owns a parameter of ``obj``.

    ``obj``: a module, a tensor or tensors; ``None``: every lazy optimizer. Returns how many
    optimizers flushed. Call it before reading weights that a lazy optimizer may hold displaced.
    """
    pending = [o for o in list(_LAZY) if o.has_pending_update]
    if not pending:
        return 0
    if obj is None:
        targets = pending
    else:
        tensors = list(obj.parameters()) if isinstance(obj, nn.Module) else (
            [obj] if torch.is_tensor(obj) else list(obj))
        ids = {id(t) for t in tensors}
        targets = [o for o in pending if any(id(p) in ids for g in o.param_groups for p in g["params"])]
    for o in targets:
        o.flush()
    return len(targets)


class LazyHooks:
    """Hooks on the optimizer's module that flush the pending update before it is observed:
    a forward outside a step, ``state_dict()`` and ``load_state_dict()``. They hold the
    optimizer weakly and are removed with :meth:`remove` (or when it is collected)."""

    def __init__(self, optimizer: ZOOptimizer, module: nn.Module):
        ref = weakref.ref(optimizer)

        def flush(*_: Any, **__: Any) -> None:
            opt = ref()
            if opt is not None and not opt._in_step and opt.has_pending_update:
                opt.flush()

        self.handles = [
            # prepend: before FSDP2's pre-forward all-gather, which would gather displaced shards
            module.register_forward_pre_hook(flush, prepend=True),
            module.register_state_dict_pre_hook(flush),
            module.register_load_state_dict_pre_hook(flush),
        ]
        weakref.finalize(optimizer, self.remove)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
