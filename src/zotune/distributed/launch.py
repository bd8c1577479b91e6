"""Start N local processes the way ``torchrun`` does (for tests and ``zotune bench scale``).

Each process gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``, so the child calls
:func:`zotune.distributed.init_distributed` exactly as under ``torchrun``. Unlike
``torch.multiprocessing.spawn`` the whole group is bounded by a deadline, and once one rank has
failed the others get ``grace_s`` seconds before they are killed: a test of a hung rank
cannot hang the test run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass
class ProcessResult:
    """Outcome of one rank: exit status (``None`` if it was killed), output and wall time."""

    rank: int
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    killed: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(
    argv: Sequence[str],
    nproc: int,
    *,
    timeout_s: float = 120.0,
    grace_s: float = 5.0,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> list[ProcessResult]:
    """Run ``argv`` as ``nproc`` ranks of one job on this machine and wait for all of them.

    Processes still running ``timeout_s`` after the start, or ``grace_s`` after another rank
    exited with an error, are killed (``returncode=None``, ``killed=True``). Output is captured
    through temporary files (no pipe can fill up and block a rank).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    base = dict(os.environ)
    base.update(env or {})
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    start = time.monotonic()
    procs: list[subprocess.Popen] = []
    files = []
    with contextlib.ExitStack() as stack:
        stack.callback(_kill_all, procs)
        for rank in range(nproc):
            out = stack.enter_context(tempfile.TemporaryFile())
            err = stack.enter_context(tempfile.TemporaryFile())
            files.append((out, err))
            penv = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen(list(argv), env=penv, cwd=cwd, stdout=out, stderr=err))
        ended: dict[int, float] = {}
        killed: set[int] = set()
        first_failure: float | None = None
        while len(ended) < nproc:
            now = time.monotonic()
            for rank, p in enumerate(procs):
                if rank in ended:
                    continue
                code = p.poll()
                if code is not None:
                    ended[rank] = now - start
                    if code != 0 and first_failure is None:
                        first_failure = now
                elif now - start > timeout_s or (first_failure is not None and now - first_failure > grace_s):
                    p.kill()
                    p.wait()
                    killed.add(rank)
                    ended[rank] = now - start
            time.sleep(0.05)
        results = []
        for rank, (p, (out, err)) in enumerate(zip(procs, files)):
            out.seek(0)
            err.seek(0)
            results.append(
                ProcessResult(
                    rank=rank,
                    returncode=None if rank in killed else p.returncode,
                    stdout=out.read().decode(errors="replace"),
                    stderr=err.read().decode(errors="replace"),
                    seconds=ended.get(rank, time.monotonic() - start),
                    killed=rank in killed,
                )
            )
        return results


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
