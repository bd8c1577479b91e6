"""Perturbation directions as a pure function of (seed, parameter, block).

The noise contract that every zotune run relies on:

* A parameter of shape ``(d0, ...)`` is viewed as ``d0`` rows of ``row_len`` elements and cut
  into *blocks* of whole rows, ``rows_per_block = max(1, block_size // row_len)`` rows each
  (so a block holds at most ``block_size`` elements unless a single row is longer).
* Block ``j`` of the parameter with global index ``k`` in the optimizer, for the step seed
  ``s`` and noise stream ``t``, is generated from its own generator seeded with
  ``mix_seed(s, k, j, t)``. Nothing else enters: not the thread that generates it, not the
  other blocks, not the order in which blocks are visited.

Hence z is bit-identical for any number of worker threads, is never materialised in full
(a reused block buffer is filled and applied in place), and a shard of a parameter that owns
rows ``[a, b)`` can regenerate exactly its part of the full-parameter noise (FSDP2, see
:mod:`zotune.distributed`). Changing ``block_size`` changes z (it is part of the contract,
stored in the optimizer state; its default is :data:`DEFAULT_BLOCK_SIZE` where the noise is
generated on the CPU and :data:`CUDA_BLOCK_SIZE` on a CUDA device, see :func:`default_block_size`).

Distributions: ``"gaussian"`` (N(0, 1), torch's ``normal_`` with a per-block generator) and
``"rademacher"`` (+-1; on CPU from numpy's counter-seeded PCG64 raw bytes, 5x faster than a
Gaussian here). Noise generated on a CUDA device uses that device's Philox generator: the
stream is reproducible across runs and across ranks and devices *of the same GPU model*, but
differs from the CPU stream and between GPU models (PyTorch sizes the CUDA ``normal_`` launch
by the SM count). Pass ``noise_device="cpu"`` to the optimizer to generate on the CPU and copy,
which reproduces a CPU run bit-for-bit on any GPU (slower).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_BLOCK_SIZE = 1 << 18  # 262,144 elements = 1 MiB of fp32 per buffer
#: block size of noise generated on a CUDA device: a block costs ~50 us of Python and kernel
#: launches there whatever its size (measured on an H200: 1<<18 made ZO-SGD's step 6x two forwards
#: on OPT-1.3b, 4x MeZO's own step), so blocks are 16x larger (16 MiB of fp32 per buffer).
#: CUDA's stream already differs from the CPU's; with ``noise_device="cpu"`` the CPU size is kept.
CUDA_BLOCK_SIZE = 1 << 22
DISTRIBUTIONS = ("gaussian", "rademacher")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 chain); a pure function of its inputs."""
    h = 0x6A09E667F3BCC908
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


@dataclass(frozen=True)
class BlockLayout:
    """How a parameter of a given (global) shape is cut into noise blocks of whole rows."""

    rows: int
    row_len: int
    rows_per_block: int

    @classmethod
    def for_shape(cls, shape: torch.Size | tuple[int, ...], block_size: int) -> BlockLayout:
        numel = 1
        for s in shape:
            numel *= int(s)
        rows = int(shape[0]) if len(shape) > 0 else 1
        row_len = numel // rows if rows > 0 else 0
        rows_per_block = max(1, block_size // max(row_len, 1))
        return cls(rows=rows, row_len=row_len, rows_per_block=rows_per_block)

    @property
    def n_blocks(self) -> int:
        return (self.rows + self.rows_per_block - 1) // self.rows_per_block

    def block_rows(self, j: int) -> tuple[int, int]:
        r0 = j * self.rows_per_block
        return r0, min(self.rows, r0 + self.rows_per_block)

    def blocks_overlapping(self, row_start: int, row_stop: int) -> range:
        if row_stop <= row_start:
            return range(0)
        return range(row_start // self.rows_per_block, (row_stop - 1) // self.rows_per_block + 1)


def default_block_size(device: torch.device | str) -> int:
    """The block size of noise generated on ``device`` when none is given."""
    return CUDA_BLOCK_SIZE if torch.device(device).type == "cuda" else DEFAULT_BLOCK_SIZE


_local = threading.local()


def _generator(device: torch.device) -> torch.Generator:
    """One reusable generator per (thread, device); it is re-seeded for every block."""
    gens = getattr(_local, "gens", None)
    if gens is None:
        gens = _local.gens = {}
    key = str(device)
    g = gens.get(key)
    if g is None:
        g = gens[key] = torch.Generator(device=device)
    return g


def fill_noise(out: torch.Tensor, seed: int, distribution: str = "gaussian") -> torch.Tensor:
    """Fill the contiguous fp32 tensor ``out`` with noise that depends only on ``seed``.

    >>> a = fill_noise(torch.empty(5), 123); b = fill_noise(torch.empty(5), 123)
    >>> bool(torch.equal(a, b))
    True
    """
    if distribution == "gaussian":
        g = _generator(out.device)
        g.manual_seed(seed)
        return out.normal_(generator=g)
    if distribution == "rademacher":
        if out.device.type == "cpu":
            n = out.numel()
            rng = np.random.Generator(np.random.PCG64(seed))
            bits = np.unpackbits(np.frombuffer(rng.bytes((n + 7) // 8), dtype=np.uint8), count=n)
            flat = out.view(-1).numpy()
            np.multiply(bits, np.float32(2.0), out=flat, casting="unsafe")
            flat -= np.float32(1.0)
            return out
        g = _generator(out.device)
        g.manual_seed(seed)
        return out.random_(0, 2, generator=g).mul_(2.0).sub_(1.0)
    raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")


def block_seed(step_seed: int, param_index: int, block_index: int, stream: int = 0) -> int:
    return mix_seed(step_seed, param_index, block_index, stream)


def full_noise(
    step_seed: int,
    param_index: int,
    shape: torch.Size | tuple[int, ...],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    distribution: str = "gaussian",
    stream: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Materialise the whole z of one parameter (for reference oracles and tests only)."""
    layout = BlockLayout.for_shape(tuple(shape), block_size)
    z = torch.empty(layout.rows, layout.row_len, dtype=torch.float32, device=device)
    for j in range(layout.n_blocks):
        r0, r1 = layout.block_rows(j)
        fill_noise(z[r0:r1], block_seed(step_seed, param_index, j, stream), distribution)
    return z.view(shape) if len(shape) > 0 else z.view(())
