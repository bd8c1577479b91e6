"""Streaming offload: train a decoder whose blocks live in CPU memory, one block on the device at a time.

:class:`StreamingOffload` attaches to a model and its zeroth-order optimizer:

* the decoder blocks' weights stay in (pinned, on CUDA) CPU memory -- their *storage*; the
  embeddings, the final norm and the LM head move to the compute device and stay there;
* a step runs the +eps and the -eps forward block by block (two closure threads kept in lock step,
  :mod:`zotune.offload.lockstep`). Block ``i`` is uploaded (block ``i + 1`` is queued behind it on
  the copy stream, so its upload overlaps block ``i``'s compute), the pending update of the previous
  step is applied to it and it is perturbed by +eps from the seed; the ``+`` stream passes through
  it; it is moved to -eps; the ``-`` stream passes; it is restored and written back. So a block
  crosses the bus once each way per step (with its optimizer state, for methods that keep state);
* the update of step ``t`` is therefore *lazy* for the blocks (ZO2's scheme): it is applied when the
  block is next uploaded, at step ``t + 1``, with step ``t``'s learning rate. It is flushed before
  anything can observe the weights: a forward outside a step (evaluation), ``model.state_dict()``
  (checkpoints), ``optimizer.state_dict()``, :meth:`StreamingOffload.flush` and
  :meth:`StreamingOffload.close`. Reading parameters directly (``model.parameters()``) does not
  flush: call :meth:`~StreamingOffload.flush` first. Weights outside the blocks are updated at once;
* perturbations are the engine's: the same slots, noise blocks and seeds, so the trajectory is the
  in-memory run's. For every element the same additions happen in the same order (+eps, -2eps,
  +eps, then the update), so on one device the run is bit-identical, except for a trainable weight
  used both below block 0 and after the last block (a LM head tied to the embeddings): the top of the
  ``+`` stream needs it at +eps after the bottom of the ``-`` stream left it at -eps, so it moves by
  +2eps and -2eps once more (equal to fp32 rounding of that matrix; low-precision weights are set
  from their master, so exact).

Supported: the optimizers whose update of a block needs only that block, its state and the step's
scalars (:data:`SUPPORTED`), fp32 or low-precision weights (a bf16 / fp16 block travels with its fp32
master), one process. :func:`offload_refusal` gives the one-line reason otherwise. See docs/offload.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zotune.models.arch import decoder_stack
from zotune.offload.checks import offload_refusal
from zotune.offload.lockstep import BOTTOM, TOP, Lockstep
from zotune.offload.transport import Key, Transport
from zotune.optim.blocks import Block, _Slot
from zotune.optim.engine import Noises, ZOOptimizer
from zotune.optim.sweep import block_noises

__all__ = ["OffloadError", "StreamingOffload"]

_MISSING = object()


class OffloadError(RuntimeError):
    """The closure did not run the decoder as offload needs (once per call, blocks in order)."""


@dataclass
class _Deferred:
    """An update of a past step, not yet applied to a block: its seeds, its kernel and its groups."""

    seeds: tuple[int, ...]
    kernel: Callable[[Block, Noises], None]
    groups: list[dict[str, Any]]


class StreamingOffload:
    """Keep the decoder blocks of ``model`` in CPU memory and stream them through ``device``.

    Args:
        model: a causal LM whose decoder :func:`~zotune.models.arch.decoder_stack` knows.
        optimizer: a zeroth-order optimizer over ``model``'s parameters (see :data:`SUPPORTED`).
        device: the compute device (default: cuda if available). ``"cpu"`` simulates a device:
            the blocks' storage and their compute copies are separate CPU tensors (for tests).
        log_events: record every upload / write-back / compute in :attr:`events`.

    Raises ``ValueError`` with a one-line reason when offload cannot work (:func:`offload_refusal`).
    """

    def __init__(self, model: nn.Module, optimizer: ZOOptimizer, device: str | torch.device | None = None,
                 *, log_events: bool = False) -> None:
        refusal = offload_refusal(model, optimizer)
        if refusal is not None:
            raise ValueError(refusal)
        stack = decoder_stack(model)
        assert stack is not None
        self.model, self.opt, self.stack = model, optimizer, stack
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        optimizer.noise_generated_on(self.device)  # the blocks' noise is drawn on the device, not in CPU memory
        self.layers = list(stack.layers)
        self.num_blocks = len(self.layers)
        self.params: list[list[tuple[str, nn.Parameter]]] = [list(m.named_parameters()) for m in self.layers]
        self.block_of: dict[int, tuple[int, str]] = {id(p): (i, n) for i, ps in enumerate(self.params) for n, p in ps}
        self.storage: list[dict[str, torch.Tensor]] = []
        self._place()
        self.transport = Transport(self.device, self.num_blocks, self._block_tensors, self._block_writable)
        self.transport.log_events = log_events
        self.pending: list[list[_Deferred]] = [[] for _ in range(self.num_blocks)]
        self._lock: Lockstep | None = None
        self._current: list[Any] | None = None  # [block, its displacement] while a block is moved
        self._active: list[_Slot] | None = None
        self._noise_buffers: dict[tuple[str, int], torch.Tensor] = {}
        self.stats = {"steps": 0, "flushes": 0}
        self._install()

    def describe(self) -> str:
        """One line: where the weights are (``zotune train`` prints it)."""
        def mb(tensors: Any) -> float:
            return sum(t.numel() * t.element_size() for t in tensors) / 2**20

        blocks = mb(t for store in self.storage for t in store.values())
        rest = mb(p for p in self.model.parameters() if id(p) not in self.block_of)
        where = "pinned CPU memory" if self.device.type == "cuda" else "CPU memory (simulated device)"
        return (f"{self.num_blocks} decoder blocks ({blocks:.0f} MB) in {where}, streamed through "
                f"{self.device} {self.transport.ring_size} at a time; embeddings, final norm and head "
                f"({rest:.0f} MB) on {self.device}")

    # ------------------------------------------------------------------ placement
    def _place(self) -> None:
        """Blocks' parameters to (pinned) CPU storage; everything else (and the blocks' buffers) to the device."""
        pin = self.device.type == "cuda"
        for i, layer in enumerate(self.layers):
            store = {}
            for name, p in self.params[i]:
                data = p.data if p.device.type == "cpu" else p.data.cpu()
                if pin and not data.is_pinned():
                    data = data.pin_memory()
                p.data = data
                store[name] = data
            self.storage.append(store)
            for sub in layer.modules():
                for name, buf in list(sub._buffers.items()):
                    if buf is not None:
                        sub._buffers[name] = buf.to(self.device)
        blocks = {id(m) for layer in self.layers for m in layer.modules()}
        for sub in self.model.modules():
            if id(sub) in blocks:
                continue
            for p in sub._parameters.values():
                if p is not None and id(p) not in self.block_of and p.device != self.device:
                    p.data = p.data.to(self.device)
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.device != self.device:
                    sub._buffers[name] = buf.to(self.device)
        for p, state in self.opt.state.items():  # optimizer state follows its weight (blocks' state: CPU)
            target = torch.device("cpu") if id(p) in self.block_of else self.device
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.device != target:
                    state[key] = value.to(target)
        self.opt._slots = None  # rebuilt at the next step: views of the storage / device tensors

    def _block_tensors(self, i: int) -> dict[Key, torch.Tensor]:
        """Block ``i``'s storage: every parameter, and the d-sized state of its trainable ones."""
        out: dict[Key, torch.Tensor] = {("param", n): self.storage[i][n] for n, _ in self.params[i]}
        for name, p in self.params[i]:
            if p.requires_grad and p in self.opt.state:
                for key, value in self.opt.state[p].items():
                    if torch.is_tensor(value) and value.is_floating_point() and value.numel() == p.numel():
                        out[("state", name, key)] = value
        return out

    def _prepare(self) -> None:
        """The engine's preparation, then the blocks' optimizer state into (pinned) CPU memory.

        Done before the step, not at upload: the engine's slots hold views of the state (the fp32
        master of low-precision weights), so they are rebuilt when a state tensor is replaced.
        """
        self._orig_prepare()
        pin, moved = self.device.type == "cuda", False
        for i in range(self.num_blocks):
            for key, value in self._block_tensors(i).items():
                if key[0] == "state" and (value.device.type != "cpu" or (pin and not value.is_pinned())):
                    p = dict(self.params[i])[key[1]]
                    self.opt.state[p][key[2]] = value.cpu().pin_memory() if pin else value.cpu()
                    moved = True
        if moved:
            self.opt._slots = None
            self._orig_prepare()

    def _block_writable(self, i: int) -> set[Key]:
        keys = self._block_tensors(i)
        trainable = {n for n, p in self.params[i] if p.requires_grad}
        return {k for k in keys if k[1] in trainable}

    def _swap(self, i: int, on_device: bool) -> None:
        bufs = self.transport.buffers(i) if on_device else None
        for name, p in self.params[i]:
            p.data = bufs[("param", name)] if bufs is not None else self.storage[i][name]

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        self._saved: list[tuple[nn.Module, Any]] = []
        for i, layer in enumerate(self.layers):
            self._saved.append((layer, layer.__dict__.get("forward", _MISSING)))
            layer.forward = self._gated(i, layer.forward)
        flush_hook = lambda *_a, **_k: self.flush()  # noqa: E731
        self._handles = [m.register_state_dict_pre_hook(flush_hook) for m in (self.model, *self.layers)]
        # loading weights: the pending update first, so the loaded values are what the blocks hold after
        self._handles += [m.register_load_state_dict_pre_hook(flush_hook) for m in (self.model, *self.layers)]
        self._handles.append(self.stack.base.register_forward_pre_hook(self._bottom_gate))
        opt = self.opt
        self._orig = {name: opt.__dict__.get(name, _MISSING)
                      for name in ("_two_point", "_update", "active_slots", "state_dict", "load_state_dict",
                                   "_prepare")}
        self._orig_update = opt._update
        self._orig_prepare = opt._prepare
        self._orig_displace = opt._displace
        orig_state_dict, orig_load = opt.state_dict, opt.load_state_dict

        def state_dict() -> dict[str, Any]:
            self.flush()
            return orig_state_dict()

        def load_state_dict(sd: dict[str, Any]) -> None:
            self.pending = [[] for _ in range(self.num_blocks)]  # the loaded state replaces them
            orig_load(sd)

        opt._two_point = self._two_point  # type: ignore[method-assign]
        opt._update = self._update  # type: ignore[method-assign]
        opt._prepare = self._prepare  # type: ignore[method-assign]
        opt.active_slots = self._active_slots  # type: ignore[method-assign]
        opt.state_dict = state_dict  # type: ignore[method-assign]
        opt.load_state_dict = load_state_dict  # type: ignore[method-assign]

    def close(self) -> None:
        """Flush the pending update and take the hooks off (the blocks stay in CPU memory)."""
        self.flush()
        for layer, previous in self._saved:
            if previous is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous
        self._saved = []
        for h in self._handles:
            h.remove()
        self._handles = []
        for name, previous in self._orig.items():
            if previous is _MISSING:
                self.opt.__dict__.pop(name, None)
            else:
                setattr(self.opt, name, previous)

    def _gated(self, i: int, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            lock = self._lock
            if lock is None or lock.role() is None:
                return self._plain_forward(i, original, args, kwargs)
            lock.arrive(i)
            role = lock.role()
            self.transport.log("forward", (i, role))
            out = original(*args, **kwargs)
            self.transport.log("forward_end", (i, role))
            if i == self.num_blocks - 1:
                lock.arrive(TOP)
            return out

        return forward

    def _bottom_gate(self, _module: nn.Module, _args: Any) -> None:
        lock = self._lock
        if lock is not None and lock.role() is not None:
            lock.arrive(BOTTOM)

    def _plain_forward(self, i: int, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """A forward outside a step (evaluation): flush, then stream the blocks read-only."""
        if any(self.pending):
            self.flush()
        if i == 0:
            self.transport.reset()  # whatever an aborted forward left behind
        self.transport.upload(i)
        if i + 1 < self.num_blocks:
            self.transport.upload(i + 1)
        self.transport.ready(i)
        self._swap(i, True)
        try:
            return original(*args, **kwargs)
        finally:
            self._swap(i, False)
            self.transport.release(i)

    # ------------------------------------------------------------------ the engine's hooks
    def _resident_slots(self) -> list[_Slot]:
        return [s for s in (self.opt._slots or []) if id(s.param) not in self.block_of]

    def _active_slots(self) -> list[_Slot]:
        """What the engine's own sweeps see: the resident weights (or the subset a stage moves)."""
        return self._active if self._active is not None else self._resident_slots()

    def _slots_of(self, i: int) -> list[_Slot]:
        return [s for s in (self.opt._slots or []) if self.block_of.get(id(s.param), (-1, ""))[0] == i]

    def _displace(self, seed: int, coef: float, slots: list[_Slot], before: float = 0.0) -> None:
        """The engine's displacement of ``slots`` (resident weights) from ``before`` to ``before + coef``."""
        if not slots or coef == 0.0:
            return
        self._active = slots
        self.opt._pending[seed] = [before] * len(self.opt.param_groups)  # low precision: round(master + after u)
        try:
            self._orig_displace(seed, coef)
        finally:
            self._active = None

    def _stages(self) -> tuple[list[_Slot], list[_Slot], list[_Slot]]:
        """Resident trainable slots: used before block 0 only, after the last block only, or (tied / unknown) both."""
        stack = self.stack
        after = {id(p) for m in (stack.final_norm, *stack.top) if m is not None for p in m.parameters()}
        before = {id(p) for p in stack.base.parameters() if id(p) not in self.block_of} - {
            id(p) for m in (stack.final_norm, getattr(stack.base, "project_out", None)) if m is not None
            for p in m.parameters()}
        bottom, top, both = [], [], []
        for s in self._resident_slots():
            pid = id(s.param)
            if pid in before and pid not in after:
                bottom.append(s)
            elif pid in after and pid not in before:
                top.append(s)
            else:
                both.append(s)
        return bottom, top, both

    def _update(self, seeds: list[int] | tuple[int, ...], kernel: Callable[[Block, Noises], None]) -> None:
        """Resident weights: the engine's update now. Blocks: deferred to their next upload (or a flush)."""
        self._orig_update(seeds, kernel)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        deferred = _Deferred(tuple(seeds), kernel, groups)
        for i in range(self.num_blocks):
            if any(p.requires_grad for _, p in self.params[i]):
                self.pending[i].append(deferred)

    # ------------------------------------------------------------------ block passes
    def _noise_buffer(self, device: torch.device, k: int, shape: tuple[int, int]) -> torch.Tensor:
        key = (str(device), k)
        count = shape[0] * shape[1]
        buf = self._noise_buffers.get(key)
        if buf is None or buf.numel() < count:
            buf = self._noise_buffers[key] = torch.empty(count, dtype=torch.float32, device=device)
        return buf[:count].view(shape)

    def _noises(self, slot: _Slot, j: int, seeds: tuple[int, ...], shape: tuple[int, int]) -> Noises:
        """The raw noise of noise block ``j`` of ``slot`` for ``seeds``, as the engine's sweep makes it."""
        return block_noises(self._noise_buffer, seeds, slot.index, j, self.opt.slot_noise_streams(slot.param),
                            shape, self.opt.distribution, self.opt.noise_device or self.device, self.device)

    def _pass(self, i: int, seed: int | None, coef: float, deferred: Sequence[_Deferred] = (),
              after: float = 0.0) -> None:
        """One pass over block ``i`` on the device: apply ``deferred`` updates, then move by ``coef * u(seed)``.

        Low-precision weights are moved as the engine moves them: ``round(master + after * u)`` with
        ``after`` the block's displacement once moved, and set to ``round(master)`` after an update.
        """
        bufs = self.transport.buffers(i)
        groups = self.opt.param_groups
        for slot in self._slots_of(i):
            name = self.block_of[id(slot.param)][1]
            master = bufs.get(("state", name, "master"))
            proxy = dataclasses.replace(slot, data=bufs[("param", name)].view(slot.data.shape),
                                        master=None if master is None else master.view(slot.data.shape))
            state = dict(self.opt.state[slot.param])
            for key in state:
                if ("state", name, key) in bufs:
                    state[key] = bufs[("state", name, key)]
            layout = slot.layout
            for j in range(layout.n_blocks):
                r0, r1 = layout.block_rows(j)
                shape = (r1 - r0, layout.row_len)
                rows = proxy.data[r0:r1]
                for d in deferred:
                    noises = self._noises(slot, j, d.seeds, shape)
                    d.kernel(Block(proxy, r0, r1, d.groups[slot.group_index], state), noises)
                    if proxy.master is not None:
                        rows.copy_(proxy.master[r0:r1])
                if seed is not None and coef != 0.0:
                    block = Block(proxy, r0, r1, groups[slot.group_index], state)
                    u = self.opt.direction_for(block, self._noises(slot, j, (seed,), shape)[0], seed)
                    if proxy.master is None:
                        rows.add_(u, alpha=coef)
                    else:
                        rows.copy_(torch.add(block.param, u, alpha=after))
        self.transport.log("compute", (i, "update" if seed is None else coef))

    def flush(self) -> None:
        """Apply every pending update to the blocks' storage (a streaming pass over the blocks that have one)."""
        if self._lock is not None or not any(self.pending):
            return
        todo = [i for i in range(self.num_blocks) if self.pending[i]]
        self.transport.reset()
        for n, i in enumerate(todo):
            self.transport.upload(i)
            if n + 1 < len(todo):
                self.transport.upload(todo[n + 1])
            self.transport.ready(i)
            deferred, self.pending[i] = self.pending[i], []
            self._pass(i, None, 0.0, deferred)
            self.transport.writeback(i)
        self.transport.finish()
        self.stats["flushes"] += 1

    # ------------------------------------------------------------------ the step
    def _expect(self, got: Any, want: Any, role: str) -> None:
        def where(gate: Any) -> str:
            return {None: "the end of the closure", TOP: "the top", BOTTOM: "the start of a model forward"}.get(
                gate, f"block {gate}")

        if got != want:
            raise OffloadError(f"offload: the {role}eps forward reached {where(got)} where {where(want)} was "
                               "expected; the closure must run the model's decoder blocks in order, the same "
                               "number of times for +eps and -eps")

    def _two_point(self, closure: Callable[[], Any], seed: int) -> tuple[float, float]:
        """L(theta + eps u) and L(theta - eps u), block by block; leaves the resident weights at -eps u.

        Each model forward the closure runs is a *pass*: both streams stop before it (``BOTTOM``), at every
        block and after the last block (``TOP``). Resident weights are moved per stage: those used below
        block 0 before the bottoms, those used after the last block before the tops.
        """
        eps, lock = self.opt.eps, Lockstep(self.device)
        cats = dict(zip(("bottom", "top", "both"), self._stages()))
        moved = dict.fromkeys(cats, 0.0)

        def to(sign: float, *names: str) -> None:  # move resident stages to +eps (sign 1) or -eps (-1)
            for name in names:
                self._displace(seed, sign * eps - moved[name], cats[name], moved[name])
                moved[name] = sign * eps

        def forward() -> float:
            return self.opt._forward(closure)

        self._lock = lock
        try:
            for role in ("+", "-"):
                lock.run(role, forward)
                self._expect(lock.wait(role), BOTTOM, role)
            while True:  # one model forward of both streams per round
                for role, sign in (("+", 1.0), ("-", -1.0)):
                    to(sign, "bottom", "both")
                    lock.release(role)
                    self._expect(lock.wait(role), 0, role)
                self._stream_blocks(seed, lock)
                ends = []
                for role, sign in (("+", 1.0), ("-", -1.0)):
                    to(sign, "top", "both")
                    lock.release(role)
                    ends.append(lock.wait(role))
                if ends[0] is None and ends[1] is None:
                    break
                for role, end in zip(("+", "-"), ends):
                    self._expect(end, BOTTOM, role)
            plus, minus = lock.result("+"), lock.result("-")
            self.transport.finish()
        except BaseException:
            lock.abort()
            self._unwind(seed, moved, cats)
            raise
        finally:
            self._lock = None
        self.opt._pending = {seed: [-eps] * len(self.opt.param_groups)}
        self.stats["steps"] += 1
        return tuple(self.opt._reduce(plus, minus))  # type: ignore[return-value]

    def _stream_blocks(self, seed: int, lock: Lockstep) -> None:
        """Both streams through every block: upload, (pending update,) +eps, +, -2eps, -, +eps, write back."""
        eps, L = self.opt.eps, self.num_blocks
        self.transport.reset()
        self.transport.upload(0)
        for i in range(L):
            if i + 1 < L:
                self.transport.upload(i + 1)  # queued now: overlaps block i's compute
            self.transport.ready(i)
            self._swap(i, True)
            deferred, self.pending[i] = self.pending[i], []
            self._current = [i, 0.0]
            self._pass(i, seed, eps, deferred, after=eps)
            self._current[1] = eps
            nxt = i + 1 if i + 1 < L else TOP
            for role, coef in (("+", -2.0 * eps), ("-", eps)):
                lock.release(role)
                self._expect(lock.wait(role), nxt, role)
                self._current[1] += coef
                self._pass(i, seed, coef, after=self._current[1])
            self._current = None
            self._swap(i, False)
            self.transport.writeback(i)

    def _unwind(self, seed: int, moved: dict[str, float], cats: dict[str, list[_Slot]]) -> None:
        """After an exception inside a step: every weight back where the step found it."""
        if self._current is not None:
            i, offset = self._current
            if offset != 0.0:
                self._pass(i, seed, -offset, after=0.0)
            self._swap(i, False)
            self.transport.writeback(i)
            self._current = None
        self.transport.reset()
        for name, slots in cats.items():
            self._displace(seed, -moved[name], slots, moved[name])
        self.opt._pending = {}
