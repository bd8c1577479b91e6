"""Data-parallel and sharded zeroth-order training on ``torch.distributed``.

ZO training needs almost no communication: every rank draws the same directions from the
shared step seed, evaluates the loss on its own shard of the batch, and only the loss
scalars are all-reduced; every rank then applies the identical update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from zotune.optim.engine import ZOOptimizer


def local_rows_of(param: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """The locally stored part of a parameter: (local tensor, first global row, global shape).

    Plain tensors are stored whole. A DTensor sharded on dim 0 (FSDP2) holds a contiguous
    range of rows; its noise is the matching rows of the full parameter's noise.
    """
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    to_local = getattr(data, "to_local", None)
    if to_local is None:
        return data, 0, tuple(data.shape)
    return _dtensor_local_rows(data)


def _dtensor_local_rows(dt: Any) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(dt.placements)
    global_shape = tuple(dt.shape)
    local = dt.to_local()
    if all(isinstance(p, Replicate) for p in placements):
        return local, 0, global_shape
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"zotune supports DTensor parameters sharded on dim 0 only, got {placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, placements)
    return local, int(offset[0]) if len(offset) else 0, global_shape


def all_reduce_mean(values: list[float], group: Any, device: torch.device) -> list[float]:
    """Average a few loss scalars over ``group`` (one all-reduce of a small fp64 vector)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    t /= dist.get_world_size(group)
    return t.tolist()


def maybe_check_replicas(optimizer: ZOOptimizer) -> None:
    """Every ``check_every`` steps, verify that all ranks hold bit-identical parameters."""
    every = int(getattr(optimizer, "check_every", 0) or 0)
    if every <= 0 or optimizer.step_count % every != 0:
        return
    check_replicas(optimizer)


def check_replicas(optimizer: ZOOptimizer) -> None:
    import torch.distributed as dist

    group = optimizer.process_group
    device = optimizer._comm_device()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for g in optimizer.param_groups:
        for p in g["params"]:
            local, _, _ = local_rows_of(p)
            x = local.detach().to(torch.float64)
            total[0] += x.sum()
            total[1] += (x * x).sum()
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        raise RuntimeError(
            f"data-parallel replicas diverged at step {optimizer.step_count}: parameter checksums "
            f"differ across ranks (min {lo.tolist()}, max {hi.tolist()}); check that every rank uses "
            "the same seed, model and dtype"
        )
