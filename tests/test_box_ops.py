"""Tests for rovit_jax.ops.boxes against torchvision and numpy re-derivations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from rovit_jax.ops.boxes import (
    batched_box_iou,
    box_area,
    box_iou,
    centerness,
    clip_boxes,
    decode_deltas,
    decode_ltrb,
    encode_deltas,
    encode_ltrb,
    generalized_box_iou,
    paired_giou,
    paired_iou,
    shrink_boxes,
    valid_box_mask,
    xywh_to_yxyx,
    yxyx_to_xywh,
)


def random_boxes(rs: np.random.RandomState, n: int, span: float = 100.0) -> np.ndarray:
    """[n, 4] float32 (y0, x0, y1, x1) with positive sides."""
    lo = rs.uniform(0.0, span, size=(n, 2))
    size = rs.uniform(1.0, span / 2, size=(n, 2))
    return np.concatenate([lo, lo + size], axis=1).astype(np.float32)


def to_xyxy(boxes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(boxes[..., [1, 0, 3, 2]]))


def test_box_area_matches_torchvision_and_clamps_degenerate():
    rs = np.random.RandomState(0)
    boxes = random_boxes(rs, 20)
    np.testing.assert_allclose(
        box_area(jnp.asarray(boxes)), torchvision.ops.box_area(to_xyxy(boxes)).numpy(), rtol=1e-6
    )
    inverted = np.array([[5.0, 5.0, 2.0, 9.0], [0.0, 0.0, 0.0, 3.0]], np.float32)
    np.testing.assert_array_equal(box_area(jnp.asarray(inverted)), [0.0, 0.0])


def test_box_iou_and_giou_match_torchvision():
    rs = np.random.RandomState(1)
    a, b = random_boxes(rs, 17), random_boxes(rs, 23)
    # Include an identical pair and a disjoint pair so both extremes are covered.
    b[0] = a[0]
    b[1] = [500.0, 500.0, 510.0, 520.0]
    iou = box_iou(jnp.asarray(a), jnp.asarray(b))
    giou = generalized_box_iou(jnp.asarray(a), jnp.asarray(b))
    ref_iou = torchvision.ops.box_iou(to_xyxy(a), to_xyxy(b)).numpy()
    ref_giou = torchvision.ops.generalized_box_iou(to_xyxy(a), to_xyxy(b)).numpy()
    assert iou.shape == (17, 23) and giou.shape == (17, 23)
    np.testing.assert_allclose(iou, ref_iou, atol=1e-6)
    np.testing.assert_allclose(giou, ref_giou, atol=1e-6)
    assert float(iou[0, 0]) == pytest.approx(1.0)
    assert np.all(np.asarray(giou[:, 1]) < 0)


def test_batched_and_paired_forms_agree_with_torchvision():
    rs = np.random.RandomState(2)
    a = np.stack([random_boxes(rs, 6) for _ in range(3)])
    b = np.stack([random_boxes(rs, 4) for _ in range(3)])
    batched = np.asarray(batched_box_iou(jnp.asarray(a), jnp.asarray(b)))
    for i in range(3):
        ref = torchvision.ops.box_iou(to_xyxy(a[i]), to_xyxy(b[i])).numpy()
        np.testing.assert_allclose(batched[i], ref, atol=1e-6)
    c = random_boxes(rs, 6)
    d = random_boxes(rs, 6)
    ref_iou = np.diag(torchvision.ops.box_iou(to_xyxy(c), to_xyxy(d)).numpy())
    ref_giou = np.diag(torchvision.ops.generalized_box_iou(to_xyxy(c), to_xyxy(d)).numpy())
    np.testing.assert_allclose(paired_iou(jnp.asarray(c), jnp.asarray(d)), ref_iou, atol=1e-6)
    np.testing.assert_allclose(paired_giou(jnp.asarray(c), jnp.asarray(d)), ref_giou, atol=1e-6)


def test_degenerate_boxes_give_zero_iou_without_nan():
    zero = jnp.zeros((3, 4))
    a = jnp.asarray(random_boxes(np.random.RandomState(3), 2))
    iou = box_iou(zero, jnp.concatenate([zero, a]))
    giou = generalized_box_iou(zero, zero)
    assert np.all(np.isfinite(iou)) and np.all(np.isfinite(giou))
    np.testing.assert_array_equal(iou, 0.0)
    np.testing.assert_array_equal(giou, 0.0)
    grad = jax.grad(lambda z: jnp.sum(paired_giou(z, z) + paired_iou(z, a[:1])))(zero)
    assert np.all(np.isfinite(grad))


def test_delta_coder_round_trip_and_formula():
    rs = np.random.RandomState(4)
    boxes, anchors = random_boxes(rs, 50), random_boxes(rs, 50)
    deltas = encode_deltas(jnp.asarray(boxes), jnp.asarray(anchors))
    # numpy re-derivation of the Faster R-CNN parameterisation, weights (10, 10, 5, 5).
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ha, wa = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cy, cx = boxes[:, 0] + h / 2, boxes[:, 1] + w / 2
    cya, cxa = anchors[:, 0] + ha / 2, anchors[:, 1] + wa / 2
    ref = np.stack(
        [10 * (cy - cya) / ha, 10 * (cx - cxa) / wa, 5 * np.log(h / ha), 5 * np.log(w / wa)], -1
    )
    np.testing.assert_allclose(deltas, ref, rtol=1e-5, atol=1e-5)
    decoded = decode_deltas(deltas, jnp.asarray(anchors))
    np.testing.assert_allclose(decoded, boxes, rtol=1e-5, atol=1e-3)
    custom = (1.0, 2.0, 3.0, 4.0)
    back = decode_deltas(encode_deltas(boxes, anchors, custom), anchors, custom)
    np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=1e-3)


def test_decode_deltas_clips_scale_and_encode_is_finite_on_padding():
    anchors = jnp.asarray([[0.0, 0.0, 16.0, 16.0]])
    huge = jnp.asarray([[0.0, 0.0, 1e4, 1e4]])
    out = decode_deltas(huge, anchors)
    side = 16.0 * math.exp(math.log(1000.0 / 16.0))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], side, rtol=1e-4)
    assert np.all(np.isfinite(encode_deltas(jnp.zeros((1, 4)), anchors)))


def test_ltrb_coder_round_trip_with_stride():
    rs = np.random.RandomState(5)
    boxes = random_boxes(rs, 30)
    points = rs.uniform(0, 150, size=(30, 2)).astype(np.float32)
    stride = rs.choice([4.0, 8.0, 16.0], size=30).astype(np.float32)
    dist = encode_ltrb(jnp.asarray(boxes), jnp.asarray(points), stride)
    y, x = points[:, 0], points[:, 1]
    ref = np.stack([x - boxes[:, 1], y - boxes[:, 0], boxes[:, 3] - x, boxes[:, 2] - y], -1)
    np.testing.assert_allclose(dist, ref / stride[:, None], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode_ltrb(dist, jnp.asarray(points), stride), boxes, atol=1e-4)
    plain = encode_ltrb(jnp.asarray(boxes), jnp.asarray(points))
    np.testing.assert_allclose(decode_ltrb(plain, jnp.asarray(points)), boxes, atol=1e-4)
    np.testing.assert_allclose(encode_ltrb(boxes, points, 8.0), ref / 8.0, rtol=1e-5, atol=1e-5)


def np_centerness(ltrb: np.ndarray) -> np.ndarray:
    out = np.zeros(ltrb.shape[0])
    for i, (left, top, right, bottom) in enumerate(ltrb.astype(np.float64)):
        if min(left, top, right, bottom) <= 0:
            continue
        ratio = min(left, right) / max(left, right) * min(top, bottom) / max(top, bottom)
        out[i] = math.sqrt(ratio)
    return out


def test_centerness_matches_numpy_inside_and_outside():
    rs = np.random.RandomState(6)
    boxes = random_boxes(rs, 200, span=50.0)
    # Points drawn over a region 1.5x each box about its centre: about half fall inside.
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2
    points = (centre + rs.uniform(-1.5, 1.5, size=(200, 2)) * half).astype(np.float32)
    ltrb = np.asarray(encode_ltrb(jnp.asarray(boxes), jnp.asarray(points)))
    inside = np.all(ltrb > 0, axis=1)
    assert 10 < inside.sum() < 190  # both cases exercised
    got = np.asarray(centerness(jnp.asarray(ltrb)))
    np.testing.assert_allclose(got, np_centerness(ltrb), rtol=1e-5, atol=1e-6)
    assert np.all(got[~inside] == 0)
    # The centre of a box has centerness 1; on an edge it is 0.
    box = jnp.asarray([[10.0, 20.0, 30.0, 60.0]])
    edge_centre = jnp.asarray([[20.0, 40.0], [10.0, 40.0]])
    np.testing.assert_allclose(centerness(encode_ltrb(box, edge_centre)), [1.0, 0.0], atol=1e-6)
    grad = jax.grad(lambda d: jnp.sum(centerness(d)))(jnp.asarray(ltrb))
    assert np.all(np.isfinite(grad))


def test_clip_shrink_valid_and_conversions():
    boxes = jnp.asarray([[-5.0, 10.0, 50.0, 120.0], [10.0, 20.0, 30.0, 60.0]])
    np.testing.assert_array_equal(
        clip_boxes(boxes, 40, 100), [[0.0, 10.0, 40.0, 100.0], [10.0, 20.0, 30.0, 60.0]]
    )
    batched = jnp.stack([boxes, boxes])
    clipped = clip_boxes(batched, jnp.asarray([[40.0], [25.0]]), jnp.asarray([[100.0], [50.0]]))
    np.testing.assert_array_equal(clipped[1, 1], [10.0, 20.0, 25.0, 50.0])

    shrunk = np.asarray(shrink_boxes(boxes, 0.7))
    np.testing.assert_allclose(shrunk[1], [13.0, 26.0, 27.0, 54.0], atol=1e-5)
    orig = np.asarray(boxes)
    np.testing.assert_allclose(
        (shrunk[:, :2] + shrunk[:, 2:]) / 2, (orig[:, :2] + orig[:, 2:]) / 2, atol=1e-5
    )
    np.testing.assert_allclose(box_area(shrunk), 0.49 * box_area(orig), rtol=1e-5)

    cases = jnp.asarray(
        [
            [0.0, 0.0, 1.0, 1.0],
            [0.0, 0.0, 0.0, 1.0],
            [2.0, 0.0, 1.0, 1.0],
            [0.0, np.nan, 1.0, 1.0],
            [0.0, 0.0, np.inf, 1.0],
        ]
    )
    np.testing.assert_array_equal(valid_box_mask(cases), [True, False, False, False, False])

    xywh = np.asarray(yxyx_to_xywh(boxes))
    np.testing.assert_array_equal(xywh[1], [20.0, 10.0, 40.0, 20.0])
    ref = torchvision.ops.box_convert(to_xyxy(np.asarray(boxes)), "xyxy", "xywh").numpy()
    np.testing.assert_allclose(xywh, ref)
    np.testing.assert_array_equal(xywh_to_yxyx(jnp.asarray(xywh)), boxes)


def test_jit_and_bad_input():
    rs = np.random.RandomState(7)
    a, b = jnp.asarray(random_boxes(rs, 5)), jnp.asarray(random_boxes(rs, 3))
    # Fused (jit) and op-by-op evaluation may round differently in the last bit.
    np.testing.assert_allclose(jax.jit(box_iou)(a, b), box_iou(a, b), rtol=1e-6)
    giou = generalized_box_iou(a, b)
    np.testing.assert_allclose(jax.jit(generalized_box_iou)(a, b), giou, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="a must be"):
        box_iou(jnp.zeros((3, 5)), b)
    with pytest.raises(ValueError, match="weights"):
        encode_deltas(a, a, weights=(1.0, 1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="points"):
        encode_ltrb(a, jnp.zeros((5, 3)))


def test_huge_and_infinite_coordinates_stay_in_range():
    inf = np.inf
    a = jnp.array([[0.0, 0.0, 1e30, 1e30], [-inf, -inf, inf, inf], [0.0, 0.0, 2.0, 2.0]])
    iou = np.asarray(box_iou(a, a))
    giou = np.asarray(generalized_box_iou(a, a))
    assert np.isfinite(iou).all() and np.isfinite(giou).all()
    np.testing.assert_allclose(np.diag(iou), 1.0)  # every box overlaps itself fully
    assert (iou >= 0).all() and (iou <= 1).all() and (giou >= -1).all() and (giou <= 1).all()
    # A 2x2 box inside an enormous one: IoU ~ 0 and GIoU ~ 0 - (E - U) / E ~ 0.
    assert iou[0, 2] < 1e-20 and abs(giou[0, 2]) < 1e-6
