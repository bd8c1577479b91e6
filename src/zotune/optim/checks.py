"""Argument checks shared by every optimizer: one-line ``ValueError`` naming the argument."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def check_range(name: str, value: float, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = True) -> None:
    """Refuse ``value`` outside [low, high) (``low_open``/``high_open`` choose the brackets)."""
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or value != value:  # NaN fails every comparison
        if high is None:
            where = f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            where = f"{'<' if high_open else '<='} {high:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {where}, got {value}")


def check_positive_int(name: str, value: Any) -> None:
    """Refuse anything but a whole number >= 1 (``2.0`` passes, ``True`` and ``1.5`` do not)."""
    whole = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not whole or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Refuse a value that is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
