"""Cheap verification that data-parallel replicas are still bit-identical.

Each parameter gets two integer checksums of its *bits* (and of the bits of its optimizer
state: fp32 masters, moments): the plain sum and a position-weighted sum of the raw words,
taken modulo a prime. Integer arithmetic is exact, so the result does not depend on thread
count, vectorisation or reduction order, and a single flipped bit changes it. Ranks exchange
the per-parameter checksums in one ``all_reduce(MAX)`` of ``[c, -c]`` per comparison group
(16 bytes per parameter and group) and compare the maximum with the minimum.

What is compared with what:

* plain tensors (data parallelism): across the group of the optimizer's
  :class:`~zotune.distributed.ProcessGroupComm`;
* DTensors (FSDP2/HSDP): only across the mesh dimensions on which the parameter is
  ``Replicate`` (HSDP's replicate groups); shards of one parameter are different data and are
  never compared with each other. A purely sharded parameter (FSDP2 on a 1-D mesh) has no
  replica to compare with and is skipped;
* always: the step counter and base seed of the optimizer across that group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from zotune.distributed._comm import DistributedError, all_reduce_

if TYPE_CHECKING:
    from zotune.optim.engine import ZOOptimizer

_MOD = (1 << 61) - 1  # Mersenne prime; partial sums stay far below 2**63
_CHUNK = 1 << 22  # words per chunk: int64 temporaries of 32 MiB
_WEIGHT_PERIOD = 251
_weights: dict[str, torch.Tensor] = {}


class ReplicaDivergenceError(DistributedError):
    """Ranks that should hold identical parameters do not."""


def _words(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as a flat integer tensor (int32/int16/uint8 words)."""
    flat = t.detach().contiguous().view(-1)
    size = flat.element_size()
    if size % 4 == 0:
        return flat.view(torch.int32)
    if size == 2:
        return flat.view(torch.int16)
    return flat.view(torch.uint8)


def _position_weights(device: torch.device) -> torch.Tensor:
    key = str(device)
    w = _weights.get(key)
    if w is None:
        w = _weights[key] = torch.arange(_CHUNK, dtype=torch.int64, device=device) % _WEIGHT_PERIOD + 1
    return w


def tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """Two int64 checksums of the bits of ``t`` (on its device): ``[sum, weighted sum] mod p``.

    Bit-identical tensors give identical checksums on any hardware; any single changed word
    changes both (the weights are in ``1..251``, never a multiple of the prime).
    """
    words = _words(t)
    out = torch.zeros(2, dtype=torch.int64, device=words.device)
    if words.numel() == 0:
        return out
    w = _position_weights(words.device)
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start : start + _CHUNK].to(torch.int64)
        out[0] += chunk.sum()
        out[1] += (chunk * w[: chunk.numel()]).sum()
        out.remainder_(_MOD)
    return out


def param_checksum(param: torch.Tensor, state: dict) -> torch.Tensor:
    """Checksum of the local part of ``param`` and of its tensor optimizer state."""
    from zotune.distributed import local_rows_of

    local, _, _ = local_rows_of(param)
    total = tensor_checksum(local)
    for key in sorted(k for k in state if isinstance(k, str)):
        value = state[key]
        if torch.is_tensor(value) and value.numel() > 0:
            total = (total + tensor_checksum(value).to(total.device)).remainder_(_MOD)
    return total


@dataclass
class _Comparison:
    group: Any
    label: str
    indices: list[int] = field(default_factory=list)
    sums: list[torch.Tensor] = field(default_factory=list)


def _comparison_keys(param: torch.Tensor, process_group: Any) -> list[tuple[Any, Any, str]]:
    """(key, group, label) of every group of ranks that must hold identical copies of ``param``."""
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    if getattr(data, "to_local", None) is None or not hasattr(data, "device_mesh"):
        return [("dp", process_group, "data-parallel group")]
    from torch.distributed.tensor import Replicate

    mesh = data.device_mesh
    keys = []
    for dim, placement in enumerate(data.placements):
        if isinstance(placement, Replicate):
            name = (mesh.mesh_dim_names or [None] * mesh.ndim)[dim] or str(dim)
            keys.append(((id(mesh), dim), mesh.get_group(dim), f"replicate dimension {name!r} of the device mesh"))
    return keys


def check_replicas(optimizer: ZOOptimizer) -> int:
    """Raise :class:`ReplicaDivergenceError` unless all replicas are bit-identical.

    Returns the number of parameters that had a replica to compare with. Every rank of the
    optimizer's process group must call this at the same step (it is collective). An optimizer
    without a process group (``comm`` is not a :class:`~zotune.distributed.ProcessGroupComm`)
    has nothing to compare: returns 0.
    """
    comm = optimizer.comm
    group = getattr(comm, "group", None)
    if group is None:
        return 0
    optimizer.flush()  # a lazy update pending: compare the weights and state the step produced
    device = comm.device
    comparisons: dict[Any, _Comparison] = {}
    header = torch.tensor(
        [optimizer.step_count, int(optimizer.zo_state["seed"]) & ((1 << 62) - 1)], dtype=torch.int64, device=device
    )
    index = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            keys = _comparison_keys(p, group)
            if keys:
                checksum = param_checksum(p, optimizer.state.get(p, {}))
                for key, kgroup, label in keys:
                    cmp = comparisons.setdefault(key, _Comparison(kgroup, label))
                    cmp.indices.append(index)
                    cmp.sums.append(checksum.to(device))
            index += 1
    checked = sum(len(c.indices) for c in comparisons.values())
    what = f"replica check of {type(optimizer).__name__} at step {optimizer.step_count}"
    _compare(header, group, what, lambda bad: _header_message(optimizer, bad))
    for cmp in comparisons.values():
        vec = torch.cat(cmp.sums)
        _compare(vec, cmp.group, what, lambda bad, cmp=cmp: _param_message(optimizer, cmp, bad))
    return checked


def _compare(vec: torch.Tensor, group: Any, what: str, message: Any) -> None:
    both = torch.cat([vec, -vec])
    all_reduce_(both, group, what, op=_max_op(), stat="replica_check")
    n = vec.numel()
    hi, lo = both[:n], -both[n:]
    bad = (hi != lo).nonzero().flatten().tolist()
    if bad:
        raise ReplicaDivergenceError(message(bad))


def _max_op() -> Any:
    import torch.distributed as dist

    return dist.ReduceOp.MAX


_FIX = (
    "Every rank must load the same model weights, use the same optimizer class, hyperparameters and seed, "
    "and change parameters only through optimizer.step(). Noise generated on CUDA depends on the GPU model, "
    "so ranks on different GPU types need noise_device='cpu'. Resume from the last checkpoint."
)


def _header_message(optimizer: ZOOptimizer, bad: list[int]) -> str:
    what = " and ".join(["step counters", "base seeds"][i] for i in bad)
    return f"data-parallel ranks disagree on the optimizer's {what} at step {optimizer.step_count}. {_FIX}"


def _param_message(optimizer: ZOOptimizer, cmp: _Comparison, bad: list[int]) -> str:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    diverged = sorted({cmp.indices[i // 2] for i in bad})
    shown = ", ".join(f"{i} (shape {tuple(params[i].shape)}, {params[i].dtype})" for i in diverged[:5])
    more = f" and {len(diverged) - 5} more" if len(diverged) > 5 else ""
    return (
        f"replicas diverged at step {optimizer.step_count}: {len(diverged)} of {len(cmp.indices)} parameters "
        f"(with their optimizer state) differ bitwise across the {cmp.label}: parameter index {shown}{more}. {_FIX}"
    )


def maybe_check_replicas(optimizer: ZOOptimizer) -> None:
    """Every ``check_every`` steps of the optimizer's communicator, run :func:`check_replicas`."""
    every = int(getattr(optimizer.comm, "check_every", 0) or 0)
    if every <= 0 or optimizer.step_count % every != 0:
        return
    check_replicas(optimizer)
