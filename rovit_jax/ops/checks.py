"""Argument checks shared by the ops: static integers must be real ints, not bools or floats."""

from __future__ import annotations

import operator


def check_int(name: str, value: int, *, minimum: int) -> int:
    """Returns `value` as an int; ValueError naming `name` unless it is an int >= `minimum`."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return operator.index(value)
