"""Parsing of the `:arg` suffix of `--config=configs/x.py:arg` (big_vision style)."""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses "key=value,flag,key2=value2" into a ConfigDict typed like `defaults`.

    A bare `flag` sets a boolean default to True. Unknown keys raise ValueError naming them, so a
    typo in a command line never silently falls back to a default.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"config argument `{key}` is unknown; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument `{key}` needs a value (`{key}=...`)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"config argument `{key}`={value!r} is not a boolean")
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out
