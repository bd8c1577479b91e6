"""Look up optimizers by name: ``create("hizoo", model, lr=1e-6)``.

Every class registered here appears automatically in ``zotune optimizers``, ``zotune train
--optimizer``, ``zotune bench step`` and the common parametrized tests: they read what they
need from the class (``aliases``, ``summary``, ``lr_by_mode``, ``reference``, ``test_kwargs``,
``bench_variants``; see :class:`~zotune.optim.engine.ZOOptimizer`). Names are matched with case,
``-``, ``_`` and spaces ignored, and two classes may not claim the same name.
"""

from __future__ import annotations

from typing import Any

from zotune.errors import UserError
from zotune.optim.engine import ZOOptimizer

_REGISTRY: dict[str, type[ZOOptimizer]] = {}  # class name -> class, in registration order
_NAMES: dict[str, type[ZOOptimizer]] = {}  # normalised class name or alias -> class


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def register(cls: type[ZOOptimizer]) -> type[ZOOptimizer]:
    """Register an optimizer class under its class name and its ``aliases`` (usable as a decorator).

    Registering the same class again is a no-op; a name (or alias) that another class already
    uses raises ``ValueError`` and registers nothing.
    """
    if not (isinstance(cls, type) and issubclass(cls, ZOOptimizer)):
        raise TypeError(f"register() needs a ZOOptimizer subclass, got {cls!r}")
    keys = {_key(cls.__name__), *(_key(a) for a in cls.aliases)}
    clashes = sorted(f"{k!r} ({_NAMES[k].__name__})" for k in keys if _NAMES.get(k, cls) is not cls)
    if clashes:
        raise ValueError(f"cannot register {cls.__name__}: {', '.join(clashes)} already taken")
    _REGISTRY[cls.__name__] = cls
    _NAMES.update(dict.fromkeys(keys, cls))
    return cls


def available() -> list[str]:
    """Names of every registered optimizer, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> type[ZOOptimizer]:
    """The optimizer class for a class name or alias (case, '-' and '_' ignored)."""
    cls = _NAMES.get(_key(name))
    if cls is not None:
        return cls
    names = ", ".join(f"{n} ({'/'.join(c.aliases[:1])})" if c.aliases else n for n, c in _REGISTRY.items())
    raise UserError(f"unknown optimizer {name!r}; available: {names}")


def create(name: str, params: Any, **kwargs: Any) -> ZOOptimizer:
    """Build an optimizer by name (a class name or alias, see :func:`available`).

    Pass the model itself: the optimizer then takes its trainable parameters only
    (``requires_grad=True``: a peft model's adapters, not the frozen base) and runs the
    closure in eval mode. With a parameter list, filter it yourself.

        >>> import torch
        >>> from zotune.optim import create
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        >>> _ = model[0].requires_grad_(False)                              # a frozen layer
        >>> opt = create("mezo", model, lr=1e-6)                          # the safe form
        >>> opt = create("mezo", [p for p in model.parameters() if p.requires_grad], lr=1e-6)  # the same params
        >>> sum(p.numel() for g in opt.param_groups for p in g["params"])   # the 4 + 1 of the last layer
        5
    """
    return get(name)(params, **kwargs)
