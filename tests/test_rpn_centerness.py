"""The centerness RPN, proposals and optimizer settings against transcriptions of the authors' code.

The references are numpy transcriptions of the F-VLM / DITO code (google-research, fvlm/):
`ArgMaxMatcher` (fg / bg thresholds, negatives below bg, each gt's best anchor force-matched),
`LRTBBoxCoder` (centerness targets), `RpnCenterLoss` (L1 of sigmoid(objectness) on the sampled
anchors / 256), `RpnBoxIoULoss` (8 * (1 - IoU) of decoded boxes on every matched anchor / 256),
`decode_boxes_lrtb` and `multilevel_propose_rois` (per-level top-k, per-level NMS, overall top-k).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rovit_jax.config_files import load_config
from rovit_jax.detect_config import detect_defaults
from rovit_jax.detection import rcnn
from rovit_jax.detection.settings import CENTERNESS_LOSSES
from rovit_jax.ops.matching import sample_balanced
from rovit_jax.tasks.detect import rcnn_config
from rovit_jax.train.optim import make_optimizer, optim_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides):
    """The default detection config's RCNNConfig at a small canvas, with dotted `overrides`."""
    c = detect_defaults()
    base = {
        "det.image_size": 128,
        "det.min_level": 3,
        "det.max_level": 5,
        "rpn.anchor_size": 3.0,
        "rpn.aspect_ratios": (1.0,),
    }
    for key, value in {**base, **overrides}.items():
        block, leaf = key.split(".")
        c[block][leaf] = value
    return rcnn_config(c)


def _random_gt(rng, s, m, n_valid):
    boxes = np.zeros((m, 4), np.float32)
    for j in range(n_valid):
        y0, x0 = rng.uniform(0, s * 0.7, 2)
        h, w = rng.uniform(8, s * 0.6, 2)
        boxes[j] = [y0, x0, min(y0 + h, s), min(x0 + w, s)]
    return boxes, np.arange(m) < n_valid


# ---- numpy transcriptions of the authors' labeler and losses --------------------------------
def _iou_matrix(a, b):
    """IouSimilarity: [N, 4] x [M, 4] -> [N, M] (no +1 pixel convention)."""
    top = np.maximum(a[:, None, 0], b[None, :, 0])
    left = np.maximum(a[:, None, 1], b[None, :, 1])
    bottom = np.minimum(a[:, None, 2], b[None, :, 2])
    right = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.maximum(bottom - top, 0) * np.maximum(right - left, 0)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _argmax_matcher(iou_gt_by_anchor, fg, bg):
    """ArgMaxMatcher(fg, unmatched_threshold=bg, negatives_lower_than_unmatched=True,
    force_match_for_each_row=True)._match on a [M gts, N anchors] similarity matrix.

    -> match results [N]: gt index >= 0, -1 negative, -2 ignored.
    """
    sim = iou_gt_by_anchor
    if sim.shape[0] == 0:
        return -np.ones(sim.shape[1], np.int64)
    matches = np.argmax(sim, 0)
    vals = np.max(sim, 0)
    matches = np.where(vals < bg, -1, matches)
    matches = np.where((vals >= bg) & (vals < fg), -2, matches)
    force_cols = np.argmax(sim, 1)  # each gt's best anchor
    onehot = np.zeros_like(sim)
    onehot[np.arange(sim.shape[0]), force_cols] = 1
    force_rows = np.argmax(onehot, 0)
    return np.where(onehot.max(0) > 0, force_rows, matches)


def _lrtb_centerness(anchors, boxes):
    """LRTBBoxCoder._encode's center_targets (anchor-size units, EPSILON 1e-8)."""
    eps = 1e-8
    ha = anchors[:, 2] - anchors[:, 0] + eps
    wa = anchors[:, 3] - anchors[:, 1] + eps
    yc = (anchors[:, 0] + anchors[:, 2]) / 2
    xc = (anchors[:, 1] + anchors[:, 3]) / 2
    left, right = (xc - boxes[:, 1]) / wa, (boxes[:, 3] - xc) / wa
    top, bottom = (yc - boxes[:, 0]) / ha, (boxes[:, 2] - yc) / ha
    valid = np.minimum(np.minimum(left, right), np.minimum(top, bottom)) > 0
    lr = np.stack([left, right], -1) * valid[:, None]
    tb = np.stack([top, bottom], -1) * valid[:, None]
    c = np.sqrt(lr.min(-1) / (lr.max(-1) + eps) * (tb.min(-1) / (tb.max(-1) + eps)))
    return np.where(valid, c, 0.0)


def _decode_lrtb(out_ltrb, anchors):
    """decode_boxes_lrtb, the authors' (l, r, t, b) channels taken from our (l, t, r, b)."""
    left, top, right, bottom = (out_ltrb[:, k] for k in range(4))
    h, w = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    yc, xc = anchors[:, 0] + 0.5 * h, anchors[:, 1] + 0.5 * w
    return np.stack([yc - top * h, xc - left * w, yc + bottom * h, xc + right * w], -1)


def _aligned_iou(boxes, gt):
    """box_utils.bbox_overlap(..., is_aligned=True): (iou, mask)."""
    ih = np.maximum(np.minimum(boxes[:, 2], gt[:, 2]) - np.maximum(boxes[:, 0], gt[:, 0]), 0)
    iw = np.maximum(np.minimum(boxes[:, 3], gt[:, 3]) - np.maximum(boxes[:, 1], gt[:, 1]), 0)
    inter = ih * iw
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    iou = inter / (np.maximum(area(boxes) + area(gt) - inter, 0) + 1e-8)
    return iou, (iou >= 0) & (iou <= 1) & (gt.max(-1) >= 0)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_equals_the_authors_argmax_matcher(seed):
    cfg = _cfg()
    anchors = np.asarray(rcnn.anchors(cfg)[0])
    rng = np.random.default_rng(seed)
    gt, valid = _random_gt(rng, cfg.image_size, 8, 5)
    iou = _iou_matrix(anchors, gt[valid])
    for fg, bg in ((0.7, 0.3), (0.3, 0.1)):
        want = _argmax_matcher(iou.T, fg, bg)
        real = _iou_matrix(anchors, np.where(valid[:, None], gt, 1))
        iou_padded = np.where(valid[None], real, -1)
        matched, labels = jax.device_get(
            rcnn._argmax_match(jnp.asarray(iou_padded), jnp.asarray(valid), fg, bg)
        )
        np.testing.assert_array_equal(labels, np.where(want >= 0, 1, np.where(want == -1, 0, -1)))
        np.testing.assert_array_equal(matched[want >= 0], want[want >= 0])
        assert (want >= 0).sum() >= 5  # every gt forces at least its best anchor
    # Two gts sharing their best anchor k: it is forced to the FIRST of them (the authors'
    # argmax of a one-hot), even though its own best match is the second.
    k = 100
    shrunk = anchors[k] + np.array([1.0, 1.0, -1.0, -1.0]) * 2
    gt = np.stack([shrunk, anchors[k]]).astype(np.float32)
    iou = _iou_matrix(anchors, gt)
    want = _argmax_matcher(iou.T, 0.7, 0.3)
    matched, labels = jax.device_get(
        rcnn._argmax_match(jnp.asarray(iou), jnp.ones((2,), bool), 0.7, 0.3)
    )
    assert want[k] == 0 and matched[k] == 0 and labels[k] == 1
    np.testing.assert_array_equal(labels, np.where(want >= 0, 1, np.where(want == -1, 0, -1)))
    # No valid gt: every anchor is negative.
    _, labels = rcnn._argmax_match(
        jnp.full((anchors.shape[0], 3), -1.0), jnp.zeros((3,), bool), 0.7, 0.3
    )
    assert np.all(np.asarray(labels) == 0)


# Box matching at the authors' 0.7 / 0.3, and at the shapes config's 0.3 / 0.3.
@pytest.mark.parametrize("seed,box_fg", [(0, 0.7), (1, 0.7), (2, 0.3), (3, 0.3)])
def test_centerness_losses_equal_the_authors_labeler_and_losses(seed, box_fg):
    cfg = _cfg(
        **{
            "rpn.centerness_batch_per_image": 64,
            "rpn.centerness_positive_fraction": 63 / 64,
            "rpn.fg_iou": box_fg,
            "rpn.bg_iou": 0.3,
        }
    )
    anchors = np.asarray(rcnn.anchors(cfg)[0])
    n = anchors.shape[0]
    rng = np.random.default_rng(seed)
    gt, valid = _random_gt(rng, cfg.image_size, 6, 4)
    obj = rng.normal(0, 2, n).astype(np.float32)
    box = rng.uniform(0.05, 0.9, (n, 4)).astype(np.float32)
    box[rng.random(n) < 0.1, 0] *= -1  # some inverted boxes (IoU 0)
    key = jax.random.key(seed)
    obj_loss, box_loss = jax.device_get(
        rcnn.rpn_loss_single(
            key,
            jnp.asarray(obj),
            jnp.asarray(box),
            jnp.asarray(anchors),
            jnp.asarray(gt),
            jnp.asarray(valid),
            cfg,
        )
    )

    iou = _iou_matrix(anchors, gt[valid]).T
    # Objectness: the centerness labeler at 0.3 / 0.1, sampled, RpnCenterLoss.
    match = _argmax_matcher(iou, 0.3, 0.1)
    center = np.where(match >= 0, _lrtb_centerness(anchors, gt[valid][np.maximum(match, 0)]), 0)
    labels = np.where(match >= 0, 1, np.where(match == -1, 0, -1))
    # The sample is drawn by our sampler from the same key; check it keeps the authors'
    # BalancedPositiveNegativeSampler contract before using it.
    idx, ok = jax.device_get(
        sample_balanced(key, jnp.asarray(labels), num_samples=64, positive_fraction=63 / 64)
    )
    sampled = np.zeros(n, bool)
    sampled[idx[ok]] = True
    num_pos = min((labels == 1).sum(), 63)
    assert (sampled & (labels == 1)).sum() == num_pos
    assert (sampled & (labels == 0)).sum() == min((labels == 0).sum(), 64 - num_pos)
    assert not (sampled & (labels == -1)).any()
    score_targets = np.where(sampled, center, -1.0)  # ignored: -1
    mask = score_targets > -0.5
    want_obj = np.sum(np.abs(_sigmoid(obj) - np.maximum(score_targets, 0)) * mask) / 64
    assert (center[sampled] > 0).any() and (sampled & (labels == 0)).any()
    np.testing.assert_allclose(obj_loss, want_obj, rtol=1e-5)

    # Box: the labeler at box_fg / 0.3, box targets = matched gt corners, RpnBoxIoULoss.
    match = _argmax_matcher(iou, box_fg, 0.3)
    targets = np.where((match >= 0)[:, None], gt[valid][np.maximum(match, 0)], 0.0)
    pred = np.clip(_decode_lrtb(box, anchors), 0, cfg.image_size)
    overlap, iou_ok = _aligned_iou(pred, targets)
    box_mask = (targets.max(-1) != 0) & iou_ok
    want_box = 8.0 * np.sum((1 - overlap) * box_mask) / cfg.rpn.batch_per_image
    assert box_mask.sum() >= 4
    np.testing.assert_allclose(box_loss, want_box, rtol=1e-5)
    # The threshold reaches the loss: at 0.3 more anchors are trained than at 0.7.
    if box_fg < 0.7:
        assert box_mask.sum() > (_argmax_matcher(iou, 0.7, 0.3) >= 0).sum()


def test_positives_mode_ignores_background_and_all_sampled_does_not():
    cfg = _cfg()
    anchors = jnp.asarray(rcnn.anchors(cfg)[0])
    n = anchors.shape[0]
    gt, valid = _random_gt(np.random.default_rng(7), cfg.image_size, 4, 2)
    iou = _iou_matrix(np.asarray(anchors), gt[valid]).max(1)
    box = jnp.full((n, 4), 0.5)
    losses = {}
    for mode in CENTERNESS_LOSSES:
        c = _cfg(**{"rpn.centerness_loss": mode})
        for name, bg_logit in (("low", -10.0), ("high", 10.0)):
            obj = jnp.where(jnp.asarray(iou) < 0.05, bg_logit, 0.0)
            losses[mode, name] = float(
                rcnn.rpn_loss_single(
                    jax.random.key(0), obj, box, anchors, jnp.asarray(gt), jnp.asarray(valid), c
                )[0]
            )
    assert losses["positives", "low"] == pytest.approx(losses["positives", "high"])
    # Background anchors scored 1 instead of 0: up to 255 sampled negatives cost ~1 each.
    assert losses["all_sampled", "high"] > losses["all_sampled", "low"] + 0.3


def test_linear_and_log_box_codings():
    anchors = jnp.asarray([[10.0, 20.0, 50.0, 40.0]])  # h 40, w 20, centre (30, 30)
    out = jnp.asarray([[0.5, 0.25, 1.0, 0.5]])  # l, t, r, b
    lin = rcnn.decode_rpn_boxes(out, anchors, _cfg(**{"rpn.box_coding": "linear"}))
    np.testing.assert_allclose(lin, [[20.0, 20.0, 50.0, 50.0]])
    log = rcnn.decode_rpn_boxes(jnp.zeros((1, 4)), anchors, _cfg(**{"rpn.box_coding": "log"}))
    np.testing.assert_allclose(log, anchors)  # zero outputs reproduce the anchor


# ---- proposals -----------------------------------------------------------------------------
def _np_nms(boxes, scores, thr, k):
    order = [i for i in np.argsort(-scores, kind="stable") if np.isfinite(scores[i])]
    keep = []
    for i in order:
        if len(keep) == k:
            break
        if all(_iou_matrix(boxes[i : i + 1], boxes[j : j + 1])[0, 0] <= thr for j in keep):
            keep.append(i)
    return keep


def _np_proposals(obj, box, anchors, spans, cfg, pre, post, thr, per_level):
    scores = _sigmoid(obj.astype(np.float64))
    cands = []
    for _, start, n in spans:
        order = np.argsort(-scores[start : start + n], kind="stable")[: min(pre, n)] + start
        b = np.clip(_decode_lrtb(box[order], anchors[order]), 0, cfg.image_size)
        s = scores[order]
        ok = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= 1.0
        cands.append((b[ok], s[ok], n))
    if per_level:
        kept = []
        for b, s, n in cands:
            k = min(post, n)  # the authors' this_level_post_nms_top_k
            keep = list(range(min(k, len(s)))) if thr >= 1 else _np_nms(b, s, thr, k)
            kept += [(b[i], s[i]) for i in keep]
        kept.sort(key=lambda t: -t[1])
        return kept[:post]
    b = np.concatenate([c[0] for c in cands])
    s = np.concatenate([c[1] for c in cands])
    return [(b[i], s[i]) for i in _np_nms(b, s, thr, post)]


@pytest.mark.parametrize("thr,per_level", [(1.0, True), (0.3, True), (0.5, False), (1.0, False)])
def test_proposals_equal_the_authors_multilevel_propose_rois(thr, per_level):
    cfg = _cfg(**{"rpn.per_level_nms": per_level})
    anchor_np, _, spans = rcnn.anchors(cfg)
    n = anchor_np.shape[0]  # 16*16 + 8*8 + 4*4 = 336
    rng = np.random.default_rng(11)
    obj = rng.normal(0, 1.5, n).astype(np.float32)  # no float32 ties of sigmoid scores
    box = rng.uniform(0.02, 0.9, (n, 4)).astype(np.float32)
    pre, post = 40, 50
    boxes, scores, valid = jax.device_get(
        rcnn.proposals_single(
            jnp.asarray(obj),
            jnp.asarray(box),
            jnp.asarray(anchor_np),
            spans,
            cfg,
            pre_nms_top_k=pre,
            post_nms_top_k=post,
            nms_iou=thr,
        )
    )
    want = _np_proposals(obj, box, anchor_np, spans, cfg, pre, post, thr, per_level)
    assert boxes.shape == (post, 4) and valid.sum() == len(want)
    assert valid[: len(want)].all() and np.all(scores[~valid] == 0) and np.all(boxes[~valid] == 0)
    np.testing.assert_allclose(scores[: len(want)], [w[1] for w in want], rtol=1e-5)
    np.testing.assert_allclose(boxes[: len(want)], [w[0] for w in want], rtol=1e-5, atol=1e-4)
    if thr >= 1.0 and per_level:
        # Every level contributes its top min(pre, post) anchors: 40 + 40 + 16 > 50 kept.
        assert len(want) == post


def test_test_time_proposals_default_to_no_suppression_and_training_keeps_its_nms():
    cfg = _cfg()
    assert cfg.infer.proposal_nms_iou == 1.0 and cfg.rpn.nms_iou == 0.7 and cfg.rpn.per_level_nms
    n = rcnn.anchors(cfg)[0].shape[0]
    rng = np.random.default_rng(3)
    obj = jnp.asarray(rng.normal(0, 3, (1, n)), jnp.float32)
    box = jnp.asarray(rng.uniform(0.3, 0.9, (1, n, 4)), jnp.float32)
    kw = dict(pre_nms_top_k=200, post_nms_top_k=300)
    test = rcnn._batched_proposals(obj, box, cfg, **kw)
    train = rcnn._batched_proposals(obj, box, cfg, nms_iou=cfg.rpn.nms_iou, **kw)
    assert int(test[2].sum()) == 200 + 64 + 16  # nothing suppressed
    assert int(train[2].sum()) < int(test[2].sum())


# ---- optimizer --------------------------------------------------------------------------------
def _tiny_detector_params():
    from rovit_jax.tasks.detect import DetectTask

    config = load_config("shapes_detect:tiny")
    task = DetectTask.for_planning(config, config.pretrain, num_classes=4)
    shapes = jax.eval_shape(task.init_params, jax.random.key(0))
    return config, jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)


def test_weight_decay_skips_the_backbone_and_grad_scales_act_before_adam():
    config, params = _tiny_detector_params()
    optim = optim_settings(config)
    assert optim.grad_scales == ((r"^backbone/", 0.6),) and r"^backbone/" in optim.no_decay
    optim = dataclasses.replace(optim, warmup_steps=0, lr_mults=(), clip_norm=None)
    tx, _ = make_optimizer(optim, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)  # zero gradients: decay alone
    flat = {
        jax.tree_util.keystr(p): np.abs(np.asarray(u)).max()
        for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    backbone = {k: v for k, v in flat.items() if k.startswith("['backbone']")}
    kernels = {
        k: v
        for k, v in flat.items()
        if not k.startswith("['backbone']") and k.endswith("['kernel']")
    }
    assert backbone and kernels
    assert all(v == 0 for v in backbone.values())  # no decay on any backbone leaf
    assert all(v > 0 for v in kernels.values())  # the heads' kernels decay
    # The backbone gradient scale comes before Adam, which normalises it away: one step's updates
    # are those without it (scaling the updates instead would make the backbone's x0.6).
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    optim = dataclasses.replace(optim, weight_decay=0.0)
    scaled, _ = make_optimizer(optim, 10)
    plain, _ = make_optimizer(dataclasses.replace(optim, grad_scales=()), 10)
    u_scaled, _ = scaled.update(grads, scaled.init(params), params)
    u_plain, _ = plain.update(grads, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(u_scaled), jax.tree.leaves(u_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_run_configs_without_the_new_fields_keep_their_behaviour():
    from rovit_jax.detect_config import detect_defaults
    from rovit_jax.tasks import detect

    c = detect_defaults()
    new = detect.rcnn_config(c)
    modes = lambda r: (r.rpn.centerness_loss, r.rpn.box_loss, r.rpn.box_coding)  # noqa: E731
    assert modes(new) == ("all_sampled", "iou", "linear")
    assert new.rpn.per_level_nms and new.infer.proposal_nms_iou == 1.0
    assert new.rpn.box_loss_weight == 8.0 and c.det.max_instances == 300
    for key in [k for k in detect.PRE_AUTHORS_DEFAULTS if k.startswith("rpn.")] + [
        "infer.proposal_nms_iou"
    ]:
        block, leaf = key.split(".")
        del c[block][leaf]
    detect.validate_config(c, check_files=False)
    old = detect.rcnn_config(c)
    assert modes(old) == ("positives", "giou", "log")
    assert not old.rpn.per_level_nms and old.infer.proposal_nms_iou == c.rpn.nms_iou
    assert old.rpn.box_loss_weight == 1.0
