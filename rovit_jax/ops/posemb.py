"""Position-embedding ops: bilinear resizing and Cropped Positional Embedding (CPE).

Every op here is linear in the position embedding, so it is written as separable interpolation
weight matrices contracted with einsum: fixed shapes, jittable, cheap on TPU (no gathers), and
exactly differentiable w.r.t. the embedding.

Coordinate convention (shared by all ops): a grid of ``n`` cells has cell centres at integer
coordinates ``0 .. n-1``; continuous coordinate ``c`` is sampled bilinearly from the two nearest
centres, clamped to ``[0, n - 1]`` at the edges (half-pixel convention, as in
``jax.image.resize(..., "bilinear", antialias=False)`` and ``torch.nn.functional.interpolate(...,
align_corners=False)``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rovit_jax.ops.checks import check_int

__all__ = ["resize_pos_embed", "crop_pos_embed", "sample_crop_boxes"]


def _interp_matrix(coords: jax.Array, size: int) -> jax.Array:
    """Bilinear weights of continuous coordinates over a 1-D grid.

    Args:
      coords: [..., n] continuous coordinates (cell centres at integers).
      size: number of cells of the sampled grid.

    Returns:
      [..., n, size] float32 weights; each row sums to 1.
    """
    coords = jnp.clip(coords.astype(jnp.float32), 0.0, size - 1.0)
    lo = jnp.floor(coords)
    frac = coords - lo
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, size - 1)
    return (
        jax.nn.one_hot(lo, size, dtype=jnp.float32) * (1.0 - frac)[..., None]
        + jax.nn.one_hot(hi, size, dtype=jnp.float32) * frac[..., None]
    )


def _resize_matrix(in_size: int, out_size: int) -> jax.Array:
    """[out_size, in_size] half-pixel bilinear resize weights."""
    centres = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * (in_size / out_size) - 0.5
    return _interp_matrix(centres, in_size)


def _check_pos_embed(pos_embed: jax.Array) -> None:
    if pos_embed.ndim != 3:
        raise ValueError(f"pos_embed must be [H, W, D] (3-D), got shape {tuple(pos_embed.shape)}")


def resize_pos_embed(pos_embed: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Bilinearly resizes a grid of position embeddings (half-pixel centres, no antialiasing).

    Args:
      pos_embed: [H, W, D] embedding grid.
      out_hw: (h, w) output grid size.

    Returns:
      [h, w, D] resized grid, dtype of ``pos_embed``.
    """
    _check_pos_embed(pos_embed)
    if len(out_hw) != 2:
        raise ValueError(f"out_hw must be (h, w), got {out_hw!r}")
    h = check_int("out_hw[0]", out_hw[0], minimum=1)
    w = check_int("out_hw[1]", out_hw[1], minimum=1)
    in_h, in_w, _ = pos_embed.shape
    if (h, w) == (in_h, in_w):
        return pos_embed
    wy = _resize_matrix(in_h, h)
    wx = _resize_matrix(in_w, w)
    out = jnp.einsum("hp,wq,pqd->hwd", wy, wx, pos_embed.astype(jnp.float32))
    return out.astype(pos_embed.dtype)


def crop_pos_embed(pos_embed: jax.Array, boxes: jax.Array, *, up_size: int) -> jax.Array:
    """Cropped Positional Embedding: a per-example random region of an upsampled PE grid.

    The grid is upsampled to [up_size, up_size] (as ``resize_pos_embed``), then each box is
    crop-and-resized back to [H, W] with one bilinear sample at every output bin centre
    (RoIAlign with ``aligned=True, sampling_ratio=1``). Output bin (i, j) of box
    (y0, x0, y1, x1) samples the upsampled grid at
    ``y = y0 * up + (i + 0.5) * (y1 - y0) * up / H - 0.5`` (same for x).

    Both stages are linear, so their weight matrices are composed into one [H, H] (and [W, W])
    matrix per box and contracted with the small original grid.

    Args:
      pos_embed: [H, W, D] learned embedding grid.
      boxes: [B, 4] normalised (y0, x0, y1, x1) in [0, 1].
      up_size: side of the upsampled grid (e.g. 64 = 1024 / 16 for the detection resolution).

    Returns:
      [B, H, W, D] per-example embeddings, dtype of ``pos_embed``.
    """
    _check_pos_embed(pos_embed)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, 4], got shape {tuple(boxes.shape)}")
    up_size = check_int("up_size", up_size, minimum=1)
    in_h, in_w, _ = pos_embed.shape
    boxes = boxes.astype(jnp.float32)
    y0, x0, y1, x1 = (boxes[:, k] for k in range(4))

    def bin_centres(lo: jax.Array, hi: jax.Array, n: int) -> jax.Array:  # [B, n]
        steps = jnp.arange(n, dtype=jnp.float32) + 0.5
        return lo[:, None] * up_size + steps[None, :] * ((hi - lo) * up_size / n)[:, None] - 0.5

    crop_y = _interp_matrix(bin_centres(y0, y1, in_h), up_size)  # [B, H, up]
    crop_x = _interp_matrix(bin_centres(x0, x1, in_w), up_size)  # [B, W, up]
    wy = jnp.einsum("bhu,up->bhp", crop_y, _resize_matrix(in_h, up_size))  # [B, H, H]
    wx = jnp.einsum("bwv,vq->bwq", crop_x, _resize_matrix(in_w, up_size))  # [B, W, W]
    tmp = jnp.einsum("bhp,pqd->bhqd", wy, pos_embed.astype(jnp.float32))
    out = jnp.einsum("bwq,bhqd->bhwd", wx, tmp)
    return out.astype(pos_embed.dtype)


def _check_range(
    name: str, rng: tuple[float, float], *, upper: float | None
) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in rng)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair, got {rng!r}") from None
    bad = not (0.0 < lo <= hi) or (upper is not None and hi > upper) or not math.isfinite(hi)
    if bad:
        bound = f"(0, {upper}]" if upper is not None else "(0, inf)"
        raise ValueError(f"{name} must satisfy 0 < low <= high within {bound}, got {rng!r}")
    return lo, hi


def sample_crop_boxes(
    rng: jax.Array,
    batch: int,
    *,
    scale: tuple[float, float] = (0.1, 1.0),
    ratio: tuple[float, float] = (0.5, 2.0),
) -> jax.Array:
    """Random-Resized-Crop style boxes in normalised coordinates (fixed shape, no rejection).

    Area fraction ~ U(scale), aspect ratio w/h ~ logU(ratio), h = sqrt(area / ratio),
    w = sqrt(area * ratio). A box that would not fit (h > 1 or w > 1) is shrunk about its aspect
    ratio until its longer normalised side is 1, so the aspect ratio always stays in ``ratio`` and
    only clipped boxes end with an area below the sampled one. The position is uniform over all
    placements inside the unit square.

    Args:
      rng: PRNG key.
      batch: number of boxes.
      scale: (low, high) area fraction, within (0, 1].
      ratio: (low, high) aspect ratio w/h, positive.

    Returns:
      [batch, 4] float32 boxes (y0, x0, y1, x1).
    """
    batch = check_int("batch", batch, minimum=1)
    s_lo, s_hi = _check_range("scale", scale, upper=1.0)
    r_lo, r_hi = _check_range("ratio", ratio, upper=None)
    k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
    area = jax.random.uniform(k_area, (batch,), minval=s_lo, maxval=s_hi)
    log_r = jax.random.uniform(k_ratio, (batch,), minval=math.log(r_lo), maxval=math.log(r_hi))
    aspect = jnp.exp(log_r)
    h = jnp.sqrt(area / aspect)
    w = jnp.sqrt(area * aspect)
    shrink = jnp.minimum(1.0, 1.0 / jnp.maximum(h, w))
    h = jnp.minimum(h * shrink, 1.0)
    w = jnp.minimum(w * shrink, 1.0)
    y0 = jax.random.uniform(k_y, (batch,)) * (1.0 - h)
    x0 = jax.random.uniform(k_x, (batch,)) * (1.0 - w)
    return jnp.stack([y0, x0, y0 + h, x0 + w], axis=-1)
