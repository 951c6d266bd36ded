"""Logical axis names of parameters, declared by the modules that make them.

A module names the dimensions of its large parameters ("embed", "heads", "kv", "mlp", ...) by
wrapping their initialisers with `named`. The config's `logical_axis_rules` maps those names to
mesh axes (MaxText's pattern, `rovit_jax.train.mesh.infer_shardings`), so a parallelism layout
is a small table rather than regexes over Flax's generated parameter paths.

The names are attached only while `param_logical_axes` traces an initialiser (shapes only,
nothing is allocated). Everywhere else the initialisers return plain arrays, so parameter trees,
checkpoints and every caller of `init` stay exactly as they were.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

__all__ = [
    "EMBED",
    "HEADS",
    "KV",
    "MLP",
    "VOCAB",
    "LAYERS",
    "LOGICAL_AXES",
    "named",
    "param_logical_axes",
]

EMBED = "embed"  # the model width (residual stream) of a tower
HEADS = "heads"  # attention heads
KV = "kv"  # the per-head dimension
MLP = "mlp"  # the hidden dimension of a transformer MLP
VOCAB = "vocab"  # token embedding rows
LAYERS = "layers"  # the stacked block axis of scanned (`scan_layers`) encoders
LOGICAL_AXES = (EMBED, HEADS, KV, MLP, VOCAB, LAYERS)

_RECORDING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "rovit_jax_record_logical_axes", default=False
)


def named(init: Callable[..., jax.Array], *names: str | None) -> Callable[..., jax.Array]:
    """`init` with one logical name (or None) per dimension of the parameter it makes."""
    bad = [n for n in names if n is not None and n not in LOGICAL_AXES]
    if bad:
        raise ValueError(f"unknown logical axis names {bad}; known: {LOGICAL_AXES}")

    def init_fn(*args: Any, **kwargs: Any) -> Any:
        value = init(*args, **kwargs)
        # (Flax's DenseGeneral calls this with a flattened shape and reshapes the box after,
        # so the rank is checked where the names are used, not here.)
        return nn.LogicallyPartitioned(value, names) if _RECORDING.get() else value

    return init_fn


def param_logical_axes(init_params: Callable[..., Any], *args: Any) -> dict[tuple, tuple]:
    """The logical names of the leaves `init_params(*args)` returns, without computing them.

    Returns {key path of a leaf (as `jax.tree_util` gives it): one name or None per dimension}
    for the leaves a module named; scanned blocks' leaves gain a leading LAYERS.
    """
    token = _RECORDING.set(True)
    try:
        # A fresh function, so no trace cached without the names is reused.
        boxed = jax.eval_shape(lambda *a: init_params(*a), *args)
    finally:
        _RECORDING.reset(token)
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )[0]
    return {path: tuple(x.names) for path, x in leaves if isinstance(x, nn.LogicallyPartitioned)}
