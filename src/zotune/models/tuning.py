"""Tuning modes: which parameters zeroth-order training perturbs (those left with ``requires_grad``)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from zotune.errors import UserError
from zotune.models.arch import (
    DecoderStack,
    _final_norm,
    _is_causal_lm,
    _model_type,
    _norm_modules,
    decoder_stack,
    supported_decoder_types,
)

logger = logging.getLogger(__name__)

#: Modes accepted by :func:`apply_peft` (``None`` means ``"full"``); ``top:K`` is ``top:1``, ``top:2``, ...
#: (optionally ``top:K+head``).
PEFT_MODES: tuple[str, ...] = ("full", "lora", "prefix", "final_norm", "norms", "top:K")


def parse_peft_mode(mode: str | None, what: str = "parameter mode") -> tuple[str, int | None, bool]:
    """``(name, K, head)`` of a tuning mode: ``"top:2+head"`` -> ``("top", 2, True)``.

    >>> parse_peft_mode("top:2"), parse_peft_mode(None)
    (('top', 2, False), ('full', None, False))

    Raises :class:`~zotune.errors.UserError` for an unknown mode.
    """
    key = "full" if mode is None else str(mode).strip().lower().replace(" ", "")
    if key in PEFT_MODES and key != "top:K":
        return key, None, False
    if key.startswith("top:"):
        count, _, extra = key[4:].partition("+")
        if count.isdigit() and int(count) > 0 and extra in ("", "head"):
            return "top", int(count), extra == "head"
    raise UserError(f"unknown {what} {mode!r}; choose one of: {', '.join(PEFT_MODES)} "
                    "(top:K = the top K decoder blocks and the final norm, e.g. top:2; top:2+head also the LM head)")


def _stack_or_refuse(model: Any, what: str) -> DecoderStack:
    stack = decoder_stack(model)
    if stack is None:
        raise UserError(f"{what} needs a decoder zotune can split by depth (model types "
                        f"{', '.join(supported_decoder_types())}); {_model_type(model)!r} is not one; "
                        "use --peft lora, final_norm, norms or full")
    return stack


def top_layer_indices(model: Any, spec: str, what: str = "--lora-layers") -> list[int]:
    """Block indices selected by ``"top:K"`` (the last K decoder blocks), checked against the model."""
    name, count, head = parse_peft_mode(spec) if str(spec).strip().lower().startswith("top:") else ("", None, False)
    if name != "top" or count is None or head:
        raise UserError(f"{what} {spec!r}: use top:K, e.g. top:2 for the last two decoder blocks")
    n = _stack_or_refuse(model, what).num_layers
    if count > n:
        raise UserError(f"{what} {spec!r}: the model has only {n} decoder blocks")
    return list(range(n - count, n))


def _apply_top(model: Any, count: int, head: bool) -> None:
    """Train every weight of the last ``count`` blocks and the final norm (and the head if asked)."""
    stack = _stack_or_refuse(model, f"--peft top:{count}")
    if count > stack.num_layers:
        raise UserError(f"--peft top:{count}: the model has only {stack.num_layers} decoder blocks")
    model.requires_grad_(False)
    for layer in list(stack.layers)[stack.num_layers - count:]:
        layer.requires_grad_(True)
    if stack.final_norm is not None:
        stack.final_norm.requires_grad_(True)
    if head:
        for m in stack.top:
            m.requires_grad_(True)


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
    lora_layers: str | None = None,
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
        ``"top:K"``: every weight of the last K decoder blocks and the final norm (Llama-,
            Gemma-3- and OPT-style decoders); ``"top:K+head"`` also the LM head (with a head tied
            to the input embedding, that trains the embedding too).

    ``lora_layers="top:K"`` puts the LoRA adapters on the last K decoder blocks only. Modes
    that leave the bottom blocks frozen let :class:`~zotune.models.activation_cache.ActivationCache`
    compute those blocks once per example.

    LoRA and prefix return a peft ``PeftModel`` wrapping ``model`` (modified in place); the other
    modes return ``model`` itself. The result is in eval mode. ``seed`` fixes the LoRA A init and
    the prefix's random tokens without touching the global RNG.

    >>> from zotune.testing import tiny_causal_lm
    >>> m = apply_peft(tiny_causal_lm(), "final_norm")
    >>> [n for n, p in m.named_parameters() if p.requires_grad]
    ['model.norm.weight']
    """
    key, count, head = parse_peft_mode(mode)
    if lora_layers is not None and key != "lora":
        raise UserError(f"--lora-layers applies to --peft lora only (the mode is {key!r})")
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
    elif key == "top":
        assert count is not None
        _apply_top(model, count, head)
    elif key == "lora":
        layers = top_layer_indices(model, lora_layers) if lora_layers is not None else None
        model = _apply_lora(
            model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=target_modules, seed=seed,
            layers=layers,
        )
    else:
        model = _apply_prefix(model, num_virtual_tokens=num_virtual_tokens, init=prefix_init, seed=seed)
    model.eval()
    s = trainable_summary(model, max_names=0)
    logger.info(
        "mode %s: %d of %d parameters trainable (%.4f%%)",
        mode or "full",
        s["trainable_params"],
        s["total_params"],
        100 * s["trainable_fraction"],
    )
    return model


def _apply_lora(
    model: Any,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str] | str | None,
    seed: int,
    layers: list[int] | None = None,
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
        layers_to_transform=layers,
        layers_pattern=None if layers is None else "layers",
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
