"""The model a conversion targets, from a pretraining config or a model instance, and helpers on
parameter trees (flatten with "/" paths, stack blocks for scanned models, initial values)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rovit_jax.models.layers import unscan_params
from rovit_jax.models.text import TextTransformer
from rovit_jax.models.two_tower import TwoTower
from rovit_jax.models.vit import ViT

__all__ = [
    "resolve_model",
    "image_tower",
    "text_tower",
    "init_params",
    "param_shapes",
    "flatten",
    "unflatten",
    "scan_params",
    "unscan_params",
]

ModelSpec = Any  # ml_collections.ConfigDict (pretraining config) | TwoTower | ViT


def resolve_model(config: ModelSpec) -> TwoTower | ViT:
    """The module described by `config`: a pretraining config (built with
    `rovit_jax.tasks.pretrain.build_model`), a `TwoTower` or a `ViT` (returned as is)."""
    if isinstance(config, (TwoTower, ViT)):
        return config
    if hasattr(config, "model") and hasattr(config, "pp"):
        from rovit_jax.tasks.pretrain import build_model

        return build_model(config)
    raise TypeError(
        "expected a pretraining config (with `model` and `pp`), a TwoTower or a ViT, got "
        f"{type(config).__name__}"
    )


def image_tower(config: ModelSpec) -> ViT:
    """The image tower (a ViT with every attribute resolved) of `config`."""
    model = resolve_model(config)
    if isinstance(model, ViT):
        return model
    return ViT(**{"dtype": model.dtype, **dict(model.image)})


def text_tower(config: ModelSpec) -> TextTransformer:
    """The text tower of `config`; ValueError when `config` describes an image tower only."""
    model = resolve_model(config)
    if not isinstance(model, TwoTower):
        raise ValueError("a text tower needs a two-tower model (a pretraining config or TwoTower)")
    return TextTransformer(**{"dtype": model.dtype, **dict(model.text)})


def _image_input(vit: ViT) -> jnp.ndarray:
    gh, gw = vit.posemb_grid
    return jnp.zeros((1, gh * vit.patch_size, gw * vit.patch_size, 3), jnp.float32)


def _init_fn(model: TwoTower | ViT):
    if isinstance(model, ViT):
        return lambda r: model.init(r, _image_input(model))["params"]
    vit = image_tower(model)
    tokens = jnp.zeros((1, text_tower(model).max_len), jnp.int32)
    return lambda r: model.init(r, _image_input(vit), tokens)["params"]


_JITTED_INIT: dict[str, Any] = {}  # repr(model) -> jitted init (compiling it dominates)


def init_params(model: TwoTower | ViT, seed: int = 0) -> dict[str, Any]:
    """Initial parameters of `model` as a nested dict of float32 numpy arrays."""
    key = repr(model)
    if key not in _JITTED_INIT:
        _JITTED_INIT[key] = jax.jit(_init_fn(model))
    params = _JITTED_INIT[key](jax.random.key(seed))
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def param_shapes(model: TwoTower | ViT) -> dict[str, tuple[int, ...]]:
    """{parameter path: shape} of `model`, without computing anything."""
    shapes = jax.eval_shape(_init_fn(model), jax.random.key(0))
    return {path: tuple(s.shape) for path, s in flatten(shapes).items()}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "items"):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b": x} -> {"a": {"b": x}}."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def scan_params(tree: Any) -> Any:
    """Inverse of `unscan_params`: stacks `encoderblock_{i}` subtrees into one `encoderblock`
    whose leaves carry a leading [depth] axis (the layout of ``scan_layers=True`` models)."""
    if not hasattr(tree, "items"):
        return tree
    blocks = sorted(
        (int(k.split("_")[1]), v) for k, v in tree.items() if k.startswith("encoderblock_")
    )
    out = {k: scan_params(v) for k, v in tree.items() if not k.startswith("encoderblock_")}
    if blocks:
        if [i for i, _ in blocks] != list(range(len(blocks))):
            raise ValueError(f"encoderblock indices are not 0..n-1: {[i for i, _ in blocks]}")
        out["encoderblock"] = jax.tree.map(
            lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *[dict(v) for _, v in blocks]
        )
    return out
