"""Checks of user-given values. Each raises a ValueError naming the field, the bad value and what is allowed."""

from __future__ import annotations

import math
from typing import Any


def fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def is_int(value: Any) -> bool:
    """An integer, and not a bool (YAML's `true` is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, and not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """An integer in [low, high] (no upper bound when `high` is None)."""
    if not is_int(value) or value < low or (high is not None and value > high):
        fail(
            name,
            value,
            f"expected an integer in [{low}, {high}]" if high is not None else f"expected an integer >= {low}",
        )


def check_number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite number in the interval from `low` to `high`, each end closed unless said open."""
    inside = (
        is_number(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not inside:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        if high == math.inf and low == -math.inf:
            allowed = "a finite number"
        elif high == math.inf:
            allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            allowed = f"a number in {left}{low:g}, {high:g}{right}"
        fail(name, value, f"expected {allowed}")


def check_choice(name: str, value: Any, allowed: tuple | list) -> None:
    if value not in allowed:
        fail(name, value, f"allowed: {list(allowed)}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(name, value, "expected true or false")
