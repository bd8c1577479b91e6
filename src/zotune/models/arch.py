"""What kind of model this is: causal or masked LM, its ``model_type``, its normalisation layers."""

from __future__ import annotations

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
