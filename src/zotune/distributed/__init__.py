"""Data-parallel and sharded zeroth-order training on ``torch.distributed``.

ZO training needs almost no communication: every rank draws the same directions from the
shared step seed, evaluates the loss on its own shard of the batch, and only the loss
scalars are all-reduced; every rank then applies the identical update. No DDP wrapper.

* :func:`init_distributed` / :class:`DistContext` -- join a ``torchrun``/``accelerate
  launch`` job (gloo on CPU, NCCL on GPUs), shard batches, barrier, broadcast;
* :class:`ProcessGroupComm` -- what the optimizers' ``comm=`` argument takes: the loss
  scalars go through :func:`all_reduce_mean`; ``check_every=K`` runs :func:`check_replicas`
  every K steps (``DistContext.comm(check_every=K)`` builds one for the job's group);
* :func:`local_rows_of` -- FSDP2 DTensor parameters are perturbed shard by shard with the
  rows of the full parameter's noise (trajectory independent of the sharding);
* :func:`fully_shard_for_zo` / :func:`prepare_module` -- FSDP2 set up for ZO;
* :data:`COMM_STATS` -- calls and bytes of every collective zotune issued;
* :func:`launch_local` -- start N local processes with torchrun's environment (tests, bench).

See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from zotune.distributed._comm import COMM_STATS, CommStats, DistributedError, run_collective
from zotune.optim.comm import refuse_meta


def local_rows_of(param: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """The locally stored part of a parameter: (local tensor, first global row, global shape).

    Plain tensors are stored whole. A DTensor whose placements are ``Shard(0)`` and/or
    ``Replicate`` (FSDP2, HSDP) holds a contiguous range of rows; its noise is the matching
    rows of the full parameter's noise. Tensors on the ``meta`` device are refused (they hold
    no data: accelerate CPU/disk offload).
    """
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    to_local = getattr(data, "to_local", None)
    if to_local is None:
        refuse_meta(data)
        return data, 0, tuple(data.shape)
    local, offset, shape = _dtensor_local_rows(data)
    refuse_meta(local)
    return local, offset, shape


def _dtensor_local_rows(dt: Any) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(dt.placements)
    global_shape = tuple(dt.shape)
    local = dt.to_local()
    if all(isinstance(p, Replicate) for p in placements):
        return local, 0, global_shape
    # exactly Shard(0) (not a _StridedShard subclass: its rows are not contiguous) or Replicate
    if not all((type(p) is Shard and p.dim == 0) or isinstance(p, Replicate) for p in placements):
        raise ValueError(
            f"zotune supports DTensor parameters sharded on dim 0 only (FSDP2/HSDP), got {placements}; "
            "tensor-parallel layouts are not supported"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, placements)
    return local, int(offset[0]) if len(offset) else 0, global_shape


def all_reduce_mean(values: list[float], group: Any, device: torch.device, *, what: str = "") -> list[float]:
    """Average a few loss scalars over ``group`` (one all-reduce of a small fp64 vector).

    This is the only communication of a data-parallel ZO step: ``8 * len(values)`` bytes per
    rank (ZO-SGD: 2 values). ``what`` names the caller in the error raised when a peer died or
    timed out (:class:`DistributedError`).
    """
    import torch.distributed as dist

    from zotune.distributed._comm import all_reduce_

    label = f"all-reduce of {len(values)} loss scalar(s)" + (f" ({what})" if what else "")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce_(t, group, label, stat="loss_all_reduce")
    t /= dist.get_world_size(group)
    return run_collective(t.tolist, label, group)  # the host sync is where NCCL errors surface


from zotune.distributed.communicator import ProcessGroupComm  # noqa: E402
from zotune.distributed.context import DEFAULT_TIMEOUT_S, DistContext, init_distributed  # noqa: E402
from zotune.distributed.fsdp import fully_shard_for_zo, prepare_module  # noqa: E402
from zotune.distributed.launch import ProcessResult, free_port, launch_local  # noqa: E402
from zotune.distributed.replicas import (  # noqa: E402
    ReplicaDivergenceError,
    check_replicas,
    maybe_check_replicas,
    tensor_checksum,
)

__all__ = [
    "COMM_STATS",
    "DEFAULT_TIMEOUT_S",
    "CommStats",
    "DistContext",
    "DistributedError",
    "ProcessGroupComm",
    "ProcessResult",
    "ReplicaDivergenceError",
    "all_reduce_mean",
    "check_replicas",
    "free_port",
    "fully_shard_for_zo",
    "init_distributed",
    "launch_local",
    "local_rows_of",
    "maybe_check_replicas",
    "prepare_module",
    "tensor_checksum",
]
