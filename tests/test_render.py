"""Tests for the detections picture: one label per object, confident detections only."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from rovit_jax.detection.render import one_label_per_object, render_detection_grid


def _random_boxes(rng, n, size=100.0):
    yx = rng.uniform(0, size * 0.8, (n, 2))
    hw = rng.uniform(5, size * 0.4, (n, 2))
    return np.concatenate([yx, yx + hw], axis=1)


@pytest.mark.parametrize("seed", range(5))
def test_one_label_per_object_is_class_agnostic_nms_above_the_score_bar(seed):
    rng = np.random.default_rng(seed)
    boxes = _random_boxes(rng, 40)
    scores = rng.uniform(0, 1, 40)
    keep = one_label_per_object(boxes, scores, min_score=0.3, iou_threshold=0.5)
    # Reference: torchvision's NMS (xyxy) over the detections scoring >= 0.3, whatever the class.
    sel = np.flatnonzero(scores >= 0.3)
    ref = torchvision.ops.nms(
        torch.as_tensor(boxes[sel][:, [1, 0, 3, 2]]), torch.as_tensor(scores[sel]), 0.5
    ).numpy()
    np.testing.assert_array_equal(keep, sel[ref])
    assert np.all(scores[keep] >= 0.3)


def test_same_label_boxes_inside_a_kept_one_are_dropped_other_labels_kept():
    # A frame's whole box, two partial boxes of it (same label, IoU < 0.5 but inside it), and
    # another object in the frame's hole (another label).
    boxes = np.array(
        [[0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100.0, 30.0], [60, 0, 100, 100], [40, 40, 60, 60]]
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([3, 3, 3, 5])
    # IoU with the whole box: 0.3, 0.4, 0.04, so class-agnostic NMS alone keeps all four.
    np.testing.assert_array_equal(one_label_per_object(boxes, scores, 0.3), [0, 1, 2, 3])
    np.testing.assert_array_equal(one_label_per_object(boxes, scores, 0.3, labels=labels), [0, 3])
    # Partly inside (half of the smaller box) stays, at the 0.7 containment bar.
    half = np.array([[0.0, 0.0, 100.0, 100.0], [50.0, 80.0, 90.0, 120.0]])
    keep = one_label_per_object(half, np.array([0.9, 0.8]), 0.3, labels=np.array([1, 1]))
    np.testing.assert_array_equal(keep, [0, 1])


def test_detection_grid_tiles_the_panels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    boxes = np.array([[4.0, 4.0, 30.0, 30.0], [5.0, 5.0, 30.0, 31.0], [40.0, 40.0, 60.0, 60.0]])
    panel = (image, boxes, np.array([0.9, 0.8, 0.1]), np.array([0, 1, 2]))
    path = tmp_path / "grid.png"
    render_detection_grid([panel] * 3, ["star", "arrow", "fish*"], str(path), panel_side=128)
    im = Image.open(path)
    # Two columns, two rows of 128 px panels with an 8 px gap.
    assert im.size == (2 * 128 + 8, 2 * 128 + 8)
    with pytest.raises(ValueError, match="at least one panel"):
        render_detection_grid([], ["star"], str(path))
