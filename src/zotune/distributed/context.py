"""Process-group setup for ``torchrun`` / ``accelerate launch`` (no DDP wrapper needed).

>>> from zotune.distributed import init_distributed
>>> init_distributed() is None      # not launched by torchrun: single process
True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from zotune.distributed import _comm
from zotune.distributed._comm import DistributedError, run_collective
from zotune.errors import UserError

T = TypeVar("T")

#: default process-group timeout: long enough for a rank to save a checkpoint or run a short
#: evaluation while the others wait in a collective, short enough that a dead rank is noticed.
DEFAULT_TIMEOUT_S = 600.0


@dataclass
class DistContext:
    """This process's place in a data-parallel job.

    Attributes:
        rank: global rank (0 .. world_size-1).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        group: the ``torch.distributed`` process group (:meth:`comm` wraps it for the
            optimizers' ``comm=``).
        device: this rank's device (``cuda:LOCAL_RANK`` with NCCL, ``cpu`` with gloo).
        backend: ``"nccl"`` or ``"gloo"``.
        timeout_s: the collective timeout of ``group``.
        owns_group: whether :meth:`close` destroys the process group (False when it existed
            before :func:`init_distributed`, e.g. created by ``accelerate.Accelerator``).
    """

    rank: int
    world_size: int
    local_rank: int
    group: Any
    device: torch.device
    backend: str
    timeout_s: float
    owns_group: bool = True

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that logs and writes checkpoints)."""
        return self.rank == 0

    def shard(self, items: list[T]) -> list[T]:
        """This rank's contiguous slice of a global batch (``len(items) / world_size`` items).

        Raises :class:`~zotune.errors.UserError` if the global batch size is not divisible by
        the world size: equal shards make the averaged loss equal to the loss of the whole
        batch, and keep every rank running the same number of steps.
        """
        n = len(items)
        if n % self.world_size != 0:
            raise UserError(
                f"the global batch size {n} is not divisible by the number of processes {self.world_size}; "
                f"use a batch size that is a multiple of {self.world_size}"
            )
        per = n // self.world_size
        return list(items[self.rank * per : (self.rank + 1) * per])

    def comm(self, check_every: int = 0) -> Any:
        """A :class:`~zotune.distributed.ProcessGroupComm` on this job's group for the optimizers' ``comm=``."""
        from zotune.distributed.communicator import ProcessGroupComm

        return ProcessGroupComm(self.group, check_every=check_every, device=self.device)

    def barrier(self, what: str = "barrier") -> None:
        """Wait until every rank gets here (raises :class:`DistributedError` on timeout)."""
        import torch.distributed as dist

        kwargs: dict[str, Any] = {"group": self.group}
        if self.backend == "nccl":
            kwargs["device_ids"] = [self.device.index]
        run_collective(lambda: dist.barrier(**kwargs), what, self.group)

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s ``obj`` on every rank (any picklable object; the others pass anything)."""
        import torch.distributed as dist

        box = [obj]
        device = self.device if self.backend == "nccl" else None
        run_collective(
            lambda: dist.broadcast_object_list(box, src=src, group=self.group, device=device),
            f"broadcast_object from rank {src}",
            self.group,
        )
        return box[0]

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of a few floats (e.g. evaluation metrics)."""
        from zotune.distributed import all_reduce_mean

        return all_reduce_mean(values, self.group, self.device, what="all_reduce_mean of metrics")

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it (idempotent)."""
        import torch.distributed as dist

        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UserError(f"environment variable {name} is not set; launch with torchrun or accelerate launch")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext | None:
    """Join the job started by ``torchrun``/``accelerate launch``; ``None`` in a single process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by
    both launchers). ``backend=None`` picks NCCL when CUDA is available (and binds this
    process to ``cuda:LOCAL_RANK``), gloo otherwise. Every collective that does not complete
    within ``timeout_s`` raises :class:`~zotune.distributed.DistributedError` on gloo; on NCCL
    ``TORCH_NCCL_BLOCKING_WAIT=1`` is set (unless set already) so that it raises too instead of
    the watchdog aborting the process. If a default process group already exists (e.g. made by
    ``accelerate.Accelerator``), it is reused and not destroyed by :meth:`DistContext.close`.
    """
    import torch.distributed as dist

    if not dist.is_available():
        if _env_int("WORLD_SIZE", 1) > 1:
            raise UserError("this torch build has no torch.distributed; install a build with distributed support")
        return None
    if timeout_s <= 0:
        raise UserError(f"timeout_s must be > 0, got {timeout_s}")
    if backend is not None and backend not in ("gloo", "nccl"):
        raise UserError(f"backend must be 'gloo', 'nccl' or None (automatic), got {backend!r}")

    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        used = str(dist.get_backend()).lower()
        used = "nccl" if "nccl" in used else "gloo"
        local_rank = _env_int("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1) if used == "nccl" else 0)
        device = torch.device("cuda", local_rank) if used == "nccl" else torch.device("cpu")
        if used == "nccl":
            torch.cuda.set_device(device)
        return DistContext(rank, world, local_rank, dist.group.WORLD, device, used, float(timeout_s), owns_group=False)

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return None
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", 0)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UserError(f"WORLD_SIZE={world} but {name} is not set; launch with torchrun or accelerate launch")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise UserError("backend 'nccl' needs CUDA GPUs; use backend='gloo' on CPU")
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; start at most "
                "one process per GPU (torchrun --nproc_per_node N with N <= number of GPUs)"
            )
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs
        )
    except RuntimeError as e:  # rendezvous timeout, address in use, ...
        raise DistributedError(
            f"rank {rank} of {world} could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({backend}): {e}\n"
            "Check that all ranks were started with the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE, that the "
            "port is free and reachable, and that no rank crashed during start-up."
        ) from e
    _comm._PG_TIMEOUT_S = float(timeout_s)
    return DistContext(rank, world, local_rank, dist.group.WORLD, device, backend, float(timeout_s))
