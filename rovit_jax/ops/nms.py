"""Greedy non-maximum suppression with fixed-shape outputs.

Algorithm (tiled, as in TPU detection code): boxes are sorted by score and processed in tiles of
``tile_size``. For each tile, (1) boxes overlapping an already-kept box of an earlier tile are
dropped with one [tile, N] IoU test, then (2) suppression inside the tile is resolved by iterating
``keep_j = candidate_j and not any_{i<j}(keep_i and IoU_ij > t)`` to its fixed point. The greedy
result is the unique solution of that recursion and the iteration fixes one more leading entry
per step, so it converges to exactly the sequential greedy answer, usually in a few steps. Each
step is a dense [tile, tile] or [tile, N] op, so the sequential depth is ~N / tile instead of N
(a per-box ``fori_loop``), and the loop stops early once ``max_output`` boxes are kept. Memory is
O(tile * N), not O(N^2).

Suppression uses ``IoU > iou_threshold`` (strict), as torchvision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rovit_jax.ops.boxes import box_iou, paired_iou, valid_box_mask
from rovit_jax.ops.checks import check_int

__all__ = ["nms", "batched_nms", "per_class_nms", "vote_boxes"]

_DEFAULT_TILE = 256


def _check_threshold(iou_threshold: float) -> float:
    try:
        value = float(iou_threshold)
    except (TypeError, ValueError):
        raise ValueError(f"iou_threshold must be a float, got {iou_threshold!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold!r}")
    return value


def _sorted_keep(
    boxes: jax.Array,
    classes: jax.Array | None,
    candidate: jax.Array,
    *,
    iou_threshold: float,
    max_output: int,
    tile_size: int,
) -> jax.Array:
    """Greedy NMS over boxes ALREADY sorted by decreasing score.

    Args:
      boxes: [N, 4] sorted boxes.
      classes: optional [N] int class ids; boxes of different classes never suppress each other.
      candidate: [N] bool, boxes eligible to be kept (valid and finite score).
      iou_threshold: suppress when IoU > iou_threshold.
      max_output: stop once this many boxes are kept.
      tile_size: boxes per tile.

    Returns:
      [N] bool keep mask in sorted order. Tiles after the one that reached max_output kept
      boxes are not processed (left False); the caller takes the first max_output True entries.
    """
    n = boxes.shape[0]
    tile = min(tile_size, n)
    num_tiles = -(-n // tile)
    pad = num_tiles * tile - n
    boxes = jnp.pad(boxes.astype(jnp.float32), ((0, pad), (0, 0)))
    candidate = jnp.pad(candidate, (0, pad))
    if classes is not None:
        classes = jnp.pad(classes.astype(jnp.int32), (0, pad), constant_values=-1)
    total = n + pad

    def suppresses(tile_boxes, tile_classes, other_boxes, other_classes):
        """[T, M] bool: IoU(tile box, other box) > threshold (same class only)."""
        over = paired_iou(tile_boxes[:, None, :], other_boxes[None, :, :]) > iou_threshold
        if tile_classes is not None:
            over &= tile_classes[:, None] == other_classes[None, :]
        return over

    upper = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # i < j

    def tile_body(state):
        t, keep = state
        lo = t * tile
        tile_boxes = jax.lax.dynamic_slice_in_dim(boxes, lo, tile)
        tile_cand = jax.lax.dynamic_slice_in_dim(candidate, lo, tile)
        tile_classes = None if classes is None else jax.lax.dynamic_slice_in_dim(classes, lo, tile)
        # (1) Suppression by boxes kept in earlier tiles (``keep`` is still False from here on).
        by_kept = suppresses(tile_boxes, tile_classes, boxes, classes) & keep[None, :]
        tile_cand &= ~jnp.any(by_kept, axis=1)
        # (2) Greedy inside the tile, as a fixed-point iteration.
        within = suppresses(tile_boxes, tile_classes, tile_boxes, tile_classes) & upper

        def step(k):
            return tile_cand & ~jnp.any(within & k[:, None], axis=0)

        def changed(carry):
            prev, cur = carry
            return jnp.any(prev != cur)

        def iterate(carry):
            _, cur = carry
            return cur, step(cur)

        _, tile_keep = jax.lax.while_loop(changed, iterate, (tile_cand, step(tile_cand)))
        keep = jax.lax.dynamic_update_slice_in_dim(keep, tile_keep, lo, axis=0)
        return t + 1, keep

    def tile_cond(state):
        t, keep = state
        return (t < num_tiles) & (jnp.sum(keep) < max_output)

    _, keep = jax.lax.while_loop(tile_cond, tile_body, (0, jnp.zeros((total,), bool)))
    return keep[:n]


def _first_true(mask: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """Positions of the first ``count`` True entries of [N] mask -> ([count] int32, [count] bool)."""
    (pos,) = jnp.nonzero(mask, size=count, fill_value=-1)
    pos = pos.astype(jnp.int32)
    return pos, pos >= 0


@jax.named_scope("nms")
def _nms_impl(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array | None,
    *,
    iou_threshold: float,
    max_output: int,
    tile_size: int,
) -> tuple[jax.Array, jax.Array]:
    valid = valid_box_mask(boxes) & jnp.isfinite(scores)
    key = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-key, stable=True)  # descending; ties keep input order
    keep = _sorted_keep(
        boxes[order],
        None if classes is None else classes[order],
        valid[order],
        iou_threshold=iou_threshold,
        max_output=max_output,
        tile_size=tile_size,
    )
    pos, ok = _first_true(keep, max_output)
    indices = jnp.where(ok, order[jnp.maximum(pos, 0)], -1).astype(jnp.int32)
    return indices, ok


def nms(
    boxes: jax.Array,
    scores: jax.Array,
    *,
    iou_threshold: float,
    max_output: int,
    tile_size: int = _DEFAULT_TILE,
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS in decreasing score order (torchvision.ops.nms semantics, fixed-size output).

    Boxes that are invalid (non-finite or non-positive side) or have a non-finite score are never
    kept. Equal scores are visited in input order.

    Args:
      boxes: [N, 4] (y0, x0, y1, x1).
      scores: [N].
      iou_threshold: a box is suppressed by a kept box when their IoU > iou_threshold.
      max_output: output length; the first max_output kept boxes (highest scores) are returned.
      tile_size: boxes per suppression tile (speed only).

    Returns:
      (indices [max_output] int32 into ``boxes``, in decreasing score order, padded with -1;
       valid [max_output] bool, False on padding).
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got shape {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be [N={boxes.shape[0]}], got shape {tuple(scores.shape)}")
    iou_threshold = _check_threshold(iou_threshold)
    max_output = check_int("max_output", max_output, minimum=1)
    tile_size = check_int("tile_size", tile_size, minimum=1)
    if boxes.shape[0] == 0:
        return jnp.full((max_output,), -1, jnp.int32), jnp.zeros((max_output,), bool)
    return _nms_impl(
        boxes,
        scores,
        None,
        iou_threshold=iou_threshold,
        max_output=max_output,
        tile_size=tile_size,
    )


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    *,
    iou_threshold: float,
    max_output: int,
    tile_size: int = _DEFAULT_TILE,
) -> tuple[jax.Array, jax.Array]:
    """:func:`nms` per batch element: boxes [B, N, 4], scores [B, N] -> ([B, max_output] x 2)."""
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, N, 4], got shape {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:2]:
        raise ValueError(f"scores must be {tuple(boxes.shape[:2])}, got {tuple(scores.shape)}")
    fn = lambda b, s: nms(
        b, s, iou_threshold=iou_threshold, max_output=max_output, tile_size=tile_size
    )
    return jax.vmap(fn)(boxes, scores)


def per_class_nms(
    boxes: jax.Array,
    scores: jax.Array,
    *,
    iou_threshold: float,
    max_output: int,
    score_threshold: float = 0.0,
    pre_nms_top_k: int | None = None,
    tile_size: int = _DEFAULT_TILE,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Class-aware NMS: each (box, class) pair is a candidate; different classes never interact.

    Candidates with ``score > score_threshold`` are ranked by score, optionally cut to the
    ``pre_nms_top_k`` best (do set it for many classes: NMS cost grows with the square of the
    number of candidates, N * K by default), then suppressed greedily within their class. Class
    separation is an explicit same-class mask on the IoU test rather than torchvision's
    coordinate-offset trick, which loses float32 precision for large offsets.

    Args:
      boxes: [N, 4] shared by all classes, or [N, K, 4] per class.
      scores: [N, K].
      iou_threshold: suppress when IoU > iou_threshold within a class.
      max_output: number of detections returned (best scores overall).
      score_threshold: candidates need a score strictly above it.
      pre_nms_top_k: optional number of best candidates passed to NMS.
      tile_size: boxes per suppression tile (speed only).

    Returns:
      (boxes [max_output, 4], scores [max_output], classes [max_output] int32,
       valid [max_output] bool), sorted by decreasing score; padding has zero boxes and scores
      and class -1.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, K], got shape {tuple(scores.shape)}")
    n, k = scores.shape
    if boxes.shape not in ((n, 4), (n, k, 4)):
        raise ValueError(f"boxes must be [N={n}, 4] or [N, K={k}, 4], got {tuple(boxes.shape)}")
    iou_threshold = _check_threshold(iou_threshold)
    max_output = check_int("max_output", max_output, minimum=1)
    tile_size = check_int("tile_size", tile_size, minimum=1)
    total = n * k
    if pre_nms_top_k is not None:
        pre_nms_top_k = check_int("pre_nms_top_k", pre_nms_top_k, minimum=1)
    if total == 0:
        return (
            jnp.zeros((max_output, 4), jnp.float32),
            jnp.zeros((max_output,), jnp.float32),
            jnp.full((max_output,), -1, jnp.int32),
            jnp.zeros((max_output,), bool),
        )

    flat_scores = scores.reshape(total).astype(jnp.float32)
    if boxes.ndim == 2:
        flat_boxes = jnp.broadcast_to(boxes[:, None, :], (n, k, 4)).reshape(total, 4)
    else:
        flat_boxes = boxes.reshape(total, 4)
    flat_classes = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :], (n, k)).reshape(-1)
    flat_scores = jnp.where(flat_scores > score_threshold, flat_scores, -jnp.inf)

    if pre_nms_top_k is not None and pre_nms_top_k < total:
        _, top = jax.lax.top_k(flat_scores, pre_nms_top_k)
        flat_scores, flat_boxes, flat_classes = flat_scores[top], flat_boxes[top], flat_classes[top]

    indices, valid = _nms_impl(
        flat_boxes,
        flat_scores,
        flat_classes,
        iou_threshold=iou_threshold,
        max_output=max_output,
        tile_size=tile_size,
    )
    safe = jnp.maximum(indices, 0)
    out_boxes = jnp.where(valid[:, None], flat_boxes[safe].astype(jnp.float32), 0.0)
    out_scores = jnp.where(valid, flat_scores[safe], 0.0)
    out_classes = jnp.where(valid, flat_classes[safe], -1)
    return out_boxes, out_scores, out_classes, valid


def vote_boxes(
    kept_boxes: jax.Array,
    kept_classes: jax.Array,
    kept_valid: jax.Array,
    boxes: jax.Array,
    scores: jax.Array,
    *,
    iou_threshold: float,
) -> jax.Array:
    """Box voting (Gidaris & Komodakis, 2015): each kept detection's box becomes the
    score-weighted mean of the candidate boxes that overlap it with IoU >= `iou_threshold`,
    weighted by their score for the detection's class (the detection's own box among them).

    Args:
      kept_boxes: [D, 4] detections (per_class_nms output), kept_classes [D] int32,
        kept_valid [D] bool.
      boxes: [N, 4] candidate boxes shared by all classes; scores [N, K] their class scores
        (non-positive scores do not vote).

    Returns:
      [D, 4] voted boxes; padding and detections without a voter keep their box.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape[:1] != boxes.shape[:1]:
        raise ValueError(
            f"boxes must be [N, 4] and scores [N, K], got {tuple(boxes.shape)} and "
            f"{tuple(scores.shape)}"
        )
    iou = box_iou(kept_boxes, boxes)  # [D, N]
    weight = jnp.take(scores, jnp.clip(kept_classes, 0), axis=1).T  # [D, N]: score for its class
    weight = jnp.where((iou >= iou_threshold) & (weight > 0), weight, 0.0)
    total = jnp.sum(weight, axis=1, keepdims=True)
    voted = (weight @ boxes) / jnp.maximum(total, 1e-12)
    return jnp.where(kept_valid[:, None] & (total > 0), voted, kept_boxes)
