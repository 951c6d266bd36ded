"""Box geometry and box coders with fixed shapes.

Boxes are ``[..., 4]`` float arrays ``(y0, x0, y1, x1)`` (absolute pixels inside the detector,
normalised in datasets; every op here is unit-agnostic unless it takes an image size). All ops
broadcast over leading dimensions, are jittable, and never return NaN for degenerate boxes: a box
with non-positive height or width has area 0 and IoU 0 with everything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "box_area",
    "box_iou",
    "batched_box_iou",
    "generalized_box_iou",
    "paired_iou",
    "paired_giou",
    "encode_deltas",
    "decode_deltas",
    "encode_ltrb",
    "decode_ltrb",
    "centerness",
    "clip_boxes",
    "shrink_boxes",
    "valid_box_mask",
    "yxyx_to_xywh",
    "xywh_to_yxyx",
    "DEFAULT_DELTA_WEIGHTS",
    "DEFAULT_DELTA_CLIP",
]

# Faster R-CNN box-head coder weights, in (dy, dx, dh, dw) order.
DEFAULT_DELTA_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Largest log-scale change decode_deltas applies (Detectron's log(1000 / 16)): keeps exp() finite.
DEFAULT_DELTA_CLIP = math.log(1000.0 / 16.0)
# Smallest side used inside log() when encoding, so padded (all-zero) boxes stay finite.
_MIN_SIDE = 1e-6
# Coordinates are clamped to +-this in the overlap measures: areas then stay below float32's
# maximum, so huge or infinite (diverged) boxes give IoU/GIoU in range instead of inf - inf = NaN.
_COORD_LIMIT = 1e15


def _check_boxes(name: str, boxes: jax.Array) -> None:
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have a last axis of size 4, got shape {tuple(boxes.shape)}")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den > 0, else 0; gradient-safe (no NaN through the masked branch)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def box_area(boxes: jax.Array) -> jax.Array:
    """Area of boxes; 0 for boxes with a non-positive side.

    Args:
      boxes: [..., 4] (y0, x0, y1, x1).

    Returns:
      [...] areas.
    """
    _check_boxes("boxes", boxes)
    h = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    w = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return h * w


def _inter_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Broadcasting intersection and union areas of a [..., 4] and b [..., 4] (clamped coords)."""
    a, b = jnp.clip(a, -_COORD_LIMIT, _COORD_LIMIT), jnp.clip(b, -_COORD_LIMIT, _COORD_LIMIT)
    top = jnp.maximum(a[..., 0], b[..., 0])
    left = jnp.maximum(a[..., 1], b[..., 1])
    bottom = jnp.minimum(a[..., 2], b[..., 2])
    right = jnp.minimum(a[..., 3], b[..., 3])
    inter = jnp.maximum(bottom - top, 0.0) * jnp.maximum(right - left, 0.0)
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _enclosing_area(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = jnp.clip(a, -_COORD_LIMIT, _COORD_LIMIT), jnp.clip(b, -_COORD_LIMIT, _COORD_LIMIT)
    h = jnp.maximum(a[..., 2], b[..., 2]) - jnp.minimum(a[..., 0], b[..., 0])
    w = jnp.maximum(a[..., 3], b[..., 3]) - jnp.minimum(a[..., 1], b[..., 1])
    return jnp.maximum(h, 0.0) * jnp.maximum(w, 0.0)


def paired_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Elementwise IoU of broadcastable box arrays.

    Args:
      a: [..., 4] boxes.
      b: [..., 4] boxes, broadcastable against ``a``.

    Returns:
      [...] IoU in [0, 1]; 0 where the union is empty. Infinite or huge coordinates are
      clamped to +-1e15 (results stay in range); NaN coordinates give NaN.
    """
    _check_boxes("a", a)
    _check_boxes("b", b)
    inter, union = _inter_union(a, b)
    return _safe_div(inter, union)


def paired_giou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Elementwise generalised IoU (Rezatofighi et al. 2019) of broadcastable box arrays.

    GIoU = IoU - (enclosing - union) / enclosing, in [-1, 1]. Terms with an empty denominator
    are 0 (so two identical degenerate boxes have GIoU 0).

    Args:
      a: [..., 4] boxes.
      b: [..., 4] boxes, broadcastable against ``a``.

    Returns:
      [...] GIoU.
    """
    _check_boxes("a", a)
    _check_boxes("b", b)
    inter, union = _inter_union(a, b)
    enclosing = _enclosing_area(a, b)
    return _safe_div(inter, union) - _safe_div(enclosing - union, enclosing)


def _check_2d(name: str, boxes: jax.Array) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be [num_boxes, 4], got shape {tuple(boxes.shape)}")


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise IoU matrix.

    Args:
      a: [N, 4] boxes.
      b: [M, 4] boxes.

    Returns:
      [N, M] IoU.
    """
    _check_2d("a", a)
    _check_2d("b", b)
    return paired_iou(a[:, None, :], b[None, :, :])


def batched_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise IoU matrices of a batch.

    Args:
      a: [B, N, 4] boxes.
      b: [B, M, 4] boxes.

    Returns:
      [B, N, M] IoU.
    """
    if a.ndim != 3 or a.shape[-1] != 4:
        raise ValueError(f"a must be [batch, N, 4], got shape {tuple(a.shape)}")
    if b.ndim != 3 or b.shape[-1] != 4 or b.shape[0] != a.shape[0]:
        raise ValueError(f"b must be [batch={a.shape[0]}, M, 4], got shape {tuple(b.shape)}")
    return paired_iou(a[:, :, None, :], b[:, None, :, :])


def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise generalised IoU matrix.

    Args:
      a: [N, 4] boxes.
      b: [M, 4] boxes.

    Returns:
      [N, M] GIoU in [-1, 1].
    """
    _check_2d("a", a)
    _check_2d("b", b)
    return paired_giou(a[:, None, :], b[None, :, :])


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * h, boxes[..., 1] + 0.5 * w, h, w


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        wy, wx, wh, ww = (float(v) for v in weights)
    except (TypeError, ValueError):
        raise ValueError(f"weights must be 4 numbers (wy, wx, wh, ww), got {weights!r}") from None
    if min(wy, wx, wh, ww) <= 0:
        raise ValueError(f"weights must be positive, got {weights!r}")
    return wy, wx, wh, ww


def encode_deltas(
    boxes: jax.Array,
    anchors: jax.Array,
    weights: Sequence[float] = DEFAULT_DELTA_WEIGHTS,
) -> jax.Array:
    """Faster R-CNN box deltas of ``boxes`` relative to ``anchors``.

    ``dy = wy * (cy - cy_a) / h_a``, ``dx = wx * (cx - cx_a) / w_a``, ``dh = wh * log(h / h_a)``,
    ``dw = ww * log(w / w_a)``. Sides are floored at 1e-6 inside the logs so padding boxes give
    large but finite targets (mask them out of the loss).

    Args:
      boxes: [..., 4] target boxes (y0, x0, y1, x1).
      anchors: [..., 4] reference boxes, broadcastable against ``boxes``.
      weights: (wy, wx, wh, ww) scaling of the four deltas.

    Returns:
      [..., 4] deltas (dy, dx, dh, dw).
    """
    _check_boxes("boxes", boxes)
    _check_boxes("anchors", anchors)
    wy, wx, wh, ww = _check_weights(weights)
    cy, cx, h, w = _centre_size(boxes)
    cya, cxa, ha, wa = _centre_size(anchors)
    h, w = jnp.maximum(h, _MIN_SIDE), jnp.maximum(w, _MIN_SIDE)
    ha, wa = jnp.maximum(ha, _MIN_SIDE), jnp.maximum(wa, _MIN_SIDE)
    return jnp.stack(
        [
            wy * (cy - cya) / ha,
            wx * (cx - cxa) / wa,
            wh * jnp.log(h / ha),
            ww * jnp.log(w / wa),
        ],
        axis=-1,
    )


def decode_deltas(
    deltas: jax.Array,
    anchors: jax.Array,
    weights: Sequence[float] = DEFAULT_DELTA_WEIGHTS,
    clip: float = DEFAULT_DELTA_CLIP,
) -> jax.Array:
    """Inverse of :func:`encode_deltas`.

    Args:
      deltas: [..., 4] (dy, dx, dh, dw).
      anchors: [..., 4] reference boxes, broadcastable against ``deltas``.
      weights: (wy, wx, wh, ww) used when encoding.
      clip: upper bound on the unweighted log-scale deltas ``dh / wh``, ``dw / ww`` (keeps
        ``exp`` finite for wild predictions).

    Returns:
      [..., 4] boxes (y0, x0, y1, x1).
    """
    _check_boxes("deltas", deltas)
    _check_boxes("anchors", anchors)
    wy, wx, wh, ww = _check_weights(weights)
    cya, cxa, ha, wa = _centre_size(anchors)
    dy = deltas[..., 0] / wy
    dx = deltas[..., 1] / wx
    dh = jnp.minimum(deltas[..., 2] / wh, clip)
    dw = jnp.minimum(deltas[..., 3] / ww, clip)
    cy = cya + dy * ha
    cx = cxa + dx * wa
    h = ha * jnp.exp(dh)
    w = wa * jnp.exp(dw)
    return jnp.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def _check_points(points: jax.Array) -> None:
    if points.ndim < 1 or points.shape[-1] != 2:
        raise ValueError(f"points must have a last axis of size 2 (y, x), got {points.shape}")


def _stride_factor(stride: float | jax.Array | None) -> jax.Array | float:
    """Stride as a multiplier broadcastable against [..., 4] (trailing axis added to arrays)."""
    if stride is None:
        return 1.0
    if isinstance(stride, (int, float)):
        if not stride > 0:
            raise ValueError(f"stride must be positive, got {stride!r}")
        return float(stride)
    return jnp.asarray(stride, jnp.float32)[..., None]


def encode_ltrb(
    boxes: jax.Array,
    points: jax.Array,
    stride: float | jax.Array | None = None,
) -> jax.Array:
    """Distances from points to the four sides of boxes (FCOS / OLN parameterisation).

    Distances are negative on sides the point lies outside of.

    Args:
      boxes: [..., 4] (y0, x0, y1, x1).
      points: [..., 2] (y, x), broadcastable against ``boxes[..., :2]``.
      stride: optional divisor: a positive float or an array broadcastable against ``[...]``
        (e.g. the [P] stride of each flattened pyramid point), so targets are in stride units.

    Returns:
      [..., 4] (left, top, right, bottom).
    """
    _check_boxes("boxes", boxes)
    _check_points(points)
    y, x = points[..., 0], points[..., 1]
    ltrb = jnp.stack(
        [x - boxes[..., 1], y - boxes[..., 0], boxes[..., 3] - x, boxes[..., 2] - y], axis=-1
    )
    return ltrb / _stride_factor(stride)


def decode_ltrb(
    dist: jax.Array,
    points: jax.Array,
    stride: float | jax.Array | None = None,
) -> jax.Array:
    """Inverse of :func:`encode_ltrb`.

    Args:
      dist: [..., 4] (left, top, right, bottom), in stride units if ``stride`` is given.
      points: [..., 2] (y, x), broadcastable against ``dist[..., :2]``.
      stride: optional multiplier (as in :func:`encode_ltrb`).

    Returns:
      [..., 4] boxes (y0, x0, y1, x1).
    """
    _check_boxes("dist", dist)
    _check_points(points)
    dist = dist * _stride_factor(stride)
    y, x = points[..., 0], points[..., 1]
    return jnp.stack(
        [y - dist[..., 1], x - dist[..., 0], y + dist[..., 3], x + dist[..., 2]], axis=-1
    )


def centerness(ltrb: jax.Array) -> jax.Array:
    """FCOS centerness ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``.

    Args:
      ltrb: [..., 4] (left, top, right, bottom) distances (any common unit).

    Returns:
      [...] centerness in [0, 1]; 0 where any distance is <= 0 (point on or outside the box).
    """
    _check_boxes("ltrb", ltrb)
    left, top, right, bottom = (ltrb[..., k] for k in range(4))
    inside = (left > 0) & (top > 0) & (right > 0) & (bottom > 0)
    ratio_x = _safe_div(jnp.minimum(left, right), jnp.maximum(left, right))
    ratio_y = _safe_div(jnp.minimum(top, bottom), jnp.maximum(top, bottom))
    prod = jnp.where(inside, ratio_x * ratio_y, 0.0)
    # sqrt has an infinite derivative at 0; route masked entries through a safe value.
    safe = jnp.where(prod > 0, prod, 1.0)
    return jnp.where(prod > 0, jnp.sqrt(safe), 0.0)


def clip_boxes(boxes: jax.Array, height: float | jax.Array, width: float | jax.Array) -> jax.Array:
    """Clips boxes to the image ``[0, height] x [0, width]``.

    Args:
      boxes: [..., 4] (y0, x0, y1, x1).
      height: scalar or array broadcastable against ``boxes[..., 0]`` (e.g. [B, 1] per image).
      width: as ``height``.

    Returns:
      [..., 4] clipped boxes.
    """
    _check_boxes("boxes", boxes)
    height = jnp.asarray(height, boxes.dtype)
    width = jnp.asarray(width, boxes.dtype)
    y0 = jnp.clip(boxes[..., 0], 0.0, height)
    x0 = jnp.clip(boxes[..., 1], 0.0, width)
    y1 = jnp.clip(boxes[..., 2], 0.0, height)
    x1 = jnp.clip(boxes[..., 3], 0.0, width)
    return jnp.stack([y0, x0, y1, x1], axis=-1)


def shrink_boxes(boxes: jax.Array, factor: float | jax.Array) -> jax.Array:
    """Scales boxes about their centres (factor < 1 shrinks; the VLM score uses 0.7).

    Args:
      boxes: [..., 4] (y0, x0, y1, x1).
      factor: positive scale of both sides (scalar or broadcastable against ``boxes[..., 0]``).

    Returns:
      [..., 4] boxes with the same centres and sides multiplied by ``factor``.
    """
    _check_boxes("boxes", boxes)
    if isinstance(factor, (int, float)) and not factor > 0:
        raise ValueError(f"factor must be positive, got {factor!r}")
    cy, cx, h, w = _centre_size(boxes)
    half_h = 0.5 * h * factor
    half_w = 0.5 * w * factor
    return jnp.stack([cy - half_h, cx - half_w, cy + half_h, cx + half_w], axis=-1)


def valid_box_mask(boxes: jax.Array) -> jax.Array:
    """True for boxes whose coordinates are finite and whose height and width are positive.

    Args:
      boxes: [..., 4] (y0, x0, y1, x1).

    Returns:
      [...] bool.
    """
    _check_boxes("boxes", boxes)
    finite = jnp.all(jnp.isfinite(boxes), axis=-1)
    return finite & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def yxyx_to_xywh(boxes: jax.Array) -> jax.Array:
    """(y0, x0, y1, x1) -> (x, y, width, height) as in COCO json ``bbox``; [..., 4] -> [..., 4]."""
    _check_boxes("boxes", boxes)
    y0, x0, y1, x1 = (boxes[..., k] for k in range(4))
    return jnp.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


def xywh_to_yxyx(boxes: jax.Array) -> jax.Array:
    """(x, y, width, height) -> (y0, x0, y1, x1); [..., 4] -> [..., 4]."""
    _check_boxes("boxes", boxes)
    x, y, w, h = (boxes[..., k] for k in range(4))
    return jnp.stack([y, x, y + h, x + w], axis=-1)
