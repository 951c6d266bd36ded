"""Tests for rovit_jax.ops.nms against torchvision.ops.nms / batched_nms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from rovit_jax.ops.nms import batched_nms, nms, per_class_nms, vote_boxes


def clustered_boxes(rs: np.random.RandomState, n: int) -> np.ndarray:
    """[n, 4] yxyx boxes jittered around a few centres, so suppression chains are common."""
    centres = rs.uniform(20, 80, size=(max(n // 8, 1), 2))
    c = centres[rs.randint(len(centres), size=n)] + rs.normal(0, 4, size=(n, 2))
    hw = rs.uniform(8, 30, size=(n, 2))
    return np.concatenate([c - hw / 2, c + hw / 2], 1).astype(np.float32)


def tv_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    return torchvision.ops.nms(
        torch.from_numpy(boxes[:, [1, 0, 3, 2]].copy()), torch.from_numpy(scores), thr
    ).numpy()


@pytest.mark.parametrize("n, tile_size", [(1, 256), (37, 256), (300, 64), (1000, 128)])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.8])
def test_nms_keeps_torchvision_indices_in_order(n, tile_size, thr):
    rs = np.random.RandomState(n + int(thr * 10))
    boxes = clustered_boxes(rs, n)
    scores = rs.uniform(size=n).astype(np.float32)
    ref = tv_nms(boxes, scores, thr)
    fn = jax.jit(lambda b, s: nms(b, s, iou_threshold=thr, max_output=n + 5, tile_size=tile_size))
    idx, valid = fn(jnp.asarray(boxes), jnp.asarray(scores))
    idx, valid = np.asarray(idx), np.asarray(valid)
    assert idx.shape == (n + 5,) and idx.dtype == np.int32 and valid.dtype == bool
    np.testing.assert_array_equal(idx[valid], ref)
    # Padding: the kept entries come first, then -1 / False.
    assert valid[: len(ref)].all() and not valid[len(ref) :].any()
    assert np.all(idx[len(ref) :] == -1)


def test_nms_max_output_truncates_to_the_best_kept():
    rs = np.random.RandomState(3)
    boxes = clustered_boxes(rs, 400)
    scores = rs.uniform(size=400).astype(np.float32)
    ref = tv_nms(boxes, scores, 0.5)
    assert len(ref) > 20
    idx, valid = nms(jnp.asarray(boxes), jnp.asarray(scores), iou_threshold=0.5, max_output=20)
    np.testing.assert_array_equal(np.asarray(idx), ref[:20])
    assert np.asarray(valid).all()


def test_invalid_boxes_and_nonfinite_scores_are_never_kept():
    boxes = np.array(
        [
            [0, 0, 10, 10],  # valid, best score
            [50, 50, 60, 60],  # -inf score
            [20, 20, 20, 30],  # zero height
            [30, 30, 40, np.nan],  # nan coordinate
            [70, 70, 80, 80],  # nan score
            [90, 90, 95, 95],  # valid
        ],
        np.float32,
    )
    scores = np.array([0.9, -np.inf, 0.8, 0.7, np.nan, 0.1], np.float32)
    idx, valid = nms(jnp.asarray(boxes), jnp.asarray(scores), iou_threshold=0.5, max_output=6)
    np.testing.assert_array_equal(np.asarray(idx), [0, 5, -1, -1, -1, -1])
    np.testing.assert_array_equal(np.asarray(valid), [True, True, False, False, False, False])
    # An invalid box does not suppress anything either: identical box, valid, kept.
    boxes2 = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    idx2, _ = nms(jnp.asarray(boxes2), jnp.asarray([-np.inf, 0.5]), iou_threshold=0.5, max_output=2)
    np.testing.assert_array_equal(np.asarray(idx2), [1, -1])


def test_batched_nms_matches_per_image_torchvision():
    rs = np.random.RandomState(4)
    boxes = np.stack([clustered_boxes(rs, 120) for _ in range(3)])
    scores = rs.uniform(size=(3, 120)).astype(np.float32)
    fn = jax.jit(lambda b, s: batched_nms(b, s, iou_threshold=0.6, max_output=50))
    idx, valid = fn(jnp.asarray(boxes), jnp.asarray(scores))
    assert idx.shape == (3, 50) and valid.shape == (3, 50)
    for i in range(3):
        ref = tv_nms(boxes[i], scores[i], 0.6)[:50]
        np.testing.assert_array_equal(np.asarray(idx[i])[np.asarray(valid[i])], ref)


def tv_per_class(boxes, scores, thr, max_output, score_threshold, top_k):
    """Reference: flatten (box, class) pairs, threshold, top-k, torchvision.ops.batched_nms."""
    n, k = scores.shape
    flat_scores = scores.reshape(-1)
    flat_boxes = (np.repeat(boxes[:, None], k, 1) if boxes.ndim == 2 else boxes).reshape(-1, 4)
    flat_classes = np.tile(np.arange(k), n)
    sel = np.nonzero(flat_scores > score_threshold)[0]
    sel = sel[np.argsort(-flat_scores[sel], kind="stable")]
    if top_k is not None:
        sel = sel[:top_k]
    keep = torchvision.ops.batched_nms(
        torch.from_numpy(flat_boxes[sel][:, [1, 0, 3, 2]].copy()),
        torch.from_numpy(flat_scores[sel]),
        torch.from_numpy(flat_classes[sel]),
        thr,
    ).numpy()[:max_output]
    return flat_boxes[sel][keep], flat_scores[sel][keep], flat_classes[sel][keep]


@pytest.mark.parametrize("shared_boxes", [True, False])
@pytest.mark.parametrize("top_k", [None, 150])
def test_per_class_nms_matches_torchvision_batched_nms(shared_boxes, top_k):
    rs = np.random.RandomState(5 + shared_boxes)
    n, k = 80, 4
    if shared_boxes:
        boxes = clustered_boxes(rs, n)
    else:
        base = clustered_boxes(rs, n)[:, None, :]
        boxes = (base + rs.normal(0, 2, size=(n, k, 4))).astype(np.float32)
    scores = rs.uniform(size=(n, k)).astype(np.float32)
    fn = jax.jit(
        lambda b, s: per_class_nms(
            b, s, iou_threshold=0.5, max_output=60, score_threshold=0.2, pre_nms_top_k=top_k
        )
    )
    out_boxes, out_scores, out_classes, valid = (np.asarray(x) for x in fn(boxes, scores))
    ref_boxes, ref_scores, ref_classes = tv_per_class(boxes, scores, 0.5, 60, 0.2, top_k)
    m = len(ref_scores)
    assert valid.sum() == m and valid[:m].all()
    np.testing.assert_array_equal(out_scores[:m], ref_scores)
    np.testing.assert_array_equal(out_classes[:m], ref_classes)
    np.testing.assert_array_equal(out_boxes[:m], ref_boxes)
    assert np.all(out_scores[m:] == 0) and np.all(out_classes[m:] == -1)
    assert np.all(out_boxes[m:] == 0)


def test_per_class_nms_classes_do_not_suppress_each_other():
    box = np.array([[0, 0, 10, 10]], np.float32)
    scores = np.array([[0.9, 0.8, 0.05]], np.float32)
    out_boxes, out_scores, out_classes, valid = per_class_nms(
        jnp.asarray(box), jnp.asarray(scores), iou_threshold=0.5, max_output=4, score_threshold=0.1
    )
    np.testing.assert_array_equal(np.asarray(out_classes), [0, 1, -1, -1])
    np.testing.assert_allclose(np.asarray(out_scores), [0.9, 0.8, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(valid), [True, True, False, False])
    np.testing.assert_array_equal(np.asarray(out_boxes)[:2], np.repeat(box, 2, 0))


def test_bad_arguments_raise():
    b = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="iou_threshold"):
        nms(b, jnp.zeros(3), iou_threshold=1.5, max_output=2)
    with pytest.raises(ValueError, match="max_output"):
        nms(b, jnp.zeros(3), iou_threshold=0.5, max_output=0)
    with pytest.raises(ValueError, match="scores"):
        nms(b, jnp.zeros(4), iou_threshold=0.5, max_output=2)
    with pytest.raises(ValueError, match="boxes must be"):
        per_class_nms(jnp.zeros((3, 2, 4)), jnp.zeros((3, 5)), iou_threshold=0.5, max_output=2)


def _np_iou(a, b):
    """IoU of two (y0, x0, y1, x1) boxes."""
    h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = h * w
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_box_voting_equals_a_numpy_weighted_mean(threshold):
    """Each kept box -> the mean of the candidates with IoU >= threshold, weighted by their score
    for the detection's class (zero scores excluded); padding keeps its box."""
    rng = np.random.default_rng(3)
    n, k = 40, 3
    centres = rng.uniform(20, 80, (6, 2))[rng.integers(0, 6, n)] + rng.normal(0, 3, (n, 2))
    sizes = rng.uniform(10, 30, (n, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
    scores = rng.uniform(0, 1, (n, k)).astype(np.float32) * (rng.uniform(size=(n, k)) < 0.7)
    kb, ks, kc, kv = per_class_nms(
        jnp.asarray(boxes), jnp.asarray(scores), iou_threshold=0.5, max_output=60
    )
    got = np.asarray(
        vote_boxes(kb, kc, kv, jnp.asarray(boxes), jnp.asarray(scores), iou_threshold=threshold)
    )
    kb, kc, kv = np.asarray(kb), np.asarray(kc), np.asarray(kv)
    assert kv.sum() >= 8 and not kv.all()  # detections and padding
    moved = 0
    for d in range(len(kb)):
        if not kv[d]:
            np.testing.assert_array_equal(got[d], kb[d])
            continue
        w = np.array(
            [scores[j, kc[d]] if _np_iou(kb[d], boxes[j]) >= threshold else 0.0 for j in range(n)]
        )
        want = (w[:, None] * boxes).sum(0) / w.sum()
        np.testing.assert_allclose(got[d], want, rtol=1e-5, atol=1e-4)
        moved += not np.allclose(want, kb[d])
    assert moved >= 3  # voting did change boxes
    # At threshold 1 only the detection's own box votes: nothing moves.
    same = vote_boxes(
        jnp.asarray(kb),
        jnp.asarray(kc),
        jnp.asarray(kv),
        jnp.asarray(boxes),
        jnp.asarray(scores),
        iou_threshold=1.0,
    )
    np.testing.assert_allclose(np.asarray(same), kb, atol=1e-4)
