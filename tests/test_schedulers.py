"""Every scheduler in ``torch.optim.lr_scheduler`` drives every registered optimizer as it drives
``torch.optim.SGD``: the same learning rates step by step (and, for the schedulers that cycle
momentum, the same momentum / beta1 on the methods that have one)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import zotune.optim as zo

STEPS = 6
LR = 1e-3
#: schedulers that cycle momentum by default (cycle_momentum=True): they need "momentum" or "betas"
READS_MOMENTUM = {"CyclicLR", "OneCycleLR"}

SCHEDULERS: dict[str, Callable[..., object]] = {
    "LambdaLR": lambda o, **k: S.LambdaLR(o, lambda s: 0.9**s),
    "MultiplicativeLR": lambda o, **k: S.MultiplicativeLR(o, lambda s: 0.8),
    "StepLR": lambda o, **k: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o, **k: S.MultiStepLR(o, milestones=[1, 3], gamma=0.5),
    "ConstantLR": lambda o, **k: S.ConstantLR(o, factor=0.5, total_iters=2),
    "LinearLR": lambda o, **k: S.LinearLR(o, start_factor=0.25, total_iters=3),
    "ExponentialLR": lambda o, **k: S.ExponentialLR(o, gamma=0.9),
    "SequentialLR": lambda o, **k: S.SequentialLR(
        o, [S.ConstantLR(o, factor=0.5, total_iters=2), S.ExponentialLR(o, gamma=0.9)], milestones=[2]),
    "PolynomialLR": lambda o, **k: S.PolynomialLR(o, total_iters=4, power=2.0),
    "CosineAnnealingLR": lambda o, **k: S.CosineAnnealingLR(o, T_max=4),
    "ChainedScheduler": lambda o, **k: S.ChainedScheduler([S.StepLR(o, 2, 0.5), S.ExponentialLR(o, 0.9)]),
    "ReduceLROnPlateau": lambda o, **k: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "CyclicLR": lambda o, **k: S.CyclicLR(o, base_lr=1e-4, max_lr=1e-2, step_size_up=2, **k),
    "CosineAnnealingWarmRestarts": lambda o, **k: S.CosineAnnealingWarmRestarts(o, T_0=2),
    "OneCycleLR": lambda o, **k: S.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS + 1, **k),
}


def torch_schedulers() -> set[str]:
    return {
        name for name, cls in vars(S).items()
        if inspect.isclass(cls) and not name.startswith("_") and name != "LRScheduler"
        and (issubclass(cls, S.LRScheduler) or issubclass(cls, S.ReduceLROnPlateau))
    }


def test_every_torch_scheduler_is_covered():
    assert torch_schedulers() == set(SCHEDULERS)


def has_momentum(opt: torch.optim.Optimizer) -> bool:
    return "momentum" in opt.defaults or "betas" in opt.defaults


def momentum_of(group: dict) -> float:
    return group["betas"][0] if "betas" in group else group["momentum"]


def trajectory(opt: torch.optim.Optimizer, sched, closure) -> list[tuple[float, float | None]]:
    """(lr, momentum or beta1) of group 0 after each of STEPS optimizer + scheduler steps."""
    out = []
    for _ in range(STEPS):
        opt.step(closure) if isinstance(opt, zo.ZOOptimizer) else opt.step()
        sched.step(1.0) if isinstance(sched, S.ReduceLROnPlateau) else sched.step()  # a flat metric
        group = opt.param_groups[0]
        out.append((group["lr"], momentum_of(group) if has_momentum(opt) else None))
    return out


@pytest.mark.parametrize("optimizer", zo.available())
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_scheduler_drives_optimizer_like_sgd(scheduler, optimizer):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = zo.create(optimizer, model, lr=LR, eps=1e-3)
    kwargs = {}
    if scheduler in READS_MOMENTUM and not has_momentum(opt):
        # the method has no momentum to cycle: torch refuses, naming the flag to turn off
        with pytest.raises(ValueError, match="cycle_momentum"):
            SCHEDULERS[scheduler](opt)
        kwargs = {"cycle_momentum": False}
    sched = SCHEDULERS[scheduler](opt, **kwargs)
    reference = torch.optim.SGD(nn.Linear(4, 1).parameters(), lr=LR, momentum=0.9)
    ref_sched = SCHEDULERS[scheduler](reference, **kwargs)
    got = trajectory(opt, sched, lambda: model(x).square().mean())
    want = trajectory(reference, ref_sched, None)
    assert [lr for lr, _ in got] == pytest.approx([lr for lr, _ in want], rel=1e-12)
    assert len({lr for lr, _ in want}) > 1  # the schedule really changes the lr within STEPS
    if scheduler in READS_MOMENTUM and not kwargs:
        assert [m for _, m in got] == pytest.approx([m for _, m in want], rel=1e-12)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_momentum_written_by_a_scheduler_is_the_momentum_used():
    """ZOSGDMomentum reads ``group["momentum"]`` at every step: a group set to momentum 0 (as a
    scheduler would write it) follows ZO-SGD's trajectory exactly."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    models = []
    for name in ("ZOSGDMomentum", "ZOSGD"):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = zo.create(name, model, lr=1e-2, eps=1e-3, seed=3)
        for _ in range(4):
            if name == "ZOSGDMomentum":
                opt.param_groups[0]["momentum"] = 0.0
            opt.step(lambda model=model: model(x).square().mean())
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
