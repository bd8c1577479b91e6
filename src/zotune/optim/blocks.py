"""The data the SPSA engine works on: parameters as slots, slots cut into blocks, step records.

Kept apart from :mod:`zotune.optim.engine` so the engine module holds only the optimizer class;
everything here is re-exported by the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from zotune.optim.noise import BlockLayout


class NonFiniteLoss(Exception):
    """Raised inside a step when a loss is NaN or infinite; the step is skipped."""

    def __init__(self, losses: Sequence[float]):
        super().__init__(f"non-finite loss in ZO step: {list(losses)}")
        self.losses = list(losses)


@dataclass
class StepRecord:
    """What one step needs to be replayed without forwards (see :meth:`ZOOptimizer.replay_step`).

    ``seeds``: the direction seeds the step drew, in order; ``losses``: the (all-reduced) loss
    values the method used, in the order it used them; ``projected_grads``: the step's
    projected-gradient scalars; ``lrs``: the learning rate of each parameter group.
    """

    step: int
    seeds: list[int]
    losses: list[float]
    projected_grads: list[float]
    lrs: list[float]


@dataclass
class _Slot:
    """One trainable parameter as the engine sees it (its local rows, if sharded)."""

    param: torch.Tensor
    index: int  # global index in the optimizer (part of the noise contract)
    group_index: int
    layout: BlockLayout  # of the *global* shape
    row_offset: int  # first global row held locally
    data: torch.Tensor  # (local_rows, row_len) view of the parameter storage
    master: torch.Tensor | None  # fp32 (local_rows, row_len) copy, or None (in-place fp32)
    unit: int = 0  # the layer it belongs to (see zotune.optim.layers)

    @property
    def local_rows(self) -> int:
        return self.data.shape[0]


class Block:
    """The part of one parameter that a kernel works on: rows ``[r0, r1)`` of its local view.

    ``param`` is the fp32 tensor an update must modify (the master copy for low-precision
    parameters); :meth:`view` slices any state tensor shaped like the parameter the same way.
    """

    __slots__ = ("group", "param", "r0", "r1", "slot", "state")

    def __init__(self, slot: _Slot, r0: int, r1: int, group: dict, state: dict):
        self.slot, self.r0, self.r1, self.group, self.state = slot, r0, r1, group, state
        target = slot.master if slot.master is not None else slot.data
        self.param = target if r0 == 0 and r1 == target.shape[0] else target[r0:r1]  # a slice costs us per block

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of this block in a tensor with the parameter's (local) shape."""
        return tensor.view(self.slot.local_rows, -1)[self.r0 : self.r1]

    @property
    def name(self) -> str:
        return f"param{self.slot.index}[{self.r0}:{self.r1}]"

    def decay_weights(self) -> None:
        """Decoupled weight decay ``theta -= lr * wd * theta`` (MeZO's form), if the group has any."""
        lr, wd = self.group["lr"], self.group.get("weight_decay", 0.0)
        if wd:
            self.param.mul_(1.0 - lr * wd)


def is_no_decay(module: nn.Module, param_name: str) -> bool:
    """Biases and normalisation weights get no weight decay (MeZO's OPT rule)."""
    return param_name.endswith("bias") or "norm" in type(module).__name__.lower()


def trainable_param_groups(module: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups of a module's trainable parameters, in ``named_parameters`` order.

    With ``weight_decay > 0`` biases and normalisation weights go to a group without decay.
    """
    decay, no_decay, seen = [], [], set()
    for module_name, sub in module.named_modules():
        for name, p in sub.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if is_no_decay(sub, f"{module_name}.{name}") else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the module has no trainable parameters (requires_grad=True)")
    if weight_decay == 0.0:
        # keep named_parameters order for one group
        ordered = [p for p in module.parameters() if p.requires_grad]
        return [{"params": ordered}]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]
