"""Moving decoder blocks between their storage (CPU memory) and the compute device.

A :class:`Transport` holds a ring of ``min(3, L)`` buffer sets on the compute device: block ``i``
lives in set ``i % R`` from its upload until its write-back (or release). With three sets, block
``i + 1`` can be uploaded while block ``i`` computes and block ``i - 1`` is written back.

On CUDA, uploads and write-backs are queued on one side stream (``copy``), the forwards and the
perturbation kernels on the device's current stream (``compute``):

* ``upload(i)``: ``copy`` copies block ``i`` from pinned storage into its ring set and records
  ``uploaded[i]``; ``ready(i)`` makes ``compute`` wait for that event;
* ``writeback(i)``: records ``computed[i]`` on ``compute``; ``copy`` waits for it and copies the
  block's trainable tensors back into pinned storage;
* ring reuse needs no further event: the upload of block ``i`` into set ``i % R`` is queued on
  ``copy`` after the write-back of the set's previous block (same stream, in order), and that
  write-back waited for the previous block's compute.
* ``finish()`` waits for ``copy``: storage may be read on the host only after it.

On a CPU device (the simulation the tests run), the storage and the compute copies are separate
CPU tensors and every copy is synchronous. ``events`` records every operation in the order it
was *issued* (on CUDA the device may execute overlapping copies and kernels concurrently), and
``peak_resident`` / ``peak_bytes`` account for the "device" memory the ring holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: one tensor of a block: ("param", name) or ("state", name, key)
Key = tuple[str, ...]

RING = 3


class Transport:
    """Upload / write back blocks through a ring of device buffers (see the module docstring).

    Args:
        device: the compute device.
        num_blocks: decoder blocks (L).
        tensors: ``tensors(i)`` -> ``{key: storage tensor}`` of block ``i`` (read at each upload,
            so optimizer state created or replaced since is picked up).
        writable: ``writable(i)`` -> the keys of block ``i`` that a step changes (written back).
    """

    def __init__(self, device: torch.device, num_blocks: int,
                 tensors: Callable[[int], dict[Key, torch.Tensor]],
                 writable: Callable[[int], set[Key]]) -> None:
        self.device = device
        self.num_blocks = num_blocks
        self.ring_size = max(1, min(RING, num_blocks))
        self._tensors, self._writable = tensors, writable
        self.ring: list[dict[Key, torch.Tensor]] = [{} for _ in range(self.ring_size)]
        self.holder: list[int | None] = [None] * self.ring_size  # block each ring set holds now
        self.events: list[tuple[str, Any]] = []
        self.log_events = False
        self.resident: set[int] = set()
        self.peak_resident = 0
        self.ring_bytes = 0  # device bytes the ring has allocated (its peak: it never shrinks)
        self.uploads = 0
        self.writebacks = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._uploaded: dict[int, Any] = {}

    # ------------------------------------------------------------------ helpers
    def log(self, kind: str, what: Any) -> None:
        if self.log_events:
            self.events.append((kind, what))

    def slot(self, i: int) -> int:
        return i % self.ring_size

    def buffers(self, i: int) -> dict[Key, torch.Tensor]:
        """The device copies of block ``i`` (valid between its upload and its write-back)."""
        if i not in self.resident:
            raise RuntimeError(f"offload: block {i} is not on the device")
        return self.ring[self.slot(i)]

    def _buffer(self, k: int, key: Key, src: torch.Tensor) -> torch.Tensor:
        buf = self.ring[k].get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            if buf is not None:
                self.ring_bytes -= buf.numel() * buf.element_size()
            buf = torch.empty(src.shape, dtype=src.dtype, device=self.device)
            self.ring[k][key] = buf
            self.ring_bytes += buf.numel() * buf.element_size()
        return buf

    # ------------------------------------------------------------------ the moves
    def upload(self, i: int) -> None:
        """Queue the copy of block ``i`` into its ring set (no-op if it is there already)."""
        if i in self.resident:
            return
        k = self.slot(i)
        previous = self.holder[k]
        if previous is not None and previous in self.resident:
            raise RuntimeError(f"offload: ring set {k} still holds block {previous} (uploading block {i})")
        tensors = self._tensors(i)
        stale = set(self.ring[k]) - set(tensors)
        for key in stale:  # another layout (state appeared or went): drop what the block does not use
            buf = self.ring[k].pop(key)
            self.ring_bytes -= buf.numel() * buf.element_size()
        if self.cuda:
            assert self.copy_stream is not None
            with torch.cuda.stream(self.copy_stream):
                for key, src in tensors.items():
                    self._buffer(k, key, src).copy_(src, non_blocking=True)
                self._uploaded[i] = torch.cuda.Event()
                self._uploaded[i].record(self.copy_stream)
        else:
            for key, src in tensors.items():
                self._buffer(k, key, src).copy_(src)
        self.holder[k] = i
        self.resident.add(i)
        self.peak_resident = max(self.peak_resident, len(self.resident))
        self.uploads += 1
        self.bytes_up += sum(t.numel() * t.element_size() for t in tensors.values())
        self.log("upload", i)

    def ready(self, i: int) -> None:
        """Make the compute stream wait until block ``i`` is on the device."""
        if i not in self.resident:
            self.upload(i)
        event = self._uploaded.pop(i, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def writeback(self, i: int) -> None:
        """Queue the copy of block ``i``'s changed tensors back into storage; frees its ring set."""
        keys = self._writable(i)
        tensors = self._tensors(i)
        bufs = self.ring[self.slot(i)]
        if self.cuda:
            assert self.copy_stream is not None
            computed = torch.cuda.Event()
            computed.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(computed)
                for key in keys:
                    tensors[key].copy_(bufs[key], non_blocking=True)
        else:
            for key in keys:
                tensors[key].copy_(bufs[key])
        self.writebacks += 1
        self.bytes_down += sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        self.resident.discard(i)
        self.log("writeback", i)

    def release(self, i: int) -> None:
        """Free block ``i``'s ring set without writing anything back (read-only forwards)."""
        if i in self.resident:
            if self.cuda:  # the next upload into this set must wait until the forward has read it
                computed = torch.cuda.Event()
                computed.record(torch.cuda.current_stream(self.device))
                assert self.copy_stream is not None
                self.copy_stream.wait_event(computed)
            self.resident.discard(i)
            self._uploaded.pop(i, None)
            self.log("release", i)

    def finish(self) -> None:
        """Wait for every queued copy (storage is then safe to read on the host)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    def reset(self) -> None:
        """Forget what is resident (after an aborted pass; nothing is written back)."""
        self.finish()
        for i in list(self.resident):
            self.release(i)
