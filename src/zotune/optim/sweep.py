"""The block sweep of the SPSA engine: slots, layer subsets and the threaded noise pass.

:class:`BlockSweep` is the half of :class:`~zotune.optim.engine.ZOOptimizer` that walks the
trainable parameters block by block: it builds one slot per trainable parameter (whose index
is part of the noise contract), picks the step's layer subset, splits the blocks between
worker threads and regenerates each block's noise from ``(seed, slot, block, stream)`` before
calling a kernel on it. The step protocol (forwards, displacements, updates, safety) lives in
:mod:`zotune.optim.engine`; both halves share the optimizer's attributes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from zotune.optim.blocks import Block, _Slot
from zotune.optim.layers import layer_subset, layer_units
from zotune.optim.lazy import Part
from zotune.optim.noise import BlockLayout, block_seed, fill_noise

#: ``noises[i][t]``: stream ``t`` of the raw noise of seed ``i`` for one block.
Noises = list[list[torch.Tensor]]

LOW_PRECISION = (torch.float16, torch.bfloat16)
#: elements a CPU sweep needs per perturbation worker thread (4 default blocks; see BlockSweep._threads)
MIN_ELEMENTS_PER_WORKER = 1 << 20


def block_noises(view: Callable[[torch.device, int, tuple[int, int]], torch.Tensor], seeds: Sequence[int],
                 slot_index: int, j: int, streams: int, shape: tuple[int, int], distribution: str,
                 gen_device: torch.device, device: torch.device) -> Noises:
    """The raw noise of block ``j`` of slot ``slot_index`` for ``seeds``: stream ``t`` of seed ``i`` is
    drawn on ``gen_device`` into ``view(gen_device, i * streams + t, shape)`` from its block seed, then
    copied to ``device`` if that differs (the noise contract; the sweep and the streaming offload share it).
    """
    out: Noises = []
    for si, seed in enumerate(seeds):
        zs = []
        for t in range(streams):
            k = si * streams + t
            z = view(gen_device, k, shape)
            fill_noise(z, block_seed(seed, slot_index, j, t), distribution)
            if gen_device != device:
                z = view(device, k, shape).copy_(z)
            zs.append(z)
        out.append(zs)
    return out


class BlockSweep:
    """Mixin of :class:`~zotune.optim.engine.ZOOptimizer`: slots and the block-by-block noise pass."""

    # set by ZOOptimizer.__init__ / step (declared for readers and type checkers)
    param_groups: list[dict[str, Any]]
    state: Any
    _slots: list[_Slot] | None

    def _trainable_signature(self) -> tuple[bool, ...]:
        return tuple(bool(p.requires_grad) for g in self.param_groups for p in g["params"])

    def _build_slots(self) -> list[_Slot]:
        """One slot per trainable parameter, in param-group order (the index is part of the noise contract).

        Parameters with ``requires_grad=False`` are skipped, as torch.optim skips parameters
        without a gradient: they are never perturbed or updated and get no state. The noise
        index counts trainable parameters only, so the directions of a trainable parameter do
        not depend on whether frozen ones were passed (``model.parameters()`` and the list of
        trainable parameters give the same run).
        """
        slots: list[_Slot] = []
        index = 0
        self._signature = self._trainable_signature()
        names = {id(p): n for n, p in self.module.named_parameters()} if self.module is not None else {}
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        units = layer_units([names.get(id(p), f"#{i}") for i, p in enumerate(params)])
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                local, row_offset, global_shape = self.comm.local_rows(p)
                if not local.is_contiguous():
                    raise ValueError(
                        f"parameter {index} (shape {tuple(p.shape)}) is not contiguous; zotune perturbs "
                        "parameters in place and needs contiguous storage"
                    )
                layout = BlockLayout.for_shape(global_shape, self.block_size)
                data = local.view(-1, layout.row_len) if local.numel() else local.view(0, max(layout.row_len, 1))
                master = None
                state = self.state[p]
                if p.dtype in LOW_PRECISION:
                    if "master" not in state:
                        state["master"] = local.detach().to(torch.float32).clone()
                    master = state["master"].view(data.shape)
                elif self.exact_restore:
                    shadow = getattr(self, "_shadows", None)
                    if shadow is None:
                        shadow = self._shadows = {}
                    if id(p) not in shadow:
                        shadow[id(p)] = data.detach().clone()
                    master = shadow[id(p)]
                elif p.dtype not in (torch.float32, torch.float64):
                    raise ValueError(
                        f"unsupported parameter dtype {p.dtype}; use float32, bfloat16, float16 (or float64)"
                    )
                slots.append(_Slot(p, index, gi, layout, row_offset, data, master, units[index]))
                index += 1
        return slots

    def active_slots(self) -> list[_Slot]:
        """The slots this step perturbs and updates: all, or the step's layer subset."""
        slots = self._slots or []
        if self.layer_fraction >= 1.0 or not slots:
            return slots
        n_units = max(s.unit for s in slots) + 1
        chosen = layer_subset(self.zo_state["seed"], self.zo_state["step"], n_units, self.layer_fraction,
                              self.layer_schedule)
        return [s for s in slots if s.unit in chosen]

    def _work_items(self, slots: Sequence[_Slot] | None = None) -> list[tuple[_Slot, int, int, int, int, int]]:
        """(slot, block j, local r0, local r1, noise-row start, noise-row stop) per block of ``slots``
        (default: the active slots)."""
        items = []
        for slot in self.active_slots() if slots is None else slots:
            lo, hi = slot.row_offset, slot.row_offset + slot.local_rows
            for j in slot.layout.blocks_overlapping(lo, hi):
                b0, b1 = slot.layout.block_rows(j)
                r0, r1 = max(b0, lo), min(b1, hi)
                items.append((slot, j, r0 - lo, r1 - lo, r0 - b0, r1 - b0))
        return items

    def _pass_plan(self, wanted: set[int]) -> tuple[list[tuple[_Slot, int, int, int, int, int]], dict[int, int], int]:
        """(work items, noise streams per slot, largest block) of a pass over the slots ``wanted``;
        kept while the slots are (a GPU pass would otherwise rebuild them for every block's few us)."""
        key = frozenset(wanted)
        cache = getattr(self, "_plan_cache", None)
        if cache is None or cache[0] != key or cache[1] is not self._slots:  # the slots are rebuilt as a new list
            slots = [s for s in self._slots or [] if s.index in wanted]
            streams_of = {slot.index: self.slot_noise_streams(slot.param) for slot in self._slots or []}
            max_block = max((s.layout.rows_per_block * max(s.layout.row_len, 1) for s in self._slots or []),
                            default=1)
            cache = self._plan_cache = (key, self._slots, (self._work_items(slots), streams_of, max_block))
        return cache[2]

    def _threads(self) -> int:
        """Worker threads of a CPU sweep: 1 on GPUs and for small models, else min(4, torch's threads, cores).

        A worker costs a pool dispatch per sweep and brings its own OpenMP team, so it only pays off
        with at least ``MIN_ELEMENTS_PER_WORKER`` elements to generate (``zotune bench threads``).
        """
        if self.num_threads is not None:
            return max(1, int(self.num_threads))
        slots = self._slots or []
        if any(s.data.device.type != "cpu" for s in slots):
            return 1
        by_size = sum(s.data.numel() for s in slots) // MIN_ELEMENTS_PER_WORKER
        return max(1, min(4, torch.get_num_threads(), os.cpu_count() or 1, by_size))

    def _sweep(self, seeds: Sequence[int], kernel: Callable[[Block, Noises], None]) -> None:
        """Regenerate the noise of ``seeds`` block by block and call ``kernel`` on each active block.

        A deferred update (``lazy_update``) is applied in the same pass, to each block before
        ``kernel`` sees it: every kernel reads only its own block, so that is the eager order.
        """
        self._sweep_parts([*self._take_deferred(), Part(self.active_slots(), list(seeds), kernel, self.param_groups)])

    def _sweep_parts(self, parts: Sequence[Part]) -> None:
        """One pass over the union of the parts' slots; per block, each part containing the
        block's slot regenerates its seeds' noise and runs its kernel, in the order of ``parts``.

        A lazy step's first displacement is two parts: the deferred restore + update of the
        previous step (its own layer subset, its lr) and the +eps displacement of this step.
        """
        members = [{s.index for s in part.slots} for part in parts]
        wanted = set().union(*members)
        items, streams_of, max_block = self._pass_plan(wanted)
        self.pass_counts["passes"] += 1
        nthreads = min(self._threads(), max(1, len(items)))

        def run(worker: int) -> None:
            with torch.no_grad():  # grad mode is per thread: a worker does not inherit the caller's no_grad
                work(worker)

        def work(worker: int) -> None:
            buffers: dict[tuple[str, int], torch.Tensor] = {}  # shared by the parts: one runs after the other
            # (device, buffer k, block shape) -> the buffer viewed as that block: most blocks of a
            # model share a few shapes, and a view costs microseconds, which a GPU pass pays per block
            views: dict[tuple[str, int, tuple[int, int]], torch.Tensor] = {}

            def view(device: torch.device, k: int, shape: tuple[int, int]) -> torch.Tensor:
                key = (str(device), k, shape)
                z = views.get(key)
                if z is None:
                    if (key[0], k) not in buffers:
                        buffers[key[0], k] = torch.empty(max_block, dtype=torch.float32, device=device)
                    z = views[key] = buffers[key[0], k][: shape[0] * shape[1]].view(shape)
                return z

            for slot, j, r0, r1, n0, n1 in items[worker::nthreads]:
                b0, b1 = slot.layout.block_rows(j)
                shape = (b1 - b0, slot.layout.row_len)
                device = slot.data.device
                gen_device = self.noise_device or device
                streams = streams_of[slot.index]
                whole = n0 == 0 and n1 == shape[0]  # a shard's block may own only some of the rows
                for pi, part in enumerate(parts):
                    if slot.index not in members[pi]:
                        continue
                    noises = block_noises(view, part.seeds, slot.index, j, streams, shape, self.distribution,
                                          gen_device, device)
                    if not whole:
                        noises = [[z[n0:n1] for z in zs] for zs in noises]
                    block = Block(slot, r0, r1, part.groups[slot.group_index], self.state[slot.param])
                    part.kernel(block, noises)

        if nthreads == 1:
            run(0)
            return
        with self._pool_lock:
            if self._pool is None or self._pool._max_workers != nthreads:  # type: ignore[attr-defined]
                self._pool = ThreadPoolExecutor(nthreads, thread_name_prefix="zotune")
            futures = [self._pool.submit(run, w) for w in range(nthreads)]
            for f in futures:
                f.result()
