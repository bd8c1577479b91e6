"""Collectives with clear errors, and a counter of what they send.

Every collective zotune issues goes through :func:`run_collective`, which turns the
backend's terse failure (``Connection closed by peer``, ``Timed out waiting 5000ms for recv``)
into a :class:`DistributedError` that names the collective, the step and the usual fixes,
and through :data:`COMM_STATS`, which counts calls and payload bytes per operation (the
``zotune bench scale`` numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: process-group timeout in seconds set by :func:`zotune.distributed.init_distributed`
#: (``None``: the group was created elsewhere; its timeout is unknown here).
_PG_TIMEOUT_S: float | None = None


class DistributedError(RuntimeError):
    """A collective failed: a peer rank died, hung past the timeout, or ranks disagree."""


@dataclass
class CommStats:
    """Calls and payload bytes of zotune's collectives, per operation name.

    The payload is what this rank contributes (``numel * element_size`` of the tensor it
    passes in); a ring all-reduce moves about twice that over the wire per rank.
    """

    ops: dict[str, list[int]] = field(default_factory=dict)

    def record(self, op: str, nbytes: int) -> None:
        entry = self.ops.setdefault(op, [0, 0])
        entry[0] += 1
        entry[1] += int(nbytes)

    def reset(self) -> None:
        self.ops.clear()

    @property
    def calls(self) -> int:
        return sum(c for c, _ in self.ops.values())

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.ops.values())

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """``{op: (calls, bytes)}``, a copy."""
        return {k: (v[0], v[1]) for k, v in self.ops.items()}


#: Process-wide counter of zotune's collectives (reset it before measuring).
COMM_STATS = CommStats()


def _describe_group(group: Any) -> str:
    import torch.distributed as dist

    try:
        return f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"
    except Exception:  # pragma: no cover - group already torn down
        return "this rank"


def group_timeout_s(group: Any) -> float | None:
    """The collective timeout of ``group`` in seconds, if the backend tells (gloo and NCCL do)."""
    for device in ("cpu", "cuda"):
        try:
            return float(group._get_backend(torch.device(device)).options._timeout.total_seconds())
        except Exception:
            continue
    return _PG_TIMEOUT_S


def explain_failure(what: str, group: Any, error: BaseException) -> str:
    """The message of a :class:`DistributedError` for a failed collective ``what``."""
    seconds = group_timeout_s(group)
    timeout = f"{seconds:g} s" if seconds is not None else "the process-group timeout"
    return (
        f"{what} failed on {_describe_group(group)}: {type(error).__name__}: {error}\n"
        f"Another rank has probably died (look for its traceback above or in its log) or did not reach "
        f"this collective within {timeout}. Fixes: every rank must call optimizer.step() the same number "
        "of times (give each rank the same number of batches: a global batch divisible by the world size, "
        "drop the last incomplete batch); do evaluation/checkpointing on all ranks or keep it shorter than "
        "the timeout; raise the timeout with init_distributed(timeout_s=...) if a rank is legitimately "
        "slow. The process group cannot be used after this error: restart the job (from the last checkpoint)."
    )


def run_collective(fn: Callable[[], T], what: str, group: Any) -> T:
    """Run ``fn`` (one or more collectives); re-raise a backend failure as :class:`DistributedError`."""
    try:
        return fn()
    except DistributedError:
        raise
    except RuntimeError as e:  # DistBackendError, DistNetworkError, gloo/NCCL RuntimeErrors
        raise DistributedError(explain_failure(what, group, e)) from e


def all_reduce_(tensor: torch.Tensor, group: Any, what: str, op: Any = None, stat: str = "all_reduce") -> torch.Tensor:
    """In-place ``dist.all_reduce`` (SUM by default) with a clear error and byte accounting."""
    import torch.distributed as dist

    reduce_op = dist.ReduceOp.SUM if op is None else op
    run_collective(lambda: dist.all_reduce(tensor, op=reduce_op, group=group), what, group)
    COMM_STATS.record(stat, tensor.numel() * tensor.element_size())
    return tensor
