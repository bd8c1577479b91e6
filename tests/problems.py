"""Tiny problems shared by the optimizer test files (not a test module: pytest collects test_*.py only)."""

from __future__ import annotations

import torch
from torch import nn


def regression_problem(seed: int = 0, dtype: torch.dtype = torch.float32, hidden_layers: int = 1):
    """An MLP with ``hidden_layers`` tanh layers of width 16 and a fixed regression batch (same data for every init).

    Returns ``(model, closure)``; the closure computes the mean squared error in fp32 (fp64 for fp64 models).
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Tanh()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(16, 1)).to(dtype)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1234))
    y = torch.sin(x.sum(1, keepdim=True))

    def closure():
        out = model(x.to(dtype))
        return ((out.to(torch.float64 if dtype == torch.float64 else torch.float32) - y.to(out.dtype)) ** 2).mean()

    return model, closure


def weights(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the model's parameters."""
    return [p.detach().clone() for p in model.parameters()]


class Boom(RuntimeError):
    """The exception a failing closure raises."""


def failing_at(closure, call: int):
    """``closure`` that raises :class:`Boom` on its ``call``-th call (1-based) instead of running."""
    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        if calls["n"] == call:
            raise Boom("forward failed")
        return closure()

    return failing
