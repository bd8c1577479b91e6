"""The model, batch and MeZO reference step of ``zotune bench step`` (also used by the GPU check).

A randomly initialised OPT-shaped causal LM (no weights are downloaded), a batch of random
token ids, the closure every optimizer gets, and :class:`NaiveMeZO`, MeZO's own reference
step, which the engine is compared with.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from zotune.errors import UserError

#: OPTConfig arguments per model shape (random init, dropout 0).
SHAPES: dict[str, dict[str, int]] = {
    # facebook/opt-125m: 125,239,296 parameters (tied embeddings), 477.75 MiB fp32
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                     word_embed_proj_dim=768, vocab_size=50272, max_position_embeddings=2048),
    # facebook/opt-1.3b: 1,315,758,080 parameters (tied embeddings), 4.9 GiB fp32 (the GPU check's ~1B shape)
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048),
    # a few hundred thousand parameters: a whole benchmark round takes well under a second
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                 word_embed_proj_dim=64, vocab_size=1024, max_position_embeddings=512),
}


def build_model(shape: str, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised OPT causal LM of the given shape, eval mode, dropout 0.

    Initialised in fp32 on ``device`` itself (a 1.3B model would take half a minute to
    initialise on one CPU core; the weights therefore differ between device types), then cast.
    """
    from transformers import OPTConfig, OPTForCausalLM

    if shape not in SHAPES:
        raise UserError(f"unknown model shape {shape!r}; choose one of {sorted(SHAPES)}")
    torch.manual_seed(seed)
    config = OPTConfig(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                       **SHAPES[shape])
    with torch.device(device):
        model = OPTForCausalLM(config).float()
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    model.eval()
    return model


def make_batch(vocab_size: int, batch: int, seq: int, seed: int = 1,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random token ids (labels = inputs: the causal-LM loss), drawn on the CPU then moved."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

def make_closure(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The closure every optimizer gets: one forward in inference mode returning the loss."""

    def closure() -> torch.Tensor:
        with torch.inference_mode():
            return model(**batch).loss

    return closure


def param_count(model: nn.Module) -> int:
    """Trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------- MeZO's reference code
class NaiveMeZO:
    """MeZO's reference step as ``princeton-nlp/MeZO`` (``large_models/trainer.py``) does it.

    One ``torch.manual_seed(seed)`` per pass, then for every trainable parameter
    ``z = torch.normal(0, 1, size=p.shape)`` and ``p.data = p.data + s * z * eps`` (out of
    place); +1, forward, -2, forward, +1; then a separate update pass that regenerates z and
    does ``p.data = p.data - lr * (g * z + wd * p.data)`` (no decay for biases/layer norms).
    Four full Gaussian generations and four parameter-sized temporaries per parameter per
    step: the baseline the engine is compared with.
    """

    forwards_per_step = 2
    state_buffers: tuple[str, ...] = ()
    summary = "MeZO reference code: torch.manual_seed + per-parameter torch.normal, out of place"

    def __init__(self, model: nn.Module, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.rng = np.random.RandomState(seed)
        self.zo_random_seed = 0

    def perturb(self, scaling_factor: float) -> None:
        torch.manual_seed(self.zo_random_seed)
        for _, param in self.named:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.eps

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        self.zo_random_seed = int(self.rng.randint(1000000000))
        self.perturb(1)
        loss1 = closure().detach()
        self.perturb(-2)
        loss2 = closure().detach()
        projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
        self.perturb(1)
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - self.lr * (projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (projected_grad * z)
        return float(loss1)
