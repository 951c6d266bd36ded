"""RoIAlign (He et al. 2017) with torchvision's ``aligned=True`` semantics, single- and multi-level.

Implementation: every output bin averages ``sampling_ratio x sampling_ratio`` bilinear samples,
and bilinear weights are separable, so each box reduces to per-axis corner indices
``[out, 2 * sampling_ratio]`` and weights. The 2-D corner grid is read with ONE gather from the
row-major flattened feature map, then weighted and summed. The cost is
``N * out_h * out_w * 4 * sampling_ratio**2 * C`` reads (and, on CPU where XLA does not fuse the
gather into the reduction, as many temporary floats), independent of the feature-map size. The alternative used by ``posemb.py`` (one-hot interpolation matrices +
einsum) costs ``N * out_h * H * W * C`` multiply-adds, which is fine for a 14x14 position
embedding but ~100x more work for a 256x256 P2 map at 1024 px, on CPU and TPU alike, so gathers
win here (the TPU detection code in TF Model Garden makes the same choice).

Boundary rules follow torchvision exactly: a sample with a coordinate below -1 or above the map
size contributes 0; coordinates in [-1, 0] clamp to 0; coordinates past the last cell centre clamp
to it. ``sampling_ratio`` must be a fixed positive int: torchvision's adaptive mode
(``sampling_ratio <= 0``, ``ceil(roi_size / out)`` samples) has a data-dependent sample count and
is not supported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rovit_jax.ops.boxes import box_area
from rovit_jax.ops.checks import check_int

__all__ = ["roi_align", "batched_roi_align", "multilevel_roi_align", "assign_fpn_levels"]


def _output_hw(output_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError(f"output_size must be an int or (h, w), got {output_size!r}")
        return (
            check_int("output_size[0]", output_size[0], minimum=1),
            check_int("output_size[1]", output_size[1], minimum=1),
        )
    size = check_int("output_size", output_size, minimum=1)
    return size, size


def _axis_corners(
    lo: jax.Array,
    hi: jax.Array,
    scale: jax.Array,
    size: jax.Array,
    out: int,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[jax.Array, jax.Array]:
    """Bilinear corner indices and weights of every sample along one axis.

    Args:
      lo, hi: [N] box extent along the axis, in input-image pixels.
      scale: [N] (or scalar) input-image -> feature-map scale.
      size: [N] (or scalar) int32 feature-map length along the axis.
      out: output bins along the axis.
      sampling_ratio: samples per bin along the axis.
      aligned: torchvision's half-pixel shift.

    Returns:
      (index [N, out, 2 * sampling_ratio] int32, weight [N, out, 2 * sampling_ratio] float32);
      weights include the 1 / sampling_ratio bin average and are 0 for out-of-range samples.
    """
    offset = 0.5 if aligned else 0.0
    start = lo * scale - offset
    length = hi * scale - offset - start
    if not aligned:
        length = jnp.maximum(length, 1.0)
    bin_len = length / out
    ph = jnp.arange(out, dtype=jnp.float32)[:, None]
    iy = jnp.arange(sampling_ratio, dtype=jnp.float32)[None, :] + 0.5
    # Same operation order as torchvision: start + ph * bin + (iy + .5) * bin / grid.
    coord = (start[:, None, None] + ph * bin_len[:, None, None]) + (
        iy * bin_len[:, None, None]
    ) / sampling_ratio  # [N, out, s]
    size = jnp.broadcast_to(size, lo.shape)[:, None, None]
    size_f = size.astype(jnp.float32)
    in_range = (coord >= -1.0) & (coord <= size_f)
    coord = jnp.clip(jnp.where(in_range, coord, 0.0), 0.0, size_f)
    low = jnp.floor(coord).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    high = jnp.where(at_end, size - 1, low + 1)
    frac = jnp.where(at_end, 0.0, coord - low.astype(jnp.float32))
    mask = in_range.astype(jnp.float32) / sampling_ratio
    index = jnp.stack([low, high], axis=-1)  # [N, out, s, 2]
    weight = jnp.stack([(1.0 - frac) * mask, frac * mask], axis=-1)
    n = lo.shape[0]
    return index.reshape(n, out, 2 * sampling_ratio), weight.reshape(n, out, 2 * sampling_ratio)


def _roi_align_flat(
    flat: jax.Array,
    boxes: jax.Array,
    *,
    start: jax.Array,
    height: jax.Array,
    width: jax.Array,
    scale: jax.Array,
    out_hw: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> jax.Array:
    """RoIAlign of boxes over row-major maps stored in one flat array.

    Args:
      flat: [L, C] concatenation of flattened [H_i, W_i, C] maps.
      boxes: [N, 4] (y0, x0, y1, x1) input-image pixels.
      start: [N] int32 row of ``flat`` where each box's map begins.
      height, width: [N] int32 size of each box's map.
      scale: [N] float32 spatial scale of each box's map.
      out_hw: (out_h, out_w).
      sampling_ratio: samples per bin and axis.
      aligned: half-pixel shift.

    Returns:
      [N, out_h, out_w, C] in the dtype of ``flat``.
    """
    out_h, out_w = out_hw
    boxes = boxes.astype(jnp.float32)
    iy, wy = _axis_corners(
        boxes[:, 0], boxes[:, 2], scale, height, out_h, sampling_ratio, aligned
    )  # [N, oh, a]
    ix, wx = _axis_corners(
        boxes[:, 1], boxes[:, 3], scale, width, out_w, sampling_ratio, aligned
    )  # [N, ow, b]
    rows = start[:, None, None] + iy * width[:, None, None]  # [N, oh, a]
    index = rows[:, :, :, None, None] + ix[:, None, None, :, :]  # [N, oh, a, ow, b]
    values = jnp.take(flat, index, axis=0, mode="clip")  # [N, oh, a, ow, b, C]
    weight = wy[:, :, :, None, None] * wx[:, None, None, :, :]  # [N, oh, a, ow, b]
    # Multiply + reduce rather than einsum: measured as fast on CPU, and a fusible consumer of
    # the gather for backends that fuse gathers (TPU/GPU), avoiding the corner tensor there.
    out = jnp.sum(values.astype(jnp.float32) * weight[..., None], axis=(2, 4))
    return out.astype(flat.dtype)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> jax.Array:
    """RoIAlign of boxes on one feature map (torchvision.ops.roi_align semantics).

    Args:
      features: [H, W, C] feature map.
      boxes: [N, 4] (y0, x0, y1, x1) in the coordinates of the image the map was computed from.
      output_size: out (square) or (out_h, out_w) bins.
      spatial_scale: image -> feature-map scale (1 / stride).
      sampling_ratio: fixed positive number of samples per bin along each axis (no adaptive mode).
      aligned: shift box coordinates by -0.5 pixel (the correct alignment; torchvision's
        ``aligned=True``). With False, boxes are also floored to 1 feature cell, as torchvision.

    Returns:
      [N, out_h, out_w, C] in the dtype of ``features``. Gradients flow to ``features`` (and, via
      the sample positions, to ``boxes``; stop them at the call site if unwanted).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [H, W, C], got shape {tuple(features.shape)}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got shape {tuple(boxes.shape)}")
    out_hw = _output_hw(output_size)
    sampling_ratio = check_int("sampling_ratio", sampling_ratio, minimum=1)
    if not spatial_scale > 0:
        raise ValueError(f"spatial_scale must be positive, got {spatial_scale!r}")
    h, w, c = features.shape
    n = boxes.shape[0]
    return _roi_align_flat(
        features.reshape(h * w, c),
        boxes,
        start=jnp.zeros((n,), jnp.int32),
        height=jnp.full((n,), h, jnp.int32),
        width=jnp.full((n,), w, jnp.int32),
        scale=jnp.full((n,), spatial_scale, jnp.float32),
        out_hw=out_hw,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )


def batched_roi_align(
    features: jax.Array,
    boxes: jax.Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> jax.Array:
    """:func:`roi_align` over a batch: features [B, H, W, C], boxes [B, N, 4] -> [B, N, oh, ow, C]."""
    if features.ndim != 4:
        raise ValueError(f"features must be [B, H, W, C], got shape {tuple(features.shape)}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(
            f"boxes must be [B={features.shape[0]}, N, 4], got shape {tuple(boxes.shape)}"
        )
    fn = lambda f, b: roi_align(
        f,
        b,
        output_size=output_size,
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    return jax.vmap(fn)(features, boxes)


def assign_fpn_levels(
    boxes: jax.Array,
    *,
    min_level: int = 2,
    max_level: int = 5,
    canonical_level: int = 4,
    canonical_size: float = 224.0,
) -> jax.Array:
    """FPN level of each box: ``floor(canonical_level + log2(sqrt(area) / canonical_size))``.

    Clipped to [min_level, max_level]; empty boxes go to ``min_level``.

    Args:
      boxes: [..., 4] (y0, x0, y1, x1) input-image pixels.

    Returns:
      [...] int32 levels.
    """
    if min_level > max_level:
        raise ValueError(f"min_level ({min_level}) must be <= max_level ({max_level})")
    if not canonical_size > 0:
        raise ValueError(f"canonical_size must be positive, got {canonical_size!r}")
    size = jnp.sqrt(box_area(boxes.astype(jnp.float32)))
    # log2(0) = -inf, floor(-inf) = -inf: clipping in float sends empty boxes to min_level.
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_size))
    level = jnp.clip(level, min_level, max_level)
    return jax.lax.stop_gradient(level).astype(jnp.int32)


def multilevel_roi_align(
    features: dict[int, jax.Array],
    boxes: jax.Array,
    *,
    output_size: int | tuple[int, int],
    sampling_ratio: int = 2,
    min_level: int = 2,
    max_level: int = 5,
    canonical_level: int = 4,
    canonical_size: float = 224.0,
    aligned: bool = True,
) -> jax.Array:
    """RoIAlign on a feature pyramid, each box on its FPN level (see :func:`assign_fpn_levels`).

    Levels ``min_level..max_level`` are flattened row-major and concatenated into one
    [B, sum_l H_l * W_l, C] array; each box gathers from its own level's slice (offset, size and
    scale looked up per box). This keeps shapes fixed with one gather per box, instead of
    RoIAligning every box on every level and selecting (``num_levels`` times the work).

    Args:
      features: {level: [B, H_l, W_l, C]}, level l at stride 2**l; must hold every level in
        [min_level, max_level] (others are ignored), all with the same B and C.
      boxes: [B, N, 4] (y0, x0, y1, x1) input-image pixels.
      output_size: out or (out_h, out_w).
      sampling_ratio: fixed positive samples per bin and axis.
      min_level, max_level, canonical_level, canonical_size: level-assignment rule.
      aligned: half-pixel shift (torchvision ``aligned``).

    Returns:
      [B, N, out_h, out_w, C] in the dtype of the level features.
    """
    out_hw = _output_hw(output_size)
    sampling_ratio = check_int("sampling_ratio", sampling_ratio, minimum=1)
    levels = list(range(min_level, max_level + 1))
    if not levels:
        raise ValueError(f"min_level ({min_level}) must be <= max_level ({max_level})")
    missing = [lv for lv in levels if lv not in features]
    if missing:
        raise ValueError(f"features is missing levels {missing} (has {sorted(features)})")
    first = features[levels[0]]
    if first.ndim != 4:
        raise ValueError(f"features[{levels[0]}] must be [B, H, W, C], got {first.shape}")
    batch, channels = first.shape[0], first.shape[-1]
    for lv in levels:
        f = features[lv]
        if f.ndim != 4 or f.shape[0] != batch or f.shape[-1] != channels:
            raise ValueError(
                f"features[{lv}] must be [B={batch}, H, W, C={channels}], got {tuple(f.shape)}"
            )
    if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B={batch}, N, 4], got shape {tuple(boxes.shape)}")

    flat = jnp.concatenate(
        [features[lv].reshape(batch, -1, channels) for lv in levels], axis=1
    )  # [B, L, C]
    starts, heights, widths = [], [], []
    total = 0
    for lv in levels:
        _, h, w, _ = features[lv].shape
        starts.append(total)
        heights.append(h)
        widths.append(w)
        total += h * w
    starts = jnp.asarray(starts, jnp.int32)
    heights = jnp.asarray(heights, jnp.int32)
    widths = jnp.asarray(widths, jnp.int32)
    scales = jnp.asarray([2.0**-lv for lv in levels], jnp.float32)

    level = assign_fpn_levels(
        boxes,
        min_level=min_level,
        max_level=max_level,
        canonical_level=canonical_level,
        canonical_size=canonical_size,
    )
    pos = level - min_level  # [B, N]

    def one(flat_b: jax.Array, boxes_b: jax.Array, pos_b: jax.Array) -> jax.Array:
        return _roi_align_flat(
            flat_b,
            boxes_b,
            start=starts[pos_b],
            height=heights[pos_b],
            width=widths[pos_b],
            scale=scales[pos_b],
            out_hw=out_hw,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )

    return jax.vmap(one)(flat, boxes, pos)
