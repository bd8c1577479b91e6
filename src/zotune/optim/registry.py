"""Look up optimizers by name: ``create("hizoo", model, lr=1e-6)``.

Every class registered here appears automatically in ``zotune bench`` and the CLI.
"""

from __future__ import annotations

from typing import Any

from zotune.errors import UserError
from zotune.optim.engine import ZOOptimizer

_REGISTRY: dict[str, type[ZOOptimizer]] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def register(cls: type[ZOOptimizer]) -> type[ZOOptimizer]:
    """Register an optimizer class under its class name and its ``aliases``."""
    _REGISTRY[cls.__name__] = cls
    return cls


def available() -> list[str]:
    """Names of every registered optimizer, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> type[ZOOptimizer]:
    """The optimizer class for a class name or alias (case, '-' and '_' ignored)."""
    wanted = _key(name)
    for cls_name, cls in _REGISTRY.items():
        if wanted == _key(cls_name) or wanted in {_key(a) for a in getattr(cls, "aliases", ())}:
            return cls
    names = ", ".join(f"{n} ({'/'.join(getattr(c, 'aliases', ())[:1])})" for n, c in _REGISTRY.items())
    raise UserError(f"unknown optimizer {name!r}; available: {names}")


def create(name: str, params: Any, **kwargs: Any) -> ZOOptimizer:
    """Build an optimizer by name, e.g. ``create("mezo", model.parameters(), lr=1e-6)``."""
    return get(name)(params, **kwargs)
