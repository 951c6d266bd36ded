"""Anchor boxes and anchor points over a feature pyramid.

Level ``l`` has stride ``2**l`` and ``ceil(H / 2**l) x ceil(W / 2**l)`` cells (equal to the
feature maps when the image side is a multiple of ``2**max_level``); cell ``(i, j)`` is centred at
``((i + 0.5) * stride, (j + 0.5) * stride)`` in input-image pixels. Shapes are static (computed
with numpy at trace time) and results are float32 jax arrays.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rovit_jax.ops.checks import check_int

__all__ = ["anchor_grid", "anchor_points", "flatten_levels", "level_strides"]


def _check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (operator.index(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (height, width) ints, got {image_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def _check_levels(levels: Iterable[int]) -> list[int]:
    try:
        out = [operator.index(lv) for lv in levels]
    except TypeError:
        raise ValueError(f"levels must be non-negative ints, got {levels!r}") from None
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise ValueError(f"levels must be distinct non-negative ints, got {levels!r}")
    return sorted(out)


def _centres(size: int, stride: int) -> np.ndarray:
    return (np.arange(math.ceil(size / stride), dtype=np.float64) + 0.5) * stride


def anchor_points(image_size: tuple[int, int], levels: Iterable[int]) -> dict[int, jax.Array]:
    """Cell-centre points of every pyramid level (for the anchor-free centerness RPN).

    Args:
      image_size: (height, width) of the input image in pixels.
      levels: pyramid levels l (stride 2**l).

    Returns:
      {level: [H_l, W_l, 2] float32 points (y, x)}.
    """
    height, width = _check_image_size(image_size)
    out = {}
    for lv in _check_levels(levels):
        ys, xs = _centres(height, 2**lv), _centres(width, 2**lv)
        grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1)
        out[lv] = jnp.asarray(grid, jnp.float32)
    return out


def anchor_grid(
    image_size: tuple[int, int],
    *,
    min_level: int = 2,
    max_level: int = 6,
    num_scales: int = 1,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    anchor_size: float = 8.0,
) -> dict[int, jax.Array]:
    """Multi-scale, multi-aspect anchors centred on every cell of every level.

    Level l, scale index s and aspect ratio r (width / height) give an anchor of area
    ``side**2`` with ``side = anchor_size * 2**l * 2**(s / num_scales)``:
    ``height = side / sqrt(r)``, ``width = side * sqrt(r)``. The anchor axis is ordered
    scale-major: ``a = s * len(aspect_ratios) + ratio_index``.

    Args:
      image_size: (height, width) in pixels.
      min_level, max_level: pyramid levels (inclusive).
      num_scales: octave subdivisions per level.
      aspect_ratios: width / height ratios.
      anchor_size: anchor side in units of the level stride (at scale index 0).

    Returns:
      {level: [H_l, W_l, A, 4] float32 pixel boxes (y0, x0, y1, x1)}, A = num_scales *
      len(aspect_ratios).
    """
    height, width = _check_image_size(image_size)
    min_level = check_int("min_level", min_level, minimum=0)
    max_level = check_int("max_level", max_level, minimum=0)
    num_scales = check_int("num_scales", num_scales, minimum=1)
    if min_level > max_level:
        raise ValueError(f"min_level ({min_level}) must be <= max_level ({max_level})")
    ratios = [float(r) for r in aspect_ratios]
    if not ratios or min(ratios) <= 0:
        raise ValueError(f"aspect_ratios must be positive numbers, got {aspect_ratios!r}")
    if not anchor_size > 0:
        raise ValueError(f"anchor_size must be positive, got {anchor_size!r}")
    out = {}
    for lv in _check_levels(range(min_level, max_level + 1)):
        stride = 2**lv
        half_hw = []
        for s in range(num_scales):
            side = anchor_size * stride * 2.0 ** (s / num_scales)
            for r in ratios:
                half_hw.append((0.5 * side / math.sqrt(r), 0.5 * side * math.sqrt(r)))
        half = np.asarray(half_hw, np.float64)  # [A, 2]
        ys, xs = _centres(height, stride), _centres(width, stride)
        centre = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1)[:, :, None, :]
        boxes = np.concatenate([centre - half, centre + half], axis=-1)  # [H, W, A, 4]
        out[lv] = jnp.asarray(boxes, jnp.float32)
    return out


def flatten_levels(per_level: dict[int, jax.Array], *, batch_dims: int = 0) -> jax.Array:
    """Concatenates per-level arrays in increasing level order, flattening their spatial axes.

    Each value is [*batch, ..., D] (e.g. anchors [H_l, W_l, A, 4], points [H_l, W_l, 2], head
    outputs [B, H_l, W_l, A, 4] with batch_dims=1); every axis between the ``batch_dims`` leading
    ones and the last is flattened. The row order matches :func:`level_strides`.

    Args:
      per_level: {level: array}; all share the leading ``batch_dims`` axes and the last axis.
      batch_dims: number of leading axes kept as they are.

    Returns:
      [*batch, sum_l rows_l, D].
    """
    if not per_level:
        raise ValueError("per_level must not be empty")
    parts = []
    for lv in sorted(per_level):
        x = per_level[lv]
        if x.ndim < batch_dims + 1:
            raise ValueError(
                f"per_level[{lv}] has shape {tuple(x.shape)}; need batch_dims={batch_dims} "
                "leading axes plus a last axis"
            )
        parts.append(x.reshape(*x.shape[:batch_dims], -1, x.shape[-1]))
    return jnp.concatenate(parts, axis=batch_dims)


def level_strides(per_level: dict[int, jax.Array], *, batch_dims: int = 0) -> jax.Array:
    """Stride 2**l of every row of ``flatten_levels(per_level, batch_dims=batch_dims)``.

    Returns:
      [sum_l rows_l] float32.
    """
    if not per_level:
        raise ValueError("per_level must not be empty")
    parts = []
    for lv in sorted(per_level):
        shape = per_level[lv].shape
        rows = int(np.prod(shape[batch_dims:-1], dtype=np.int64))
        parts.append(np.full((rows,), 2.0**lv, np.float32))
    return jnp.asarray(np.concatenate(parts))
