"""Matrix-structured perturbations: the shared base of LOZO, SubZero and ZO-Muon.

These methods perturb a weight matrix W (m x n, the parameter viewed as ``rows x row_len``
as everywhere in zotune) along a low-rank direction ``A B`` with a row factor A (m x r) and a
column factor B (r x n), instead of a dense Gaussian z:

* LOZO:    A = U (fresh Gaussian every step),        B = V^T (Gaussian, refreshed every nu steps)
* SubZero: A = U Z sqrt(mn)/r (U, V orthonormal, refreshed every T steps; Z r x r Gaussian), B = V^T
* ZO-Muon: A = P (orthonormal, refreshed every K steps), B = u_i (r x n Gaussian, per query)

Parameters that are not matrices (biases, norms; tensors with a single row or column) keep
the engine's dense block noise. The factors are a pure function of the seeds: a factor drawn
every step comes from ``mix_seed(step seed, parameter index, tag)``, a factor kept for a
window of steps from ``mix_seed(base seed, tag, window, parameter index)``; so any step of a
run can be regenerated, and a checkpoint needs no factor (the current window's factors are
cached in memory only). Factors are generated in fp32 (on the parameter's device, or on
``noise_device``), orthonormalised and multiplied in the working dtype (fp32, or fp64 for
fp64 parameters). The direction of a block of rows is ``A[rows] @ B`` (see
:func:`low_rank_product`): r multiply-adds per element instead of generating a Gaussian.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch

from zotune.optim.engine import Block, Closure, Noises, ZOOptimizer
from zotune.optim.noise import BlockLayout, fill_noise, mix_seed

# tags that separate the factor streams from each other and from the block noise
TAG_ROW = 0x524F57  # "ROW": per-step row factor (LOZO's U, SubZero's core Z, ZO-Muon's u_i)
TAG_WINDOW = 0x57494E  # "WIN": per-window factors (LOZO's V, SubZero's U and V, ZO-Muon's P)


def step_seed(seed: int, index: int) -> int:
    """Seed of the factor of parameter ``index`` drawn afresh for the step/query seed ``seed``."""
    return mix_seed(seed, index, TAG_ROW)


def window_seed(base_seed: int, name: str, window: int, index: int) -> int:
    """Seed of factor ``name`` of parameter ``index`` for a window of steps."""
    return mix_seed(base_seed, TAG_WINDOW, zlib.crc32(name.encode()), window, index)


def matrix_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(m, n) if a parameter of this (global) shape is treated as a matrix, else None."""
    if len(shape) < 2:
        return None
    layout = BlockLayout.for_shape(shape, 1)
    if layout.rows < 2 or layout.row_len < 2:
        return None
    return layout.rows, layout.row_len


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 parameters, fp32 for everything else (the engine's state precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gaussian(seed: int, rows: int, cols: int, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A rows x cols N(0, 1) matrix that depends only on ``seed`` (generated in fp32)."""
    out = torch.empty(rows, cols, dtype=torch.float32, device=device)
    fill_noise(out, seed, "gaussian")
    return out.to(dtype)


def orthonormal(seed: int, rows: int, cols: int, *, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Haar-random rows x cols matrix with orthonormal columns (QR of a Gaussian, R's signs fixed)."""
    q, r = torch.linalg.qr(gaussian(seed, rows, cols, device=device, dtype=dtype), mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).contiguous()


def newton_schulz5(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration: approximately U V^T of the SVD g = U S V^T.

    Coefficients (3.4445, -4.7750, 2.0315) as in Muon and ZO-Muon's code; the input is first
    scaled to Frobenius norm 1 (so its spectral norm is <= 1). The result's singular values
    lie roughly in [0.7, 1.2], not exactly 1 (the iteration trades exactness for speed).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.shape[-2] > g.shape[-1]
    x = g.mT if tall else g
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the small per-step factor algebra (QR, Newton-Schulz, r x r products) on one thread.

    MKL's results for these shapes depend on its thread count; computing them always with
    one intra-op thread makes the factors a function of the seeds only. They are O((m + n) r^2)
    per matrix, so the single thread costs little.
    """
    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def low_rank_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a (rows x r) and b (r x n), the same bits for any thread count.

    On CPU, MKL's GEMM of small shapes gives different roundings in the main thread and in
    worker threads, which would make the direction depend on ``num_threads``; so the product
    is a fixed-order chain of r elementwise multiply-adds (the engine's own kind of pass).
    On other devices (one thread, deterministic GEMM for a given shape) it is a GEMM.
    """
    if a.device.type != "cpu":
        return a @ b
    # b's rows must be contiguous: a transposed factor (V^T) makes every pass a strided read that
    # the elementwise kernels do not vectorise (6x slower for SubZero's rank 24). A no-op for the
    # step's factors (MatrixZO stores them contiguous); other callers' B costs an r x n copy
    b = b.contiguous()
    out = a[:, :1] * b[:1]
    for k in range(1, a.shape[1]):
        out.addcmul_(a[:, k : k + 1], b[k : k + 1])
    return out


class MatrixZO(ZOOptimizer):
    """Base class: matrices are perturbed along ``A @ B`` (see the module docstring).

    Subclasses implement :meth:`factors`; matrix blocks then generate no block noise.
    """

    def __init__(self, params, defaults: dict, **engine):
        super().__init__(params, defaults, **engine)
        self._factors: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._windows: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ subclass hooks
    def factors(self, param: torch.Tensor, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of matrix parameter ``index`` for the step/query seed ``seed``: A is m x r, B r x n."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    def is_matrix(self, param: torch.Tensor) -> bool:
        return matrix_dims(self.comm.local_rows(param)[2]) is not None

    def dims(self, param: torch.Tensor) -> tuple[int, int]:
        dims = matrix_dims(self.comm.local_rows(param)[2])
        assert dims is not None
        return dims

    def _factor_device(self, param: torch.Tensor) -> torch.device:
        return self.noise_device or self.comm.local_rows(param)[0].device

    def step_gaussian(self, param: torch.Tensor, index: int, seed: int, rows: int, cols: int) -> torch.Tensor:
        """A Gaussian factor drawn afresh for each step/query seed."""
        local = self.comm.local_rows(param)[0]
        out = gaussian(step_seed(seed, index), rows, cols, device=self._factor_device(param),
                       dtype=work_dtype(param.dtype))
        return out.to(local.device)

    def window_factor(self, param: torch.Tensor, index: int, name: str, window: int, rows: int, cols: int,
                      kind: str = "gaussian") -> torch.Tensor:
        """A factor kept for a window of steps: regenerated from (base seed, window, index), cached."""
        key = (name, index, window)
        cached = self._windows.get(key)
        if cached is not None:
            return cached
        make = gaussian if kind == "gaussian" else orthonormal
        seed = window_seed(self.zo_state["seed"], name, window, index)
        local = self.comm.local_rows(param)[0]
        value = make(seed, rows, cols, device=self._factor_device(param), dtype=work_dtype(param.dtype))
        value = value.to(local.device)
        for old in [k for k in self._windows if k[0] == name and k[1] == index and k[2] < window - 1]:
            del self._windows[old]  # keep this window and the previous one (LOZO-M projects onto it)
        self._windows[key] = value
        return value

    def row_factor(self, block: Block, a: torch.Tensor) -> torch.Tensor:
        """The rows of a global m x r factor that belong to this block (FSDP: the local rows)."""
        g0 = block.slot.row_offset + block.r0
        return a[g0 : g0 + (block.r1 - block.r0)]

    def cached_tensors(self) -> list[torch.Tensor]:
        """The window factors kept between steps (memory accounting: ``zotune bench step``'s state column)."""
        return list(self._windows.values())

    # ------------------------------------------------------------------ engine hooks
    def slot_noise_streams(self, param: torch.Tensor) -> int:
        return 0 if self.is_matrix(param) else self.noise_streams

    def direction_for(self, block: Block, noise: list[torch.Tensor], seed: int) -> torch.Tensor:
        if not noise and self.is_matrix(block.slot.param):
            a, b = self._factors[seed][block.slot.index]
            return low_rank_product(self.row_factor(block, a), b)
        return self.direction(block, noise)

    def _ensure_factors(self, seeds) -> None:
        """Build the factors of ``seeds`` for every matrix, single-threaded, before a sweep."""
        for seed in seeds:
            if seed in self._factors:
                continue
            factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            with single_threaded():
                for slot in self.active_slots():  # with layer_fraction < 1: this step's layers only
                    if self.is_matrix(slot.param):
                        a, b = self.factors(slot.param, slot.index, seed)
                        factors[slot.index] = a, b.contiguous()  # once per step, not per block (V^T is a view)
            self._factors[seed] = factors

    def _displace(self, seed: int, coef) -> None:
        self._ensure_factors([seed])
        super()._displace(seed, coef)

    def _update(self, seeds, kernel) -> None:
        self._ensure_factors([s for s in seeds if s in self._pending])
        super()._update(seeds, kernel)

    def _after_step(self) -> None:
        self._factors = {}  # per-step factors; window factors stay cached
        super()._after_step()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._factors, self._windows = {}, {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_factors"], state["_windows"] = {}, {}
        return state

    # ------------------------------------------------------------------ a two-point step on A B
    def _sgd_step(self, closure: Closure) -> float:
        """Two-point SPSA along A B (dense z for vectors), then theta -= lr (c A B + wd theta)."""
        seed = self._seed()
        plus, minus, c = self._spsa(closure, seed)

        def kernel(block: Block, noises: Noises) -> None:
            block.decay_weights()
            block.param.add_(self.direction_for(block, noises[0], seed), alpha=-block.group["lr"] * c)

        self._ensure_factors([seed])  # the kernel needs them even if nothing is pending
        self._update([seed], kernel)
        return 0.5 * (plus + minus)

