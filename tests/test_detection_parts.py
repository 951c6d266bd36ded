"""Score fusion, text classifiers and mask pasting against numpy re-derivations."""

import zlib

import numpy as np
import pytest

from rovit_jax.detection.postprocess import paste_masks, to_original_coordinates
from rovit_jax.detection.score_fusion import fuse_scores
from rovit_jax.detection.text_classifier import bucket_size, build_text_classifier, clean_name


def test_fusion_matches_geometric_formula():
    rng = np.random.default_rng(0)
    det = rng.dirichlet(np.ones(5), size=(3, 4))
    vlm = rng.dirichlet(np.ones(5), size=(3, 4))
    obj = rng.uniform(0.05, 1, size=(3, 4))
    novel = np.array([False, True, False, True, False])
    got = np.asarray(
        fuse_scores(
            det, vlm, obj, is_novel=novel, w_base=0.35, w_novel=0.65, objectness_exponent=3.0
        )
    )
    w = np.where(novel, 0.65, 0.35)
    want = det ** (1 - w) * vlm**w * obj[..., None] ** 3
    np.testing.assert_allclose(got, want, rtol=1e-5)
    no_vlm = np.asarray(fuse_scores(det, None, obj, is_novel=novel, objectness_exponent=1.0))
    np.testing.assert_allclose(no_vlm, det * obj[..., None], rtol=1e-5)
    # Zero probabilities stay finite (log-space with a floor), never NaN.
    zero = np.asarray(fuse_scores(np.zeros((2, 5)), vlm[0, :2], obj[0, :2], is_novel=novel))
    small = np.asarray(fuse_scores(np.full((2, 5), 1e-6), vlm[0, :2], obj[0, :2], is_novel=novel))
    assert np.all(np.isfinite(zero)) and np.all(zero < small)


def test_text_classifier_averages_templates_and_pads_to_bucket():
    calls = []

    def embed(texts):  # deterministic fake tower: unit vectors seeded by a stable text hash
        calls.append(list(texts))
        out = np.stack(
            [np.random.default_rng(zlib.crc32(t.encode())).normal(size=8) for t in texts]
        )
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    templates = ("a {}.", "the {} here.")
    emb, valid = build_text_classifier(["red_circle", "Blue/Star"], embed, templates=templates)
    assert emb.shape == (16, 8) and valid.tolist() == [True] * 2 + [False] * 14
    assert calls[0] == [
        "a red circle.",
        "the red circle here.",
        "a blue star.",
        "the blue star here.",
    ]
    raw = embed(calls[0]).reshape(2, 2, 8).mean(1)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    # float32 against float64: an absolute floor for components near zero.
    np.testing.assert_allclose(emb[:2], raw, rtol=1e-5, atol=1e-6)
    assert np.all(emb[2:] == 0)
    with pytest.raises(ValueError, match="empty"):
        build_text_classifier([], embed)


def test_bucket_and_name_cleaning():
    assert [bucket_size(n) for n in (1, 16, 17, 1203, 5000)] == [16, 16, 64, 2048, 8192]
    assert clean_name("Traffic_Light/(signal)") == "traffic light signal"


def test_paste_masks_matches_box_placement():
    masks = np.ones((2, 28, 28), np.float32)
    masks[1, :, 14:] = 0.0  # right half off
    boxes = np.array([[2, 3, 10, 7], [0, 0, 20, 20]], np.float32)
    out = paste_masks(masks, boxes, 16, 16)
    want0 = np.zeros((16, 16), bool)
    want0[2:10, 3:7] = True
    np.testing.assert_array_equal(out[0], want0)
    # Box 1 extends past the image: clipped; left half of the box (x < 10) is on.
    assert out[1][:, :9].all() and not out[1][:, 11:].any()


def test_original_coordinates():
    boxes = np.array([[10, 20, 300, 40]], np.float32)
    got = to_original_coordinates(boxes, 2.0, 100, 100)
    np.testing.assert_allclose(got, [[5, 10, 100, 20]])


@pytest.mark.parametrize("loss", ["l1", "giou"])
def test_roi_box_loss_terms_match_torchvision(loss):
    """`roi.box_loss`: L1 of the weighted deltas, or torchvision's GIoU loss of the decoded box
    against its matched gt (yxyx here, xyxy there)."""
    import dataclasses

    import jax.numpy as jnp
    import torch
    from torchvision.ops import generalized_box_iou_loss

    from rovit_jax.detect_config import detect_defaults
    from rovit_jax.detection import rcnn
    from rovit_jax.ops import boxes as box_ops
    from rovit_jax.tasks.detect import rcnn_config

    cfg = rcnn_config(detect_defaults())
    cfg = dataclasses.replace(cfg, roi=dataclasses.replace(cfg.roi, box_loss=loss))
    rng = np.random.default_rng(4)
    b, r, m = 2, 6, 3
    y0x0 = rng.uniform(0, 200, (b, m, 2))
    gt = np.concatenate([y0x0, y0x0 + rng.uniform(10, 80, (b, m, 2))], -1).astype(np.float32)
    gt_index = rng.integers(0, m, (b, r))
    matched = np.take_along_axis(gt, gt_index[..., None], axis=1)
    rois = (matched + rng.normal(0, 6, matched.shape)).astype(np.float32)
    rois[..., 2:] = np.maximum(rois[..., 2:], rois[..., :2] + 4)
    deltas = rng.normal(0, 1.5, (b, r, 4)).astype(np.float32)
    targets = np.asarray(box_ops.encode_deltas(matched, rois, weights=rcnn.BOX_WEIGHTS))
    samples = dict(rois=jnp.asarray(rois), gt_index=jnp.asarray(gt_index), box_targets=targets)
    got = np.asarray(rcnn.roi_box_loss_terms(jnp.asarray(deltas), samples, jnp.asarray(gt), cfg))
    if loss == "l1":
        want = np.abs(deltas - targets).sum(-1)
    else:
        # The decoded box, re-derived: centre shift (dy/10, dx/10) of the RoI's size, log-size
        # change (dh/5, dw/5).
        h, w = rois[..., 2] - rois[..., 0], rois[..., 3] - rois[..., 1]
        cy, cx = (
            rois[..., 0] + h / 2 + deltas[..., 0] / 10 * h,
            rois[..., 1] + w / 2 + deltas[..., 1] / 10 * w,
        )
        ph, pw = h * np.exp(deltas[..., 2] / 5), w * np.exp(deltas[..., 3] / 5)
        pred = np.stack([cy - ph / 2, cx - pw / 2, cy + ph / 2, cx + pw / 2], -1)
        xyxy = lambda a: torch.from_numpy(a[..., [1, 0, 3, 2]].reshape(-1, 4).astype(np.float64))  # noqa: E731
        want = generalized_box_iou_loss(xyxy(pred), xyxy(matched)).numpy().reshape(b, r)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cascade_relabel_matches_torchvision_iou_and_the_stage_weights():
    """A later cascade stage's labels and targets (`rcnn.relabel_rois_single`) against
    torchvision's box_iou and the delta encoding written out with that stage's weights."""
    import jax.numpy as jnp
    import torch
    from torchvision.ops import box_iou

    from rovit_jax.detection import rcnn

    rng = np.random.default_rng(7)
    r, m, fg_iou = 40, 5, 0.6
    y0x0 = rng.uniform(0, 150, (m, 2))
    gt = np.concatenate([y0x0, y0x0 + rng.uniform(20, 90, (m, 2))], -1).astype(np.float32)
    valid = np.array([True, True, True, False, True])
    classes = np.array([3, 0, 7, 5, 2], np.int32)
    near = gt[rng.integers(0, m, r)]
    rois = (near + rng.normal(0, 8, near.shape)).astype(np.float32)
    rois[..., 2:] = np.maximum(rois[..., 2:], rois[..., :2] + 4)
    weights = rcnn.stage_box_weights(1)
    assert weights == (20.0, 20.0, 10.0, 10.0)  # Cascade R-CNN's second stage
    got = {
        k: np.asarray(v)
        for k, v in rcnn.relabel_rois_single(
            jnp.asarray(rois),
            jnp.asarray(gt),
            jnp.asarray(classes),
            jnp.asarray(valid),
            fg_iou,
            weights,
        ).items()
    }

    xyxy = lambda a: torch.from_numpy(a[:, [1, 0, 3, 2]].astype(np.float64))  # noqa: E731
    iou = box_iou(xyxy(rois), xyxy(gt)).numpy()
    iou[:, ~valid] = -1.0  # padding gt boxes are never matched
    best = iou.argmax(1)
    fg = iou.max(1) >= fg_iou
    assert 0 < fg.sum() < r  # both kinds present
    np.testing.assert_array_equal(got["fg"], fg)
    np.testing.assert_array_equal(got["gt_index"][fg], best[fg])
    np.testing.assert_array_equal(got["classes"], np.where(fg, classes[best] + 1, 0))
    g = gt[best]
    h, w = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    gh, gw = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    want = np.stack(
        [
            20 * ((g[:, 0] + gh / 2) - (rois[:, 0] + h / 2)) / h,
            20 * ((g[:, 1] + gw / 2) - (rois[:, 1] + w / 2)) / w,
            10 * np.log(gh / h),
            10 * np.log(gw / w),
        ],
        -1,
    )
    np.testing.assert_allclose(got["box_targets"], np.where(fg[:, None], want, 0), atol=1e-4)
