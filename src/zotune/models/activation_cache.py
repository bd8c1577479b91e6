"""A frozen-bottom activation cache: run the blocks below the lowest trainable parameter once per example.

When every trainable parameter (``requires_grad=True``) lies at or above decoder block ``j``,
the hidden states entering block ``j`` depend only on the example's tokens and positions, not
on anything a zeroth-order step changes. :class:`ActivationCache` hooks the decoder so that

* the first forward of an example runs the bottom (embeddings and blocks ``0..j-1``) on the rows
  not yet cached and stores each row's hidden states at block ``j`` (real tokens only);
* every forward runs only the upper blocks, the final norm and the head on the assembled batch:
  the model's own forward still computes the attention mask and the positions / rotary
  embeddings the upper blocks need, from the batch's own ``attention_mask`` and ``position_ids``.

Rows are keyed by their content, not by their place in a batch: the token ids under the
attention mask and their position ids. With causal attention a real token never attends to
padding, so its hidden states depend on nothing else; the same example padded to another width
in another batch hits the same entry. Padded positions enter the upper blocks as zeros (their
outputs are masked out and never read). The cached path equals the uncached one to float
rounding: the matrix products run on other batch shapes, which changes the summation order
(measured on tiny fp32 models: < 1e-5 relative; the uncached path itself differs by as much
between two batch compositions).

The cache is used only where it is exact: the model in eval mode (no dropout), no KV cache
(``use_cache=False``; ``generate`` runs the whole model), no ``inputs_embeds``, no
``output_hidden_states`` / ``output_attentions``. It refuses (one-line reason, see
:func:`cache_refusal`) prefix / prompt tuning, trainable embeddings (also a tied LM head),
FSDP-sharded weights and unsupported architectures. The bottom's weights are fingerprinted
(data pointer and in-place version counter of each tensor), so changing a frozen weight in place,
moving the model or changing which parameters are trainable empties the cache.

Memory is bounded by ``max_mb``: rows that do not fit are recomputed at every forward (the
cache never evicts, so a full cache keeps serving the rows it holds).

>>> import torch
>>> from zotune.models import apply_peft
>>> from zotune.models.activation_cache import ActivationCache
>>> from zotune.testing import tiny_causal_lm
>>> model = apply_peft(tiny_causal_lm(num_layers=4), "top:1")
>>> cache = ActivationCache(model, max_mb=16)
>>> ids = torch.randint(5, 100, (3, 7))
>>> with torch.no_grad():
...     a = model(input_ids=ids, use_cache=False).logits
...     b = model(input_ids=ids, use_cache=False).logits
>>> cache.stats["bottom_rows"], cache.stats["hit_rows"], cache.split
(3, 3, 3)
>>> torch.allclose(a, b)
True
>>> cache.close()
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zotune.models.activation_store import ActivationStore
from zotune.models.arch import DecoderStack, decoder_stack, supported_decoder_types

__all__ = ["ActivationCache", "DepthSplit", "attach_activation_cache", "cache_refusal", "depth_split"]

logger = logging.getLogger(__name__)

_MISSING = object()


class _Captured(Exception):  # control flow, not an error
    """Raised by the capture hook to stop the bottom pass once block ``j``'s input is known."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


@dataclass(frozen=True)
class DepthSplit:
    """Where the trainable parameters of a decoder start.

    ``block`` is the lowest decoder block holding a trainable parameter (``num_layers`` when only
    the final norm / head are trainable, 0 when something below block 0 is). ``refusal`` is None
    when the blocks below ``block`` can be cached exactly, else the one-line reason why not.
    """

    block: int
    num_layers: int
    refusal: str | None
    bottom: tuple[torch.Tensor, ...] = ()

    def describe(self) -> str:
        """``"lowest trainable block 28 of 30"`` (or what is trainable instead)."""
        if self.num_layers == 0:
            return "decoder blocks unknown"
        if self.block >= self.num_layers:
            return f"no trainable block: only weights above the {self.num_layers} decoder blocks (final norm, head)"
        if self.block == 0 and self.refusal is not None and "below" in self.refusal:
            return f"trainable weights below block 0 of {self.num_layers}"
        return f"lowest trainable block {self.block} of {self.num_layers}"


def _is_prompt_learning(model: Any) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def depth_split(model: Any, stack: DecoderStack | None = None) -> DepthSplit:
    """Classify the trainable parameters of ``model`` by decoder block (decided from ``requires_grad``)."""
    stack = stack if stack is not None else decoder_stack(model)
    if stack is None:
        kind = str(getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__)
        return DepthSplit(0, 0, f"model type {kind!r} is not supported (supported: "
                                f"{', '.join(supported_decoder_types())})")
    n = stack.num_layers
    if _is_prompt_learning(model):  # its vectors sit outside the blocks but enter every one of them
        return DepthSplit(0, n, "prefix / prompt tuning feeds trainable vectors into every block")
    block_of = {id(p): i for i, layer in enumerate(stack.layers) for p in layer.parameters()}
    above = {id(p) for m in (stack.final_norm, *stack.top) if m is not None for p in m.parameters()}
    # The bottom: what the base computes before block 0 (embeddings, positions, input projections).
    # A LM head tied to the input embedding shares its tensor, so it counts as bottom.
    after_blocks = {id(p) for m in (stack.final_norm, getattr(stack.base, "project_out", None)) if m is not None
                    for p in m.parameters()}
    below = {id(p): p for p in stack.base.parameters() if id(p) not in block_of and id(p) not in after_blocks}
    lowest, refusal = n, None
    for name, p in model.named_parameters():
        if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
            return DepthSplit(0, n, "the weights are FSDP-sharded (DTensor)")
        if not p.requires_grad:
            continue
        if id(p) in below or (id(p) not in block_of and id(p) not in above):
            return DepthSplit(0, n, f"{name} is trainable and acts below block 0 (embeddings)")
        if id(p) in block_of:
            lowest = min(lowest, block_of[id(p)])
    if lowest == 0:
        refusal = "block 0 is trainable, so there is no frozen bottom to cache"
    elif lowest == n and stack.final_norm is None:
        refusal = "the model has no final norm to hand the cached hidden states to"
    frozen = [*below.values(), *(p for layer in list(stack.layers)[:lowest] for p in layer.parameters())]
    return DepthSplit(lowest, n, refusal, tuple(frozen))


def cache_refusal(model: Any) -> str | None:
    """None if :class:`ActivationCache` can serve ``model`` exactly, else the one-line reason."""
    return depth_split(model).refusal


def _fingerprint(split: DepthSplit) -> tuple[Any, ...]:
    # data_ptr catches a moved / reloaded tensor, _version any in-place write (add_, copy_, ...).
    return (split.block, tuple((t.data_ptr(), t._version) for t in split.bottom))


class ActivationCache:
    """Hooks on a decoder that compute its frozen bottom once per example (see the module docs).

    Args:
        model: a causal LM (plain or peft-wrapped) of a type :func:`~zotune.models.arch.decoder_stack` knows.
        max_mb: memory bound of the stored hidden states, in MiB (rows beyond it are recomputed).

    ``stats`` counts forwards served (``cached_forwards``) and passed through (``bypassed_forwards``),
    rows taken from the cache (``hit_rows``), rows run through the bottom (``bottom_rows``), rows
    that did not fit (``overflow_rows``), the stored ``entries`` / ``bytes``, and with a ``store``
    (rows on disk, shared between runs) the rows read from it (``disk_rows``) and written to it. ``close()``
    removes the hooks and frees the memory; ``enabled = False`` passes every forward through.
    """

    def __init__(self, model: Any, max_mb: float = 1024.0, store: ActivationStore | None = None) -> None:
        stack = decoder_stack(model)
        if stack is None:
            raise ValueError(depth_split(model).refusal)
        self.model, self.stack = model, stack
        self.max_bytes = int(max_mb * 2**20)
        self.entries: dict[bytes, torch.Tensor] = {}
        self.stats = dict.fromkeys(("cached_forwards", "bypassed_forwards", "hit_rows", "bottom_rows",
                                    "overflow_rows", "entries", "bytes", "disk_rows", "disk_writes"), 0)
        self.store = store
        self._checked_store = False  # the first row read back is also computed and compared
        self._state: tuple[Any, ...] | None = None
        self._busy = False  # inside our own bottom pass
        self._armed: list[tuple[nn.Module, Any]] = []
        self._out_tuple_len = 0  # 0: blocks return a tensor, else the length of the tuple they return
        self.split: int | None = None
        self.enabled = True  # False: every forward runs the whole model (the entries are kept)
        self._handles = [
            stack.base.register_forward_pre_hook(self._before, with_kwargs=True),
            stack.base.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]

    # ------------------------------------------------------------------ public

    @property
    def megabytes(self) -> float:
        return self.stats["bytes"] / 2**20

    def clear(self) -> None:
        """Forget every stored row."""
        self.entries.clear()
        self.stats["entries"] = self.stats["bytes"] = 0

    def close(self) -> None:
        """Remove the hooks and free the stored rows."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._disarm()
        self.clear()

    def summary(self) -> str:
        s = self.stats
        return (f"{s['entries']} examples cached ({self.megabytes:.1f} MB), {s['hit_rows']} rows served from the "
                f"cache, {s['bottom_rows']} run through the bottom ({s['overflow_rows']} beyond --cache-mb), "
                f"{s['cached_forwards']} forwards cached, {s['bypassed_forwards']} not"
                + (f"; on disk: {s['disk_rows']} rows read back, {s['disk_writes']} written" if self.store else ""))

    # ------------------------------------------------------------------ hooks

    def _usable(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The input ids if this forward can use the cache, else None."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        cfg = getattr(module, "config", None)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(cfg, "use_cache", False))
        wants_outputs = any(kwargs.get(k, getattr(cfg, k, False)) for k in ("output_hidden_states",
                                                                             "output_attentions"))
        mask = kwargs.get("attention_mask")
        pos = kwargs.get("position_ids")
        if (module.training or not isinstance(ids, torch.Tensor) or ids.ndim != 2 or use_cache or wants_outputs
                or kwargs.get("inputs_embeds") is not None or len(args) > 1
                or any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "cache_position"))
                or not (mask is None or (isinstance(mask, torch.Tensor) and mask.shape == ids.shape))
                or not (pos is None or (isinstance(pos, torch.Tensor) and pos.ndim == 2))):
            return None
        return ids

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._busy:
            return
        ids = self._usable(module, args, kwargs) if self.enabled else None
        split = depth_split(self.model, self.stack) if ids is not None else None
        if ids is None or split is None or split.refusal is not None:
            self.stats["bypassed_forwards"] += 1
            return
        state = _fingerprint(split)
        if state != self._state:  # other trainable set, or a frozen weight changed: start over
            self.clear()
            self._state, self.split = state, split.block
            if self.store is not None:
                self.store.use(self.model, split.block, split.bottom)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if not bool(mask.bool().any(-1).all()):  # a row with no token at all: nothing to key on
            self.stats["bypassed_forwards"] += 1
            return
        hidden = self._assemble(module, ids, mask, kwargs.get("position_ids"), split.block)
        self._arm(split.block, hidden)
        self.stats["cached_forwards"] += 1

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self._busy:
            self._disarm()

    # ------------------------------------------------------------------ rows

    def _positions(self, mask: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """The position of every column, as the model will compute it."""
        if position_ids is not None:
            return position_ids.expand(mask.shape[0], -1)
        if self.stack.positions_from_mask:  # OPT numbers the unmasked tokens 0, 1, ...
            return (mask.long().cumsum(-1) * mask.long() - 1).clamp(min=0)
        return torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)

    def _assemble(self, module: nn.Module, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None,
                  block: int) -> torch.Tensor:
        """``(B, W, hidden)``: every row's hidden states entering ``block`` (zeros at padded columns)."""
        keep = mask.detach().cpu().bool()
        ids_cpu, pos_cpu = ids.detach().cpu(), self._positions(mask, position_ids).detach().cpu()
        # key: the real tokens and their positions, i.e. everything their hidden states depend on
        keys = [ids_cpu[r][keep[r]].numpy().tobytes() + b"|" + pos_cpu[r][keep[r]].numpy().tobytes()
                for r in range(ids.shape[0])]
        rows: dict[int, torch.Tensor] = {r: self.entries[k] for r, k in enumerate(keys) if k in self.entries}
        self.stats["hit_rows"] += len(rows)
        positions = self._positions(mask, position_ids)
        for r in range(ids.shape[0]):
            if r not in rows:
                rows[r] = self._row(module, keys[r], ids[r][keep[r].to(ids.device)],
                                    positions[r][keep[r].to(ids.device)], block)
                self._store(keys[r], rows[r])
        first = next(iter(rows.values()))
        out = torch.zeros(ids.shape[0], ids.shape[1], first.shape[-1], dtype=first.dtype, device=first.device)
        for r, h in rows.items():
            out[r, keep[r].to(out.device)] = h
        return out

    def _row(self, module: nn.Module, key: bytes, ids: torch.Tensor, positions: torch.Tensor,
             block: int) -> torch.Tensor:
        """A row not in memory: from the on-disk store if it has it, else through the bottom."""
        stored = self.store.get(key, int(ids.shape[0]), ids.device) if self.store is not None else None
        if stored is not None and self._checked_store:
            self.stats["disk_rows"] += 1
            return stored
        row = self._bottom(module, ids, positions, block)
        if stored is not None:  # first row read back: compute it too (also learns the blocks' output structure)
            self._checked_store = True
            if not torch.equal(stored, row):
                assert self.store is not None
                logger.warning("activation store %s: a stored row differs from the recomputed one; not using "
                               "the store in this run", self.store.folder)
                self.store = None
        elif self.store is not None:
            self.store.put(key, row)
            self.stats["disk_writes"] = self.store.stats["disk_writes"]
        return row

    def _store(self, key: bytes, h: torch.Tensor) -> None:
        size = h.numel() * h.element_size()
        if self.stats["bytes"] + size > self.max_bytes:
            self.stats["overflow_rows"] += 1
            return
        self.entries[key] = h.detach().clone()
        self.stats["bytes"] += size
        self.stats["entries"] = len(self.entries)

    def _bottom(self, module: nn.Module, ids: torch.Tensor, positions: torch.Tensor, block: int) -> torch.Tensor:
        """The hidden states entering ``block`` of one example, ``(n, hidden)``.

        The example runs alone and unpadded, with its own positions, so the result is a pure
        function of its tokens and positions: a resumed run recomputes exactly the same bits.
        """
        self.stats["bottom_rows"] += 1
        sub = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "position_ids": positions[None],
               "use_cache": False}
        layers = self.stack.layers
        target = layers[block] if block < len(layers) else self.stack.final_norm
        assert target is not None  # depth_split refuses a missing final norm

        def capture(_m: nn.Module, a: tuple[Any, ...], k: dict[str, Any]) -> None:
            raise _Captured(a[0] if a else k["hidden_states"])

        def structure(_m: nn.Module, _a: tuple[Any, ...], out: Any) -> None:
            self._out_tuple_len = len(out) if isinstance(out, tuple) else 0

        handles = [target.register_forward_pre_hook(capture, with_kwargs=True),
                   layers[block - 1].register_forward_hook(structure)]
        self._busy = True
        try:
            module(**sub)
        except _Captured as c:
            return c.hidden[0]
        finally:
            self._busy = False
            for h in handles:
                h.remove()
        raise RuntimeError(f"the decoder never reached {'block ' + str(block) if block < len(layers) else 'its norm'}")

    # ------------------------------------------------------------------ stubs

    def _arm(self, block: int, hidden: torch.Tensor) -> None:
        """Make blocks ``0..block-1`` skip their work; the last one hands over ``hidden``."""
        n_extra = max(self._out_tuple_len - 1, 0)

        def wrap(h: torch.Tensor) -> Any:
            return (h, *([None] * n_extra)) if self._out_tuple_len else h

        def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return wrap(hidden_states)

        def handover(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return wrap(hidden)

        for i in range(block):
            layer = self.stack.layers[i]
            self._armed.append((layer, layer.__dict__.get("forward", _MISSING)))
            layer.forward = handover if i == block - 1 else passthrough

    def _disarm(self) -> None:
        while self._armed:
            layer, previous = self._armed.pop()
            if previous is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous


def attach_activation_cache(model: Any, max_mb: float = 1024.0, store_dir: str | None = None,
                            say: Callable[[str], Any] | None = None) -> tuple[ActivationCache | None, str]:
    """An :class:`ActivationCache` on ``model`` and a one-line message, or ``(None, why not)``.

    ``max_mb <= 0`` switches the cache off; ``store_dir`` also keeps the rows on disk there,
    shared with other runs (:class:`~zotune.models.activation_store.ActivationStore`). ``say``
    (e.g. ``print`` or a logger's ``info``) is told where the trainable weights start and the message.
    """
    split = depth_split(model)
    if say is not None:
        say(f"zotune: {split.describe()}")
    cache = None
    if max_mb <= 0:
        message = "activation cache off (--cache-mb 0)"
    elif split.refusal is not None:
        message = f"activation cache off: {split.refusal}"
    else:
        cache = ActivationCache(model, max_mb=max_mb, store=ActivationStore(store_dir) if store_dir else None)
        what = (f"blocks 0-{split.block - 1}" if split.block > 1 else "block 0") + f" of {split.num_layers}"
        shared = f", shared on disk in {store_dir}" if store_dir else ""
        message = (f"activation cache on: embeddings and {what} run once per example "
                   f"(up to {max_mb:g} MB{shared}; --cache-mb 0 switches it off)")
    if say is not None:
        say(f"zotune: {message}")
    return cache, message
