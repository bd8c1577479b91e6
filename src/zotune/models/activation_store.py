"""The frozen-bottom activations on disk, shared by every run on the same model and examples.

:class:`~zotune.models.activation_cache.ActivationCache` keeps each example's hidden states at
the lowest trainable block in memory, for one run. Runs that differ only in what happens above
that block -- an lr sweep, the optimizers of a race, the zero-shot baseline -- compute the same
bottoms again, and with ``--peft final_norm`` on a CPU that is most of a short run's time.
:class:`ActivationStore` (``zotune train --cache-dir DIR``) keeps the rows in ``DIR`` as well:
a row another run computed is read back instead of recomputed.

Exactness: a row is read back only under the same *namespace*, a hash of everything its bits
depend on: the content of every frozen tensor below the split (the weights themselves, not their
file name), the split block, the model's configuration and attention implementation, dtype,
device type, torch / transformers versions and torch's thread count (the summation order of a
matrix product can change with the threads). Within a namespace a row is keyed by its token ids
and positions, as in memory; the bottom runs one example alone and unpadded, so the row read back
has the bits the run would have computed itself (tested: the same results with and without a
shared directory).

Layout: ``DIR/<namespace>/meta.json`` (what the namespace hashes, for a reader) and
``DIR/<namespace>/<2 hex>/<row hash>.bin`` (the row's raw bytes; its shape follows from its
token count). Files are written whole under a temporary name and renamed, so concurrent runs
never read half a row. A store that cannot be written (disk full) is switched off with a
warning; the run goes on with the memory cache only. Nothing is ever evicted: delete ``DIR``
to reclaim the space (rows take tokens x hidden size x bytes per value: SmolLM2-135M in fp32,
2.3 kB a token).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from zotune.errors import UserError

__all__ = ["ActivationStore", "check_store_dir", "namespace_of"]

logger = logging.getLogger(__name__)

#: bump when the meaning of a stored row changes
FORMAT_VERSION = 1


def check_store_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and make sure it can be written (a user mistake is one line, before any run)."""
    root = Path(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".zotune-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--cache-dir {root}: cannot write there ({e.strerror}); choose another folder") from None
    return root


def namespace_of(model: Any, block: int, bottom: tuple[torch.Tensor, ...]) -> tuple[str, dict[str, Any]]:
    """The hash of everything a stored row's bits depend on, and its readable description."""
    import transformers

    config = getattr(model, "config", None)
    first = next(iter(bottom), None)
    described = {
        "format": FORMAT_VERSION,
        "model_type": getattr(config, "model_type", type(model).__name__),
        "config": config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "block": block,
        "dtype": str(first.dtype) if first is not None else None,
        "device": first.device.type if first is not None else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "tensors": len(bottom),
    }
    h = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for t in bottom:  # the weights' bytes: about 0.4 s for SmolLM2-135M's 0.5 GB on one CPU core
        data = t.detach()
        h.update(f"{tuple(data.shape)}{data.dtype}".encode())
        data = data.to("cpu").contiguous()
        if data.numel():
            h.update(memoryview(data.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:32], {k: v for k, v in described.items() if k != "config"}


class ActivationStore:
    """Rows of hidden states on disk under ``root/namespace`` (see the module docs).

    ``stats``: ``disk_hits`` rows read back, ``disk_writes`` rows written.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.folder: Path | None = None  # root/namespace once :meth:`use` has run
        self.dtype: torch.dtype | None = None
        self.enabled = True
        self.stats = {"disk_hits": 0, "disk_writes": 0}

    def use(self, model: Any, block: int, bottom: tuple[torch.Tensor, ...]) -> None:
        """Point the store at the namespace of ``model``'s bottom below ``block``."""
        namespace, described = namespace_of(model, block, bottom)
        self.folder = self.root / namespace
        self.dtype = bottom[0].dtype if bottom else None
        if not self.enabled:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            meta = self.folder / "meta.json"
            if not meta.exists():
                self._write(meta, json.dumps(described, indent=2).encode())
        except OSError as e:
            self._disable(e)

    def get(self, key: bytes, tokens: int, device: torch.device) -> torch.Tensor | None:
        """The stored row of ``key`` (``tokens`` real tokens), or None."""
        if self.folder is None or self.dtype is None:
            return None
        try:
            data = self._path(key).read_bytes()
        except OSError:
            return None
        size = torch.empty((), dtype=self.dtype).element_size()
        if not data or len(data) % (tokens * size):  # not a row of this shape: ignore it
            return None
        self.stats["disk_hits"] += 1
        return torch.frombuffer(bytearray(data), dtype=self.dtype).view(tokens, -1).to(device)

    def put(self, key: bytes, row: torch.Tensor) -> None:
        """Store ``row`` under ``key`` (a row already there is left alone: it has the same bits)."""
        if self.folder is None or not self.enabled:
            return
        path = self._path(key)
        if path.exists():
            return
        try:
            path.parent.mkdir(exist_ok=True)
            self._write(path, row.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self.stats["disk_writes"] += 1
        except OSError as e:
            self._disable(e)

    def _path(self, key: bytes) -> Path:
        assert self.folder is not None
        digest = hashlib.sha256(key).hexdigest()
        return self.folder / digest[:2] / f"{digest[2:34]}.bin"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # whole or not at all: a concurrent reader never sees half a row

    def _disable(self, error: OSError) -> None:
        self.enabled = False
        logger.warning("activation store %s switched off: %s (the run continues with the memory cache)",
                       self.root, error)
