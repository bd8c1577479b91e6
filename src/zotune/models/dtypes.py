"""Model dtypes: the accepted dtype names and the casts that keep buffers and ties intact."""

from __future__ import annotations

import torch
from torch import nn

from zotune.errors import UserError

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


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point parameters in place, keeping ties and fp32 buffers.

    Unlike ``model.to(dtype)``, which also rounds buffers such as rotary ``inv_freq`` (changing
    the logits), this matches what ``from_pretrained(dtype=...)`` produces.
    """
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)

