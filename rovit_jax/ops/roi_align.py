"""RoIAlign (He et al. 2017) with torchvision's ``aligned=True`` semantics, single- and multi-level.

Every output bin averages ``sampling_ratio x sampling_ratio`` bilinear samples, and bilinear
weights are separable, so each box reduces to per-axis corner indices ``[out, 2 * sampling_ratio]``
and weights. Two exact implementations use them (``method``):

* ``"gather"``: the 2-D corner grid is read with ONE gather from the row-major flattened feature
  map, then weighted and summed: ``N * out_h * out_w * 4 * sampling_ratio**2 * C`` reads,
  independent of the feature-map size. Its backward pass is a scatter-add of as many elements.
* ``"matmul"``: the per-axis corners become dense interpolation matrices ``A_y [N, out_h, H]``
  and ``A_x [N, out_w, W]`` and every box is ``A_y F A_x^T`` (two matmuls, as ``posemb.py``):
  ``N * out_h * H * W * C`` multiply-adds, and a backward pass of matmuls too.

Gathers and scatters are slow on CPU (element-wise loops, no fusion into the reduction), so for
the small maps of a CPU-sized detector (32x32 at stride 8, 256-px images) the matmul form is
~2.5x faster despite ~15x more arithmetic; for a 256x256 P2 map at 1024 px it would be ~800x
more arithmetic and the gathers win (the TPU detection code in TF Model Garden makes that choice).
``"auto"`` (the default) picks matmul where its multiply-adds per box are at most
``_MATMUL_COST_RATIO`` times the gather's reads, a static choice from the shapes. Both give the
same values (the same weights and samples, summed in a different order) and the same gradients,
for finite features: in the matmul form every cell of a map (of every level) meets every box,
with weight 0 outside it, so a non-finite cell reaches all boxes. The matmul form has a custom
VJP (reverse-mode differentiation only; ``jax.jvp`` needs ``method="gather"``).

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

METHODS = ("auto", "gather", "matmul")
# "auto" uses matmuls while their multiply-adds per box and channel are at most this many times
# the gather's reads. Measured on a 2-core CPU (7x7 bins, 2x2 samples, levels 3-5): the matmul
# form is ~2.5x faster (forward and backward) at a ratio of 15 (32x32 P3 map), about even near
# 30 (48x48) and ~1.5x slower at 55 (64x64).
_MATMUL_COST_RATIO = 24.0


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _use_matmul(
    method: str, out_hw: tuple[int, int], sizes: list[tuple[int, int]], sampling_ratio: int
) -> bool:
    """Static choice of the implementation for maps of `sizes` [(H, W), ...] (see METHODS)."""
    if method != "auto":
        return method == "matmul"
    out_h, out_w = out_hw
    gather_reads = out_h * out_w * (2 * sampling_ratio) ** 2
    macs = sum(
        min(out_h * h * w + out_h * out_w * w, out_w * h * w + out_h * out_w * h) for h, w in sizes
    )
    return macs <= _MATMUL_COST_RATIO * gather_reads


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


def _interpolation_matrix(index: jax.Array, weight: jax.Array, size: int) -> jax.Array:
    """[..., out, k] corner indices and weights -> [..., out, size] dense interpolation rows."""
    hit = index[..., None] == jnp.arange(size, dtype=index.dtype)  # [..., out, k, size]
    return jnp.sum(jnp.where(hit, weight[..., None], 0.0), axis=-2)


_HIGHEST = jax.lax.Precision.HIGHEST  # exact float32 products on every backend


def _separable_impl(ay: jax.Array, ax: jax.Array, f: jax.Array) -> tuple[jax.Array, jax.Array]:
    n, out_h, _ = ay.shape
    out_w, w = ax.shape[1:]
    # One [N * oh, H] x [H, W * C] matmul, then a matmul per (box, output row) with the x-axis
    # matrix broadcast over the rows: the contracted axis is then already in place (batching
    # over boxes alone makes XLA's CPU dot ~20x slower).
    t = jnp.einsum("noh,hwc->nowc", ay, f, precision=_HIGHEST)
    axb = jnp.broadcast_to(ax[:, None], (n, out_h, out_w, w))
    return jnp.einsum("nopw,nowc->nopc", axb, t, precision=_HIGHEST), t


@jax.custom_vjp
def _separable(ay: jax.Array, ax: jax.Array, f: jax.Array) -> jax.Array:
    """out[n, o, p, c] = sum_hw ay[n, o, h] ax[n, p, w] f[h, w, c] (all float32).

    A custom VJP only to lay the backward pass out as large matmuls (XLA's own transposes of
    the forward contractions are ~2.5x slower on CPU); the math is the plain chain rule.
    """
    return _separable_impl(ay, ax, f)[0]


def _separable_fwd(ay, ax, f):
    out, t = _separable_impl(ay, ax, f)
    return out, (ay, ax, f, t)


def _separable_bwd(residuals, g):
    ay, ax, f, t = residuals
    n, out_h, h = ay.shape
    w, c = f.shape[1:]
    # dt[n, o, w, c] = sum_p ax[n, p, w] g[n, o, p, c]: out_w terms, as multiply + reduce.
    dt = jnp.sum(jnp.swapaxes(ax, 1, 2)[:, None, :, :, None] * g[:, :, None], axis=3)
    dt = dt.reshape(n * out_h, w * c)
    contract_rows = (((0,), (0,)), ((), ()))
    df = jax.lax.dot_general(ay.reshape(n * out_h, h), dt, contract_rows, precision=_HIGHEST)
    contract_cols = (((1,), (1,)), ((), ()))
    d_ay = jax.lax.dot_general(dt, f.reshape(h, w * c), contract_cols, precision=_HIGHEST)
    d_ax = jnp.einsum("nopc,nowc->npw", g, t, precision=_HIGHEST)
    return d_ay.reshape(n, out_h, h), d_ax, df.reshape(h, w, c)


_separable.defvjp(_separable_fwd, _separable_bwd)


def _roi_align_matmul(
    features: jax.Array,
    boxes: jax.Array,
    *,
    scale: float,
    out_hw: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    box_weight: jax.Array | None = None,
) -> jax.Array:
    """RoIAlign on one [H, W, C] map as ``A_y F A_x^T`` per box: boxes [N, 4] -> [N, oh, ow, C].

    The same samples and weights as the gather form (`_axis_corners`), summed by matmuls.
    ``box_weight`` [N] (0 or 1) multiplies each box's result (selects the boxes of one level).
    Returns float32.
    """
    out_h, out_w = out_hw
    h, w, _ = features.shape
    boxes = boxes.astype(jnp.float32)
    scale = jnp.float32(scale)
    iy, wy = _axis_corners(boxes[:, 0], boxes[:, 2], scale, h, out_h, sampling_ratio, aligned)
    ix, wx = _axis_corners(boxes[:, 1], boxes[:, 3], scale, w, out_w, sampling_ratio, aligned)
    ay = _interpolation_matrix(iy, wy, h)  # [N, oh, H]
    ax = _interpolation_matrix(ix, wx, w)  # [N, ow, W]
    if box_weight is not None:
        ay = ay * box_weight[:, None, None]
    f = features.astype(jnp.float32)
    # Contract the axis that leaves the smaller intermediate first (rows for square outputs).
    if out_h * h * w + out_h * out_w * w <= out_w * h * w + out_h * out_w * h:
        return _separable(ay, ax, f)
    return jnp.swapaxes(_separable(ax, ay, jnp.swapaxes(f, 0, 1)), 1, 2)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int = 2,
    aligned: bool = True,
    method: str = "auto",
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
      method: "gather", "matmul" or "auto" (speed only; see the module docstring).

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
    method = _check_method(method)
    h, w, c = features.shape
    n = boxes.shape[0]
    with jax.named_scope("roi_align"):
        if _use_matmul(method, out_hw, [(h, w)], sampling_ratio):
            return _roi_align_matmul(
                features,
                boxes,
                scale=spatial_scale,
                out_hw=out_hw,
                sampling_ratio=sampling_ratio,
                aligned=aligned,
            ).astype(features.dtype)
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
    method: str = "auto",
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
        method=method,
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
    method: str = "auto",
) -> jax.Array:
    """RoIAlign on a feature pyramid, each box on its FPN level (see :func:`assign_fpn_levels`).

    Gather form: levels ``min_level..max_level`` are flattened row-major and concatenated into
    one [B, sum_l H_l * W_l, C] array; each box gathers from its own level's slice (offset, size
    and scale looked up per box). This keeps shapes fixed with one gather per box, instead of
    RoIAligning every box on every level and selecting (``num_levels`` times the work).
    Matmul form: every level's interpolation matrices are zero for the boxes of other levels, so
    the per-level results add up to each box's own level (the finest level dominates the cost).

    Args:
      features: {level: [B, H_l, W_l, C]}, level l at stride 2**l; must hold every level in
        [min_level, max_level] (others are ignored), all with the same B and C.
      boxes: [B, N, 4] (y0, x0, y1, x1) input-image pixels.
      output_size: out or (out_h, out_w).
      sampling_ratio: fixed positive samples per bin and axis.
      min_level, max_level, canonical_level, canonical_size: level-assignment rule.
      aligned: half-pixel shift (torchvision ``aligned``).
      method: "gather", "matmul" or "auto" (speed only; see the module docstring).

    Returns:
      [B, N, out_h, out_w, C] in the dtype of the level features.
    """
    out_hw = _output_hw(output_size)
    sampling_ratio = check_int("sampling_ratio", sampling_ratio, minimum=1)
    method = _check_method(method)
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

    with jax.named_scope("roi_align"):
        level = assign_fpn_levels(
            boxes,
            min_level=min_level,
            max_level=max_level,
            canonical_level=canonical_level,
            canonical_size=canonical_size,
        )
        sizes = [tuple(features[lv].shape[1:3]) for lv in levels]
        if _use_matmul(method, out_hw, sizes, sampling_ratio):

            def one_level(lv: int) -> jax.Array:
                fn = lambda f, b, on: _roi_align_matmul(
                    f,
                    b,
                    scale=2.0**-lv,
                    out_hw=out_hw,
                    sampling_ratio=sampling_ratio,
                    aligned=aligned,
                    box_weight=on,
                )
                on = (level == lv).astype(jnp.float32)
                return jax.vmap(fn)(features[lv], boxes, on)

            out = one_level(levels[0])
            for lv in levels[1:]:
                out = out + one_level(lv)
            return out.astype(first.dtype)

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
