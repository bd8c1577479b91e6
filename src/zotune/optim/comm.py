"""What the engine needs from its runtime: a small communication interface.

The SPSA engine talks to the outside world in four places only, and :class:`Communicator`
is all of them:

* :meth:`~Communicator.local_rows` -- the part of a parameter this process stores (all of it,
  or a dim-0 shard under FSDP2), so that a shard is perturbed with the rows of the full
  parameter's noise;
* :meth:`~Communicator.all_reduce_mean` -- the average of a step's loss scalars over the
  data-parallel ranks (the only communication of a data-parallel ZO step);
* :meth:`~Communicator.prepare_module` -- make a module safe for in-place perturbation
  before the optimizer takes its parameters;
* :meth:`~Communicator.after_step` -- a hook after every step (the replica check).

The base class is the single-process implementation. :mod:`zotune.optim` never imports
:mod:`zotune.distributed`; data parallelism and FSDP2 come in as an instance of
``zotune.distributed.ProcessGroupComm`` passed to the optimizer (``comm=``).

    >>> import torch
    >>> from zotune.optim.comm import Communicator
    >>> comm = Communicator()
    >>> comm.all_reduce_mean([1.0, 2.0], what="example")    # one process: unchanged
    [1.0, 2.0]
    >>> local, first_row, shape = comm.local_rows(torch.zeros(3, 4))
    >>> first_row, shape
    (0, (3, 4))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from zotune.optim.engine import ZOOptimizer


def refuse_meta(t: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``t`` is on the ``meta`` device (it holds no data to perturb)."""
    if t.device.type == "meta":
        raise ValueError(
            f"a trainable parameter of shape {tuple(t.shape)} is on the meta device (accelerate CPU/disk "
            "offload or init_empty_weights): it holds no data to perturb. Put every trainable weight on a real "
            "device (a device_map without 'cpu'/'disk' entries, or FSDP2), or freeze the offloaded ones"
        )


def refuse_meta_parameters(module: nn.Module) -> None:
    """Raise ``ValueError`` naming the first *trainable* parameter of ``module`` on the meta device.

    Frozen offloaded weights (a PEFT adapter on a partly offloaded base model) are fine.
    """
    for name, p in module.named_parameters():
        if p.device.type == "meta" and p.requires_grad:
            raise ValueError(
                f"parameter {name!r} is on the meta device (not materialised: accelerate CPU/disk offload or "
                "init_empty_weights). zotune perturbs weights in place and needs every trainable weight on a "
                "real device: load with a device_map without 'cpu'/'disk' entries (give max_memory enough room), "
                "shard the model with FSDP2 instead, or freeze the offloaded parameters (requires_grad=False) "
                "and train adapters"
            )


def _is_dtensor(t: torch.Tensor) -> bool:
    return getattr(t, "to_local", None) is not None


class Communicator:
    """The engine's view of its runtime; this base class is one process, no sharding.

    Subclass it (``zotune.distributed.ProcessGroupComm`` does) to reduce losses over a
    process group, perturb sharded parameters, or check replicas after a step.
    """

    #: number of processes whose losses :meth:`all_reduce_mean` averages
    world_size: int = 1

    def local_rows(self, param: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
        """(locally stored tensor, first global row it holds, global shape) of ``param``."""
        data = param.data if isinstance(param, nn.Parameter) else param
        if _is_dtensor(data):
            raise ValueError(
                f"a parameter of shape {tuple(data.shape)} is a DTensor (FSDP2/HSDP): pass "
                "comm=zotune.distributed.ProcessGroupComm(group) to the optimizer so that it perturbs the local shard"
            )
        refuse_meta(data)
        return data, 0, tuple(data.shape)

    def all_reduce_mean(self, values: list[float], *, what: str = "") -> list[float]:
        """The mean of ``values`` over the processes (``what`` names the caller in errors)."""
        return list(values)

    def prepare_module(self, module: nn.Module) -> nn.Module:
        """Check (and adapt) ``module`` before the optimizer takes its parameters; returns it."""
        refuse_meta_parameters(module)
        for p in module.parameters():
            if p.requires_grad:
                self.local_rows(p)  # refuses DTensors (FSDP2) here, before any step
        return module

    def after_step(self, optimizer: ZOOptimizer) -> None:
        """Called after every step, with the step counter already advanced."""
