"""What kind of model this is: causal or masked LM, its ``model_type``, its normalisation layers,
and (for the decoders zotune can split by depth) its list of decoder blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from zotune.errors import UserError


def _model_type(model: Any) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", "") or "")


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


# --------------------------------------------------------------------------------------------
# Decoder blocks: the per-architecture adapter used by depth-selected tuning and the cache
# --------------------------------------------------------------------------------------------

#: model_type -> (path of the module that owns the block list, its attribute, final norm attribute,
#: whether that module numbers positions from the attention mask when no position ids are given).
#: Llama-style (llama, mistral, qwen2), Gemma-3 and OPT decoders (each tested on a tiny random model); each runs
#: ``embeddings -> blocks[0..L-1] -> final norm -> head`` with one hidden-state tensor between blocks.
_DECODERS: dict[str, tuple[str, str, str, bool]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "gemma3_text"), ("model", "layers", "norm", False)),
    "opt": ("model.decoder", "layers", "final_layer_norm", True),
}


@dataclass(frozen=True)
class DecoderStack:
    """Where the decoder blocks of a causal LM are.

    ``base`` owns the block list and receives ``input_ids`` / ``attention_mask`` /
    ``position_ids``; everything it computes before ``layers[0]`` (embeddings, positions, masks)
    is the *bottom*, ``final_norm`` and the modules after it (``top``: projections, LM head) come
    after the last block.
    """

    model_type: str
    base: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module | None
    top: tuple[nn.Module, ...]
    positions_from_mask: bool

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def supported_decoder_types() -> tuple[str, ...]:
    """The ``model_type`` values :func:`decoder_stack` knows."""
    return tuple(_DECODERS)


def decoder_stack(model: Any) -> DecoderStack | None:
    """The :class:`DecoderStack` of a (possibly peft-wrapped) causal LM, or None if unsupported."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    entry = _DECODERS.get(_model_type(inner))
    if entry is None:
        return None
    path, layers_attr, norm_attr, from_mask = entry
    try:
        base = inner.get_submodule(path)
    except AttributeError:
        return None
    layers = getattr(base, layers_attr, None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    final_norm = getattr(base, norm_attr, None)
    top = [m for m in (getattr(base, "project_out", None),) if isinstance(m, nn.Module)]
    head = inner.get_output_embeddings() if callable(getattr(inner, "get_output_embeddings", None)) else None
    if isinstance(head, nn.Module):
        top.append(head)
    return DecoderStack(_model_type(inner), base, layers, final_norm if isinstance(final_norm, nn.Module) else None,
                        tuple(top), from_mask)
