"""``ProcessGroupComm``: the engine's :class:`~zotune.optim.comm.Communicator` over ``torch.distributed``.

    opt = ZOSGD(model, lr=1e-6, comm=ProcessGroupComm(group, check_every=100))
    opt = ZOSGD(model, lr=1e-6, comm=ctx.comm(check_every=100))     # ctx = init_distributed()

Every rank draws the same directions from the shared step seed; the loss scalars of a step
are averaged over ``group`` (:func:`zotune.distributed.all_reduce_mean`); FSDP2/HSDP
parameters are perturbed shard by shard (:func:`zotune.distributed.local_rows_of`); every
``check_every`` steps the ranks verify that they hold bit-identical replicas
(:func:`zotune.distributed.check_replicas`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zotune.optim.comm import Communicator


class ProcessGroupComm(Communicator):
    """Data parallelism (and FSDP2 shards) on a ``torch.distributed`` process group.

    Args:
        group: the process group (default: the default group; it must be initialised).
        check_every: run the replica check every this many steps (0: never).
        device: where the loss scalars are all-reduced (default: this rank's current CUDA
            device with NCCL, the CPU otherwise).
    """

    def __init__(self, group: Any = None, *, check_every: int = 0, device: str | torch.device | None = None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ProcessGroupComm needs an initialised process group: call zotune.distributed.init_distributed() "
                "(under torchrun or accelerate launch) first"
            )
        if check_every < 0:
            raise ValueError(f"check_every must be >= 0, got {check_every}")
        self.group = group if group is not None else dist.group.WORLD
        self.check_every = int(check_every)
        self.backend = "nccl" if "nccl" in str(dist.get_backend(self.group)).lower() else "gloo"
        self.world_size = dist.get_world_size(self.group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        self.device = torch.device(device)

    def local_rows(self, param: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
        from zotune.distributed import local_rows_of

        return local_rows_of(param)

    def all_reduce_mean(self, values: list[float], *, what: str = "") -> list[float]:
        from zotune.distributed import all_reduce_mean

        return all_reduce_mean(list(values), self.group, self.device, what=what)

    def prepare_module(self, module: nn.Module) -> nn.Module:
        from zotune.distributed.fsdp import prepare_module

        return prepare_module(module)

    def after_step(self, optimizer: Any) -> None:
        from zotune.distributed.replicas import maybe_check_replicas

        maybe_check_replicas(optimizer)

    def __repr__(self) -> str:
        return (f"ProcessGroupComm(world_size={self.world_size}, backend={self.backend!r}, "
                f"check_every={self.check_every})")
