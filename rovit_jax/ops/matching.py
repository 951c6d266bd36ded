"""Anchor / proposal to ground-truth matching and balanced sampling, with fixed shapes."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

__all__ = ["match_boxes", "sample_balanced", "FOREGROUND", "BACKGROUND", "IGNORE"]

FOREGROUND = 1
BACKGROUND = 0
IGNORE = -1


@jax.named_scope("match_boxes")
def match_boxes(
    iou: jax.Array,
    gt_valid: jax.Array,
    *,
    fg_threshold: float,
    bg_threshold: float,
    allow_low_quality: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Faster R-CNN matcher: each anchor takes its best ground truth and a fg/bg/ignore label.

    With ``q`` the anchor's highest IoU over valid ground truths: ``q >= fg_threshold`` -> 1
    (foreground), ``q < bg_threshold`` -> 0 (background), otherwise -1 (ignored). Low-quality
    rule (``allow_low_quality``): for every valid ground truth, all anchors reaching that ground
    truth's highest IoU (ties included) become foreground, keeping their own best-match index (as
    Detectron2 / torchvision). Unlike those, a ground truth whose highest IoU is 0 adds no
    low-quality match (otherwise every anchor with IoU 0 would become foreground).

    Args:
      iou: [N, M] IoU between N anchors and M ground truths.
      gt_valid: [M] bool, False for padding ground truths (never matched).
      fg_threshold: foreground IoU threshold.
      bg_threshold: background IoU threshold, <= fg_threshold.
      allow_low_quality: apply the low-quality rule.

    Returns:
      (matched_gt_index [N] int32 in [0, M), meaningful where label == 1 (0 when no ground truth
       is valid); labels [N] int32 in {1, 0, -1}).
    """
    if iou.ndim != 2:
        raise ValueError(f"iou must be [N, M], got shape {tuple(iou.shape)}")
    n, m = iou.shape
    if gt_valid.shape != (m,):
        raise ValueError(f"gt_valid must be [M={m}], got shape {tuple(gt_valid.shape)}")
    if not bg_threshold <= fg_threshold:
        raise ValueError(
            f"bg_threshold ({bg_threshold!r}) must be <= fg_threshold ({fg_threshold!r})"
        )
    if m == 0:
        return jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32)

    gt_valid = gt_valid.astype(bool)
    # Padding columns get IoU -1: below any threshold and never the argmax of a valid column.
    quality = jnp.where(gt_valid[None, :], iou.astype(jnp.float32), -1.0)
    matched = jnp.argmax(quality, axis=1).astype(jnp.int32)
    best = jnp.max(quality, axis=1)
    labels = jnp.where(
        best >= fg_threshold, FOREGROUND, jnp.where(best < bg_threshold, BACKGROUND, IGNORE)
    ).astype(jnp.int32)
    if allow_low_quality:
        best_per_gt = jnp.max(quality, axis=0)  # [M]
        is_best = (quality == best_per_gt[None, :]) & (best_per_gt > 0)[None, :]
        low_quality = jnp.any(is_best & gt_valid[None, :], axis=1)
        labels = jnp.where(low_quality, FOREGROUND, labels)
    return matched, labels


@jax.named_scope("sample_balanced")
def sample_balanced(
    rng: jax.Array,
    labels: jax.Array,
    *,
    num_samples: int,
    positive_fraction: float,
) -> tuple[jax.Array, jax.Array]:
    """Random fixed-size subset with at most ``positive_fraction`` positives, topped up with negatives.

    Positives are ``labels > 0``, negatives ``labels == 0``; negative labels (ignore) are never
    sampled. Up to ``floor(num_samples * positive_fraction)`` positives are drawn uniformly
    without replacement, then negatives fill the remaining slots (Detectron2's
    ``subsample_labels``). Implemented with one uniform key per element and top_k, so shapes are
    fixed and the draw is deterministic per ``rng``.

    Args:
      rng: PRNG key.
      labels: [N] int labels (1 fg / 0 bg / -1 ignore, or class ids with 0 as background).
      num_samples: output length.
      positive_fraction: upper bound on the fraction of positives, in [0, 1].

    Returns:
      (indices [num_samples] int32, positives first then negatives, each group in random order,
       padded with -1; valid [num_samples] bool, False on padding). Sampled indices are distinct.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be [N], got shape {tuple(labels.shape)}")
    try:
        ok = not isinstance(num_samples, bool) and operator.index(num_samples) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}")
    n = labels.shape[0]
    max_pos = int(num_samples * positive_fraction)
    pad = jnp.full((num_samples,), -1, jnp.int32), jnp.zeros((num_samples,), bool)
    if n == 0:
        return pad

    u = jax.random.uniform(rng, (n,))  # in [0, 1)
    positive = labels > 0
    negative = labels == 0
    # Positives beyond the cap are dropped: keep the max_pos with the largest keys.
    chosen_pos = jnp.zeros((n,), bool)
    if max_pos > 0:
        k = min(max_pos, n)
        pos_key = jnp.where(positive, u, -jnp.inf)
        top_key, top_idx = jax.lax.top_k(pos_key, k)
        chosen_pos = chosen_pos.at[top_idx].set(top_key > -jnp.inf)
    # Priorities: chosen positives (in [4, 5]) before negatives (in [1, 2]) before nothing; the
    # gap keeps the groups apart even where float32 rounds 1 + u up to 2.
    priority = jnp.where(chosen_pos, 4.0 + u, jnp.where(negative, 1.0 + u, -jnp.inf))
    k = min(num_samples, n)
    top_priority, top_idx = jax.lax.top_k(priority, k)
    valid = top_priority > -jnp.inf
    indices = jnp.where(valid, top_idx, -1).astype(jnp.int32)
    if k < num_samples:
        indices = jnp.concatenate([indices, pad[0][: num_samples - k]])
        valid = jnp.concatenate([valid, pad[1][: num_samples - k]])
    return indices, valid
