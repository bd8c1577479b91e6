"""When streaming offload cannot work: one-line reasons (the CLI turns them into exit status 2)."""

from __future__ import annotations

from typing import Any

from zotune.models.arch import decoder_stack, supported_decoder_types

#: optimizers whose update of a block needs only that block, its state and the step's scalars, with one
#: direction per step (``_spsa`` / ``_two_point`` then one ``_update``); their trajectories are tested equal
SUPPORTED = ("ZOSGD", "ZOSGDMomentum", "ZOSGDSign", "ZOAdam", "HELENE")


def offload_refusal(model: Any, optimizer: Any) -> str | None:
    """None if :class:`~zotune.offload.StreamingOffload` can run ``model`` with ``optimizer``, else why not."""
    stack = decoder_stack(model)
    if stack is None:
        kind = str(getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__)
        return (f"offload needs a decoder whose block list zotune knows; model type {kind!r} is not one "
                f"(supported: {', '.join(supported_decoder_types())})")
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return "offload does not support prefix / prompt tuning (its vectors enter every block); use --peft lora"
    name = type(optimizer).__name__
    if name not in SUPPORTED:
        return (f"offload supports the optimizers whose update is local to each block ({', '.join(SUPPORTED)}); "
                f"{name} is not one of them")
    if getattr(optimizer, "layer_fraction", 1.0) < 1.0:
        return "offload streams every block each step; layer_fraction < 1 is not supported with it"
    if getattr(optimizer, "exact_restore", False):
        return "offload does not support exact_restore=True (its fp32 shadow copy is not streamed)"
    if type(getattr(optimizer, "comm", None)).__name__ != "Communicator":
        return "offload runs in one process; data-parallel / FSDP runs are not supported with it (comm=)"
    return None


DATA_PARALLEL_REFUSAL = ("offload runs in one process; data-parallel runs (torchrun / accelerate launch) are not "
                         "supported with it: launch one process, or drop --offload")


def attach_offload(model: Any, optimizer: Any, offload: str, device: str | None, generates: bool = False) -> Any:
    """``zotune train --offload``: a :class:`~zotune.offload.StreamingOffload` (None for ``"none"``);
    a refusal is a :class:`~zotune.errors.UserError` naming the option. ``generates``: the objective
    decodes text (its +eps and -eps forwards may run the model a different number of times)."""
    if offload == "none":
        return None
    from zotune.errors import UserError
    from zotune.offload.session import StreamingOffload

    refusal = offload_refusal(model, optimizer) or (
        "an objective that generates text (--objective f1 on a generation task) is not supported with it: "
        "its two forwards may decode a different number of tokens; use --objective ce" if generates else None)
    if refusal is not None:
        raise UserError(f"--offload {offload}: {refusal}")
    return StreamingOffload(model, optimizer, device or "cuda")
