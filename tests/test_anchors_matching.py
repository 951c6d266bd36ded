"""Tests for rovit_jax.ops.anchors and rovit_jax.ops.matching."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import Matcher

from rovit_jax.ops.anchors import anchor_grid, anchor_points, flatten_levels, level_strides
from rovit_jax.ops.matching import match_boxes, sample_balanced


# ---------------------------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------------------------
def test_anchor_grid_matches_loop_derivation():
    image = (64, 96)
    ratios = (0.5, 1.0, 2.0)
    grid = anchor_grid(image, min_level=3, max_level=5, num_scales=2, aspect_ratios=ratios)
    assert sorted(grid) == [3, 4, 5]
    for level, anchors in grid.items():
        stride = 2**level
        rows, cols = math.ceil(64 / stride), math.ceil(96 / stride)
        assert anchors.shape == (rows, cols, 6, 4) and anchors.dtype == jnp.float32
        anchors = np.asarray(anchors, np.float64)
        for i in (0, rows - 1):
            for j in (0, cols // 2, cols - 1):
                a = 0
                for s in range(2):
                    for r in ratios:
                        y0, x0, y1, x1 = anchors[i, j, a]
                        side = 8.0 * stride * 2 ** (s / 2)
                        assert (y0 + y1) / 2 == pytest.approx((i + 0.5) * stride)
                        assert (x0 + x1) / 2 == pytest.approx((j + 0.5) * stride)
                        assert (y1 - y0) * (x1 - x0) == pytest.approx(side**2, rel=1e-5)
                        assert (x1 - x0) / (y1 - y0) == pytest.approx(r, rel=1e-5)
                        a += 1


def test_anchor_points_are_the_anchor_centres():
    image = (40, 72)  # not a multiple of the coarsest stride: ceil sizes
    points = anchor_points(image, [2, 4, 6])
    grid = anchor_grid(image, min_level=2, max_level=6, aspect_ratios=(1.0,))
    for level, pts in points.items():
        assert pts.shape == (math.ceil(40 / 2**level), math.ceil(72 / 2**level), 2)
        box = np.asarray(grid[level][:, :, 0])
        np.testing.assert_allclose(pts, (box[..., :2] + box[..., 2:]) / 2)
    np.testing.assert_array_equal(points[4][1, 2], [24.0, 40.0])


def test_flatten_levels_order_and_strides():
    grid = anchor_grid((32, 32), min_level=2, max_level=4)
    flat = flatten_levels(grid)
    sizes = [8 * 8 * 3, 4 * 4 * 3, 2 * 2 * 3]
    assert flat.shape == (sum(sizes), 4)
    np.testing.assert_array_equal(flat[: sizes[0]], np.asarray(grid[2]).reshape(-1, 4))
    np.testing.assert_array_equal(flat[-sizes[2] :], np.asarray(grid[4]).reshape(-1, 4))
    strides = np.asarray(level_strides(grid))
    np.testing.assert_array_equal(strides, np.repeat([4.0, 8.0, 16.0], sizes))
    # Batched head outputs: keep the batch axis; insertion order of the dict does not matter.
    outputs = {4: jnp.ones((2, 2, 2, 3, 4)), 2: jnp.zeros((2, 8, 8, 3, 4))}
    flat_out = flatten_levels(outputs, batch_dims=1)
    assert flat_out.shape == (2, sizes[0] + sizes[2], 4)
    assert float(flat_out[:, : sizes[0]].sum()) == 0.0 and bool(jnp.all(flat_out[:, sizes[0] :]))
    assert level_strides(outputs, batch_dims=1).shape == (sizes[0] + sizes[2],)


def test_anchor_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        anchor_grid((0, 10))
    with pytest.raises(ValueError, match="min_level"):
        anchor_grid((32, 32), min_level=5, max_level=3)
    with pytest.raises(ValueError, match="aspect_ratios"):
        anchor_grid((32, 32), aspect_ratios=(1.0, -2.0))


# ---------------------------------------------------------------------------------------------
# Matcher
# ---------------------------------------------------------------------------------------------
def np_match(iou, gt_valid, fg, bg, low_quality):
    """Loop re-derivation of the Faster R-CNN matcher over valid columns only."""
    n, m = iou.shape
    cols = [j for j in range(m) if gt_valid[j]]
    matched = np.zeros(n, np.int64)
    labels = np.zeros(n, np.int64)
    if not cols:
        return matched, labels
    for i in range(n):
        best_j = max(cols, key=lambda j: iou[i, j])
        matched[i] = best_j
        q = iou[i, best_j]
        labels[i] = 1 if q >= fg else (0 if q < bg else -1)
    if low_quality:
        for j in cols:
            top = max(iou[i, j] for i in range(n))
            if top <= 0:
                continue
            for i in range(n):
                if iou[i, j] == top:
                    labels[i] = 1
    return matched, labels


@pytest.mark.parametrize("low_quality", [True, False])
def test_match_boxes_equals_numpy_and_torchvision(low_quality):
    rs = np.random.RandomState(0)
    n, m = 60, 7
    iou = (rs.uniform(size=(n, m)) ** 2).astype(np.float32)
    iou[rs.uniform(size=(n, m)) < 0.3] = 0.0
    # Ground truth 2 only has low-quality matches, and its best anchor overlaps nothing else well.
    iou[:, 2] *= 0.5
    best = np.argmax(iou[:, 2])
    iou[best, [0, 1, 3, 4, 5, 6]] = 0.05
    gt_valid = np.array([True, True, True, False, True, True, False])
    fn = jax.jit(
        lambda q, v: match_boxes(
            q, v, fg_threshold=0.7, bg_threshold=0.3, allow_low_quality=low_quality
        )
    )
    matched, labels = (np.asarray(x) for x in fn(jnp.asarray(iou), jnp.asarray(gt_valid)))
    ref_matched, ref_labels = np_match(iou, gt_valid, 0.7, 0.3, low_quality)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(matched[labels == 1], ref_matched[labels == 1])
    assert matched.dtype == np.int32 and labels.dtype == np.int32
    assert set(np.unique(labels)) == {-1, 0, 1}
    if low_quality:  # the low-quality rule changed something
        assert (ref_labels != np_match(iou, gt_valid, 0.7, 0.3, False)[1]).any()

    # torchvision's Matcher on the valid columns (every column has a positive best IoU here).
    cols = np.nonzero(gt_valid)[0]
    tv = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    tv_out = tv(torch.from_numpy(iou[:, cols].T.copy())).numpy()
    tv_labels = np.where(tv_out >= 0, 1, np.where(tv_out == Matcher.BELOW_LOW_THRESHOLD, 0, -1))
    np.testing.assert_array_equal(labels, tv_labels)
    np.testing.assert_array_equal(matched[labels == 1], cols[tv_out[labels == 1]])


def test_match_boxes_edge_cases():
    iou = jnp.asarray([[0.0, 0.9], [0.0, 0.2], [0.0, 0.5]])
    # Column 0 overlaps nothing: it adds no low-quality foreground.
    _, labels = match_boxes(iou, jnp.asarray([True, True]), fg_threshold=0.7, bg_threshold=0.3)
    np.testing.assert_array_equal(labels, [1, 0, -1])
    # No valid ground truth: everything is background.
    matched, labels = match_boxes(
        iou, jnp.asarray([False, False]), fg_threshold=0.7, bg_threshold=0.3
    )
    np.testing.assert_array_equal(labels, [0, 0, 0])
    assert np.all((np.asarray(matched) >= 0) & (np.asarray(matched) < 2))
    # Ties for a ground truth's best IoU are all foreground.
    tie = jnp.asarray([[0.4, 0.0], [0.4, 0.0], [0.1, 0.0]])
    _, labels = match_boxes(tie, jnp.asarray([True, False]), fg_threshold=0.7, bg_threshold=0.3)
    np.testing.assert_array_equal(labels, [1, 1, 0])
    with pytest.raises(ValueError, match="bg_threshold"):
        match_boxes(iou, jnp.asarray([True, True]), fg_threshold=0.3, bg_threshold=0.7)


# ---------------------------------------------------------------------------------------------
# Balanced sampler
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_pos, num_neg, num_samples, fraction",
    [
        (30, 200, 64, 0.25),
        (5, 200, 64, 0.25),
        (30, 10, 64, 0.25),
        (3, 2, 16, 0.5),
        (8, 50, 20, 0.0),
    ],
)
def test_sample_balanced_properties(num_pos, num_neg, num_samples, fraction):
    rs = np.random.RandomState(num_pos + num_neg)
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * 40)
    labels = labels[rs.permutation(len(labels))]
    fn = jax.jit(
        lambda key, lab: sample_balanced(
            key, lab, num_samples=num_samples, positive_fraction=fraction
        )
    )
    idx, valid = (np.asarray(x) for x in fn(jax.random.key(0), jnp.asarray(labels)))
    assert idx.shape == (num_samples,) and valid.shape == (num_samples,)
    chosen = idx[valid]
    assert len(np.unique(chosen)) == len(chosen)  # no duplicates
    assert np.all(labels[chosen] >= 0)  # ignored entries never sampled
    expect_pos = min(int(num_samples * fraction), num_pos)
    expect_neg = min(num_samples - expect_pos, num_neg)
    assert (labels[chosen] == 1).sum() == expect_pos
    assert (labels[chosen] == 0).sum() == expect_neg
    assert (labels[chosen] == 1).sum() <= num_samples * fraction
    # Valid entries first, padding -1 after.
    assert valid[: len(chosen)].all() and np.all(idx[~valid] == -1)
    # Deterministic per key, different for another key.
    idx2, _ = fn(jax.random.key(0), jnp.asarray(labels))
    np.testing.assert_array_equal(idx, idx2)
    if num_neg > expect_neg:
        idx3, _ = fn(jax.random.key(1), jnp.asarray(labels))
        assert not np.array_equal(idx, np.asarray(idx3))


def test_sample_balanced_is_uniform_over_positives():
    labels = jnp.asarray([1] * 8 + [0] * 8)
    counts = np.zeros(16)
    for seed in range(300):
        idx, valid = sample_balanced(
            jax.random.key(seed), labels, num_samples=4, positive_fraction=0.5
        )
        counts[np.asarray(idx)[np.asarray(valid)]] += 1
    # Each positive is drawn with probability 2/8 per call: 75 of 300 expected.
    assert np.all(np.abs(counts[:8] - 75) < 30)
    assert np.all(np.abs(counts[8:] - 75) < 30)


def test_sample_balanced_short_input_pads():
    idx, valid = sample_balanced(
        jax.random.key(3), jnp.asarray([1, 0, -1]), num_samples=6, positive_fraction=0.5
    )
    assert sorted(np.asarray(idx)[np.asarray(valid)].tolist()) == [0, 1]
    np.testing.assert_array_equal(np.asarray(valid), [True, True, False, False, False, False])
    with pytest.raises(ValueError, match="positive_fraction"):
        sample_balanced(jax.random.key(0), jnp.zeros(3), num_samples=2, positive_fraction=1.5)
