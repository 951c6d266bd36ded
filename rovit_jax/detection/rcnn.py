"""Mask R-CNN training targets, losses and inference around `OpenVocabDetector`.

Every function works on fixed shapes: per-image work is vmapped over the batch, variable
numbers of boxes are padded and carried with validity masks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rovit_jax.detection.score_fusion import (
    fuse_scores,
    fuse_scores_with_background,
)
from rovit_jax.detection.settings import (
    InferSettings,
    RoISettings,
    RPNSettings,
)
from rovit_jax.ops import boxes as box_ops
from rovit_jax.ops.anchors import anchor_grid
from rovit_jax.ops.matching import match_boxes, sample_balanced
from rovit_jax.ops.nms import nms, per_class_nms, vote_boxes
from rovit_jax.ops.roi_align import batched_roi_align, multilevel_roi_align

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def stage_box_weights(stage: int) -> tuple[float, ...]:
    """Delta weights of box-head stage `stage` (0-based): (stage + 1) x BOX_WEIGHTS, Cascade
    R-CNN's (10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15): a later stage's boxes are
    closer to their objects, so its deltas are scaled up to about the first stage's spread."""
    return tuple((stage + 1) * w for w in BOX_WEIGHTS)


def num_box_stages(cfg: RCNNConfig) -> int:
    """Box-head stages: 1 + len(roi.cascade_ious)."""
    return 1 + len(cfg.roi.cascade_ious)


@dataclasses.dataclass(frozen=True)
class RCNNConfig:
    """Static settings of targets, sampling and inference: the pyramid's geometry and the typed
    `rpn`, `roi` and `infer` sections (detection.settings, where their defaults and checks live).

    Built from a detection config by `tasks.detect.rcnn_config`; hashable, so jitted functions
    take it as a static argument.
    """

    image_size: int
    min_level: int
    max_level: int
    rpn: RPNSettings
    roi: RoISettings
    infer: InferSettings


@functools.lru_cache(maxsize=16)
def anchors(cfg: RCNNConfig) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Flattened anchors [N, 4] (pixels), their level stride [N], and per-level (level, start, n).

    Constants of the configuration: computed once, eagerly, even when first called in a trace.
    """
    with jax.ensure_compile_time_eval():
        grid = anchor_grid(
            (cfg.image_size, cfg.image_size),
            min_level=cfg.min_level,
            max_level=cfg.max_level,
            aspect_ratios=cfg.rpn.aspect_ratios,
            anchor_size=cfg.rpn.anchor_size,
        )
    flat, strides, spans, start = [], [], [], 0
    for level in range(cfg.min_level, cfg.max_level + 1):
        a = np.asarray(grid[level], np.float32).reshape(-1, 4)
        flat.append(a)
        strides.append(np.full((a.shape[0],), 2.0**level, np.float32))
        spans.append((level, start, a.shape[0]))
        start += a.shape[0]
    return np.concatenate(flat), np.concatenate(strides), spans


def flatten_rpn(rpn_out: dict[int, tuple[jax.Array, jax.Array]], cfg: RCNNConfig):
    """{level: ([B,H,W,A], [B,H,W,A,4])} -> objectness [B, N], box [B, N, 4] in anchor order."""
    obj, box = [], []
    for level in range(cfg.min_level, cfg.max_level + 1):
        o, b = rpn_out[level]
        obj.append(o.reshape(o.shape[0], -1))
        box.append(b.reshape(b.shape[0], -1, 4))
    return jnp.concatenate(obj, 1), jnp.concatenate(box, 1)


def decode_rpn_boxes(box: jax.Array, anchor_boxes: jax.Array, cfg: RCNNConfig) -> jax.Array:
    """RPN box outputs [..., N, 4] -> pixel boxes [..., N, 4].

    binary: Faster R-CNN deltas. centerness: (l, t, r, b) distances from the anchor centre,
    by `cfg.rpn.box_coding`:
      linear (the authors' LTRB coder, `decode_boxes_lrtb`): the raw outputs in units of the
        anchor's width (l, r) and height (t, b), linear in the anchor size; 0 is a point box.
      log: log-multiples of the anchor's half sizes, so a zero output reproduces the anchor.
    The channel order is (l, t, r, b) (the authors' is (l, r, t, b): only the layout differs).
    """
    if cfg.rpn.objectness == "binary":
        return box_ops.decode_deltas(box, anchor_boxes, weights=(1.0, 1.0, 1.0, 1.0))
    cy = (anchor_boxes[..., 0] + anchor_boxes[..., 2]) / 2
    cx = (anchor_boxes[..., 1] + anchor_boxes[..., 3]) / 2
    h = anchor_boxes[..., 2] - anchor_boxes[..., 0]
    w = anchor_boxes[..., 3] - anchor_boxes[..., 1]
    if cfg.rpn.box_coding == "linear":
        d = box
    else:
        d = 0.5 * jnp.exp(jnp.clip(box, -8.0, math.log(1000.0 / 16)))
    left, top, right, bottom = d[..., 0] * w, d[..., 1] * h, d[..., 2] * w, d[..., 3] * h
    return jnp.stack([cy - top, cx - left, cy + bottom, cx + right], axis=-1)


def _centerness_target(anchor_boxes: jax.Array, gt: jax.Array) -> jax.Array:
    """Centerness of each anchor centre inside its matched gt box: [N, 4], [N, 4] -> [N].

    sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of the centre's distances to the box
    sides; 0 unless the centre is strictly inside (the authors' `LRTBBoxCoder._encode`).
    """
    cy = (anchor_boxes[:, 0] + anchor_boxes[:, 2]) / 2
    cx = (anchor_boxes[:, 1] + anchor_boxes[:, 3]) / 2
    ltrb = jnp.stack([cx - gt[:, 1], cy - gt[:, 0], gt[:, 3] - cx, gt[:, 2] - cy], -1)
    return box_ops.centerness(ltrb)


def _argmax_match(
    iou: jax.Array, gt_valid: jax.Array, fg_iou: float, bg_iou: float
) -> tuple[jax.Array, jax.Array]:
    """The authors' anchor matcher (`ArgMaxMatcher`, negatives below `bg_iou`, forced matches).

    Each anchor takes its highest-IoU valid gt: IoU >= fg_iou -> positive (1), < bg_iou ->
    negative (0), else ignored (-1). Then every valid gt's best anchor (the first one on ties)
    becomes positive and is matched to THAT gt (torchvision/Detectron2 instead keep the
    anchor's own best gt and include ties). Deviation: a gt whose best IoU is 0 forces no match
    (the authors' would match anchor 0).

    iou [N, M], gt_valid [M] -> (matched gt index [N], labels [N] in {1, 0, -1}).
    """
    n, m = iou.shape
    quality = jnp.where(gt_valid[None, :], iou, -1.0)
    matched = jnp.argmax(quality, axis=1).astype(jnp.int32)
    best = jnp.max(quality, axis=1)
    labels = jnp.where(best >= fg_iou, 1, jnp.where(best < bg_iou, 0, -1)).astype(jnp.int32)
    forcing = gt_valid & (jnp.max(quality, axis=0) > 0)  # [M]
    best_anchor = jnp.where(forcing, jnp.argmax(quality, axis=0), n)  # n: dropped
    # The lowest-index gt forcing each anchor (m: none), as the authors' argmax of a one-hot.
    forced_by = (
        jnp.full((n,), m, jnp.int32)
        .at[best_anchor]
        .min(jnp.arange(m, dtype=jnp.int32), mode="drop")
    )
    is_forced = forced_by < m
    return jnp.where(is_forced, forced_by, matched), jnp.where(is_forced, 1, labels)


def rpn_loss_single(
    rng: jax.Array,
    obj: jax.Array,
    box: jax.Array,
    anchor_boxes: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    cfg: RCNNConfig,
) -> tuple[jax.Array, jax.Array]:
    """One image's RPN losses: (objectness loss, box loss).

    obj [N], box [N, 4], anchor_boxes [N, 4], gt_boxes [M, 4], gt_valid [M].

    binary: BCE of sampled anchors (rpn.fg_iou / bg_iou, batch_per_image, positive_fraction)
    and smooth-L1 deltas on the sampled positives, both divided by batch_per_image.

    centerness, `cfg.rpn.centerness_loss`:
      all_sampled (the authors' `RpnAnchorCenternessLabeler` + `RpnCenterLoss` +
        `RpnBoxIoULoss`): objectness targets from a second matching at centerness_fg_iou /
        centerness_bg_iou (0.3 / 0.1): positives get the centerness of the anchor centre in
        their gt (0 when outside), negatives 0, in-between anchors are ignored; a balanced
        sample of centerness_batch_per_image anchors (at most the positive fraction, 255/256,
        positives; negatives fill the rest) is regressed with L1 on sigmoid(objectness), the
        sum divided by centerness_batch_per_image. Box loss: every anchor matched at
        rpn.fg_iou / bg_iou (0.7 / 0.3, plus each gt's best anchor), unsampled,
        rpn_box_loss_weight * sum(1 - IoU) (or GIoU) of the decoded, clipped box with its gt,
        divided by rpn.batch_per_image.
      positives: objectness regressed to centerness on the sampled positives only (so
        unlabelled, possibly novel objects are never pushed towards "background"; background
        is then never ranked down), and the box loss on the same positives, both divided by
        the number of positives.
    """
    iou = box_ops.box_iou(anchor_boxes, gt_boxes)
    iou = jnp.where(gt_valid[None, :], iou, -1.0)
    if cfg.rpn.objectness == "centerness" and cfg.rpn.centerness_loss == "all_sampled":
        # Objectness: centerness targets on a balanced sample of the 0.3 / 0.1 matching.
        c_matched, c_labels = _argmax_match(
            iou, gt_valid, cfg.rpn.centerness_fg_iou, cfg.rpn.centerness_bg_iou
        )
        idx, valid = sample_balanced(
            rng,
            c_labels,
            num_samples=cfg.rpn.centerness_batch_per_image,
            positive_fraction=cfg.rpn.centerness_positive_fraction,
        )
        idx = jnp.maximum(idx, 0)
        target_q = jnp.where(
            c_labels[idx] == 1,
            _centerness_target(anchor_boxes[idx], gt_boxes[c_matched[idx]]),
            0.0,
        )
        quality = jax.nn.sigmoid(obj[idx])
        l1 = jnp.where(valid, jnp.abs(quality - target_q), 0.0)
        obj_loss = jnp.sum(l1) / float(cfg.rpn.centerness_batch_per_image)
        # Box: every anchor matched at rpn.fg_iou / bg_iou, unsampled.
        b_matched, b_labels = _argmax_match(iou, gt_valid, cfg.rpn.fg_iou, cfg.rpn.bg_iou)
        pred = box_ops.clip_boxes(
            decode_rpn_boxes(box, anchor_boxes, cfg), cfg.image_size, cfg.image_size
        )
        overlap = box_ops.paired_iou if cfg.rpn.box_loss == "iou" else box_ops.paired_giou
        per_anchor = 1.0 - overlap(pred, gt_boxes[b_matched])
        box_loss = (
            cfg.rpn.box_loss_weight
            * jnp.sum(jnp.where(b_labels == 1, per_anchor, 0.0))
            / float(cfg.rpn.batch_per_image)
        )
        return obj_loss, box_loss

    matched, labels = match_boxes(
        iou, gt_valid, fg_threshold=cfg.rpn.fg_iou, bg_threshold=cfg.rpn.bg_iou
    )
    idx, valid = sample_balanced(
        rng,
        labels,
        num_samples=cfg.rpn.batch_per_image,
        positive_fraction=cfg.rpn.positive_fraction,
    )
    lab = jnp.where(valid, labels[idx], -1)
    pos = lab == 1
    norm = float(cfg.rpn.batch_per_image)
    target_box = gt_boxes[matched[idx]]
    a = anchor_boxes[idx]
    if cfg.rpn.objectness == "binary":
        logits = obj[idx]
        bce = jnp.maximum(logits, 0) - logits * pos + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        obj_loss = jnp.sum(jnp.where(lab >= 0, bce, 0.0)) / norm
        target = box_ops.encode_deltas(target_box, a, weights=(1.0, 1.0, 1.0, 1.0))
        l1 = jnp.sum(_smooth_l1(box[idx] - target, 1.0 / 9), -1)
        box_loss = jnp.sum(jnp.where(pos, l1, 0.0)) / norm
    else:
        quality = jax.nn.sigmoid(obj[idx])
        target_q = _centerness_target(a, target_box)
        num_pos = jnp.maximum(jnp.sum(pos), 1.0)
        obj_loss = jnp.sum(jnp.where(pos, jnp.abs(quality - target_q), 0.0)) / num_pos
        pred = decode_rpn_boxes(box[idx], a, cfg)
        overlap = box_ops.paired_iou if cfg.rpn.box_loss == "iou" else box_ops.paired_giou
        box_loss = (
            cfg.rpn.box_loss_weight
            * jnp.sum(jnp.where(pos, 1.0 - overlap(pred, target_box), 0.0))
            / num_pos
        )
    return obj_loss, box_loss


def _pool(features: dict[int, jax.Array], boxes: jax.Array, size: int, cfg: RCNNConfig):
    """Multilevel RoIAlign of [B, N, 4] boxes -> [B, N, size, size, C]."""
    return multilevel_roi_align(
        features, boxes, output_size=size, min_level=cfg.min_level, max_level=cfg.max_level
    )


def _batched_proposals(
    obj,
    box,
    cfg: RCNNConfig,
    *,
    pre_nms_top_k: int,
    post_nms_top_k: int,
    nms_iou: float | None = None,
):
    """`proposals_single` over the batch: -> boxes [B, P, 4], objectness [B, P], valid [B, P].

    nms_iou: the proposal NMS threshold; None = the test-time `cfg.infer.proposal_nms_iou`
    (training passes `cfg.rpn.nms_iou`).
    """
    anchor_np, _, spans = anchors(cfg)
    anchor_boxes = jnp.asarray(anchor_np)
    iou = cfg.infer.proposal_nms_iou if nms_iou is None else nms_iou
    return jax.vmap(
        lambda o, bx: proposals_single(
            o,
            bx,
            anchor_boxes,
            spans,
            cfg,
            pre_nms_top_k=pre_nms_top_k,
            post_nms_top_k=post_nms_top_k,
            nms_iou=iou,
        )
    )(obj, box)


def _smooth_l1(x: jax.Array, beta: float) -> jax.Array:
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def _top_scored(
    boxes: jax.Array, scores: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The k highest scores (-inf = not a candidate), padded to k: -> boxes, scores, valid."""
    m = min(k, scores.shape[0])
    s, i = jax.lax.top_k(scores, m)
    valid = s > -jnp.inf
    boxes, s = jnp.where(valid[:, None], boxes[i], 0.0), jnp.where(valid, s, -jnp.inf)
    if m < k:
        boxes = jnp.concatenate([boxes, jnp.zeros((k - m, 4), boxes.dtype)])
        s = jnp.concatenate([s, jnp.full((k - m,), -jnp.inf, s.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros((k - m,), bool)])
    return boxes, s, valid


def _suppressed(boxes: jax.Array, scores: jax.Array, iou: float, k: int):
    """NMS at `iou` keeping at most k (iou >= 1: no suppression): -> boxes, scores, valid [k]."""
    if iou >= 1.0:
        return _top_scored(boxes, scores, k)
    keep, keep_valid = nms(boxes, scores, iou_threshold=iou, max_output=k)
    keep = jnp.maximum(keep, 0)
    return boxes[keep], jnp.where(keep_valid, scores[keep], -jnp.inf), keep_valid


def proposals_single(
    obj: jax.Array,
    box: jax.Array,
    anchor_boxes: jax.Array,
    spans: list[tuple[int, int, int]],
    cfg: RCNNConfig,
    *,
    pre_nms_top_k: int,
    post_nms_top_k: int,
    nms_iou: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One image's proposals: -> boxes [P, 4], objectness [P], valid [P] (P = post_nms_top_k).

    Per level: objectness sigmoid(obj), its top pre_nms_top_k anchors, decoded and clipped to
    the image (boxes with a side under 1 px are dropped). Then, with `cfg.rpn.per_level_nms`
    (the authors' `multilevel_propose_rois`), NMS at `nms_iou` inside each level keeping at
    most post_nms_top_k per level, and the overall top post_nms_top_k by objectness;
    otherwise one NMS over all levels' candidates together. nms_iou >= 1 suppresses nothing
    (the authors' test-time threshold 1.0; their NMS would also drop exact duplicate boxes).
    Padding entries (fewer candidates than P) have valid False, objectness 0, zero boxes.
    """
    scores = jax.nn.sigmoid(obj)
    level_boxes, level_scores = [], []
    for _, start, n in spans:
        s, i = jax.lax.top_k(scores[start : start + n], min(pre_nms_top_k, n))
        b = decode_rpn_boxes(box[start + i], anchor_boxes[start + i], cfg)
        b = box_ops.clip_boxes(b, cfg.image_size, cfg.image_size)
        ok = box_ops.valid_box_mask(b) & (jnp.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= 1.0)
        level_boxes.append(b)
        level_scores.append(jnp.where(ok, s, -jnp.inf))
    if cfg.rpn.per_level_nms:
        kept = [
            _suppressed(b, s, nms_iou, min(post_nms_top_k, b.shape[0]))
            for b, s in zip(level_boxes, level_scores)
        ]
        boxes, scores, _ = _top_scored(
            jnp.concatenate([k[0] for k in kept]),
            jnp.concatenate([k[1] for k in kept]),
            post_nms_top_k,
        )
    else:
        boxes, scores, _ = _suppressed(
            jnp.concatenate(level_boxes), jnp.concatenate(level_scores), nms_iou, post_nms_top_k
        )
    valid = scores > -jnp.inf
    return jnp.where(valid[:, None], boxes, 0.0), jnp.where(valid, scores, 0.0), valid


def sample_rois_single(
    rng: jax.Array,
    proposals: jax.Array,
    proposals_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    cfg: RCNNConfig,
):
    """Matches proposals (+ gt boxes) to gt and samples a fixed-size RoI set.

    Returns dict: rois [R, 4], classes [R] (0 = background, 1 + class index), box_targets
    [R, 4], gt_index [R], fg [R] bool, valid [R] bool.
    """
    cands = jnp.concatenate([proposals, gt_boxes])
    cands_valid = jnp.concatenate([proposals_valid, gt_valid])
    iou = box_ops.box_iou(cands, gt_boxes)
    iou = jnp.where(gt_valid[None, :] & cands_valid[:, None], iou, -1.0)
    matched, labels = match_boxes(
        iou,
        gt_valid,
        fg_threshold=cfg.roi.fg_iou,
        bg_threshold=cfg.roi.fg_iou,
        allow_low_quality=False,
    )
    labels = jnp.where(cands_valid, labels, -1)
    idx, valid = sample_balanced(
        rng,
        labels,
        num_samples=cfg.roi.batch_per_image,
        positive_fraction=cfg.roi.positive_fraction,
    )
    lab = jnp.where(valid, labels[idx], -1)
    fg = lab == 1
    rois = cands[idx]
    gi = matched[idx]
    classes = jnp.where(fg, gt_classes[gi] + 1, 0)
    targets = box_ops.encode_deltas(gt_boxes[gi], rois, weights=BOX_WEIGHTS)
    return dict(
        rois=rois,
        classes=classes,
        box_targets=jnp.where(fg[:, None], targets, 0.0),
        gt_index=gi,
        fg=fg,
        valid=lab >= 0,
    )


def relabel_rois_single(
    rois: jax.Array,
    gt_boxes: jax.Array,
    gt_classes: jax.Array,
    gt_valid: jax.Array,
    fg_iou: float,
    weights: tuple[float, ...],
) -> dict[str, jax.Array]:
    """A later cascade stage's targets: every RoI [R, 4] (the previous stage's regressed boxes)
    is matched to its best valid gt box [M, 4], foreground at IoU >= fg_iou; no resampling.

    Returns dict: rois [R, 4], classes [R] (0 = background, 1 + class index), box_targets
    [R, 4] (deltas encoded with `weights`; 0 on background), gt_index [R], fg [R] bool.
    """
    iou = box_ops.box_iou(rois, gt_boxes)
    iou = jnp.where(gt_valid[None, :], iou, -1.0)
    matched, labels = match_boxes(
        iou, gt_valid, fg_threshold=fg_iou, bg_threshold=fg_iou, allow_low_quality=False
    )
    fg = labels == 1
    targets = box_ops.encode_deltas(gt_boxes[matched], rois, weights=weights)
    return dict(
        rois=rois,
        classes=jnp.where(fg, gt_classes[matched] + 1, 0),
        box_targets=jnp.where(fg[:, None], targets, 0.0),
        gt_index=matched,
        fg=fg,
    )


def detector_loss(
    model,
    params: Any,
    batch: dict[str, jax.Array],
    text_embeddings: jax.Array,
    text_valid: jax.Array,
    rng: jax.Array,
    cfg: RCNNConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total Mask R-CNN loss for a batch.

    batch: image [B, S, S, 3], boxes [B, M, 4] pixels, classes [B, M] (training vocabulary
    index, -1 pad), valid [B, M], masks [B, M, Hm, Wm] (instance masks of the padded image at
    reduced resolution; without "masks", e.g. box-only datasets, there is no mask loss).
    """
    apply = lambda method, *a: model.apply({"params": params}, *a, method=method)  # noqa: E731
    images = batch["image"]
    b = images.shape[0]
    gt_boxes, gt_valid = batch["boxes"], batch["valid"]
    gt_classes = jnp.maximum(batch["classes"], 0)
    feats = apply(model.features, images, True)
    rpn_out = apply(model.rpn_outputs, feats)
    obj, box = flatten_rpn(rpn_out, cfg)
    anchor_boxes = jnp.asarray(anchors(cfg)[0])

    k_rpn, k_roi = jax.random.split(rng)
    rpn_obj_loss, rpn_box_loss = jax.vmap(
        lambda k, o, bx, g, v: rpn_loss_single(k, o, bx, anchor_boxes, g, v, cfg)
    )(jax.random.split(k_rpn, b), obj, box, gt_boxes, gt_valid)

    props, _, props_valid = _batched_proposals(
        jax.lax.stop_gradient(obj),
        jax.lax.stop_gradient(box),
        cfg,
        pre_nms_top_k=cfg.rpn.pre_nms_top_k,
        post_nms_top_k=cfg.rpn.post_nms_top_k,
        nms_iou=cfg.rpn.nms_iou,
    )
    samples = jax.vmap(lambda k, p, pv, g, c, v: sample_rois_single(k, p, pv, g, c, v, cfg))(
        jax.random.split(k_roi, b), props, props_valid, gt_boxes, gt_classes, gt_valid
    )
    valid = samples["valid"]
    num_valid = jnp.maximum(jnp.sum(valid), 1.0)
    # Stage 0 trains on the sampled proposals; each later (cascade) stage on the previous
    # stage's regressed boxes of the same RoIs, re-matched at its own IoU.
    stage_samples, stage_metrics = samples, {}
    cls_total = box_total = jnp.zeros((), jnp.float32)
    for stage in range(num_box_stages(cfg)):
        weights = stage_box_weights(stage)
        rois = jax.lax.stop_gradient(stage_samples["rois"])
        deltas, emb = apply(model.box_outputs, _pool(feats, rois, cfg.roi.pool_size, cfg), stage)
        logits = apply(model.class_logits, emb, text_embeddings, text_valid)
        fg = stage_samples["fg"] & valid
        ce = classification_loss_terms(logits, stage_samples["classes"], cfg.roi.background_weight)
        stage_cls = jnp.sum(jnp.where(valid, ce, 0.0)) / num_valid
        terms = roi_box_loss_terms(deltas, stage_samples, gt_boxes, cfg, weights)
        stage_box = jnp.sum(jnp.where(fg, terms, 0.0)) / num_valid
        # Cascade R-CNN's stage weights: 1, 0.5, 0.25, ...
        cls_total = cls_total + 0.5**stage * stage_cls
        box_total = box_total + 0.5**stage * stage_box
        if stage == 0:
            first_logits, first_fg, cls_loss, box_loss = logits, fg, stage_cls, stage_box
        else:
            stage_metrics[f"cls_loss_stage{stage + 1}"] = stage_cls
            stage_metrics[f"box_loss_stage{stage + 1}"] = stage_box
            stage_metrics[f"fg_fraction_stage{stage + 1}"] = jnp.sum(fg) / num_valid
        if stage + 1 < num_box_stages(cfg):
            refined = box_ops.decode_deltas(deltas, rois, weights=weights)
            refined = jax.lax.stop_gradient(
                box_ops.clip_boxes(refined, cfg.image_size, cfg.image_size)
            )
            stage_samples = jax.vmap(
                functools.partial(
                    relabel_rois_single,
                    fg_iou=cfg.roi.cascade_ious[stage],
                    weights=stage_box_weights(stage + 1),
                )
            )(refined, gt_boxes, gt_classes, gt_valid)
    logits, fg = first_logits, first_fg

    if "masks" in batch:
        mask_loss = _mask_loss(model, params, feats, samples, batch, cfg)
    else:
        mask_loss = jnp.zeros((), jnp.float32)
    total = (
        jnp.mean(rpn_obj_loss)
        + jnp.mean(rpn_box_loss)
        + cls_total
        + cfg.roi.box_loss_weight * box_total
        + cfg.roi.mask_loss_weight * mask_loss
    )
    acc = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == samples["classes"], 0)) / num_valid
    metrics = dict(
        rpn_objectness_loss=jnp.mean(rpn_obj_loss),
        rpn_box_loss=jnp.mean(rpn_box_loss),
        cls_loss=cls_loss,
        box_loss=box_loss,
        mask_loss=mask_loss,
        roi_accuracy=acc,
        fg_fraction=jnp.sum(fg) / num_valid,
        **stage_metrics,
    )
    return total, metrics


def roi_box_loss_terms(
    deltas: jax.Array,
    samples: dict[str, jax.Array],
    gt_boxes: jax.Array,
    cfg: RCNNConfig,
    weights: tuple[float, ...] = BOX_WEIGHTS,
) -> jax.Array:
    """Per-RoI box loss [B, R] of the class-agnostic deltas [B, R, 4] (`cfg.roi.box_loss`).

    "l1": sum of |deltas - targets| over the 4 deltas (encoded with `weights`, the stage's);
    "giou": 1 - GIoU of the box decoded from the RoI with its matched gt box (gt_boxes
    [B, M, 4]). Only foreground RoIs' terms are meaningful.
    """
    if cfg.roi.box_loss == "l1":
        return jnp.sum(jnp.abs(deltas - samples["box_targets"]), -1)
    pred = box_ops.decode_deltas(deltas, samples["rois"], weights=weights)
    gt = jnp.take_along_axis(gt_boxes, samples["gt_index"][..., None], axis=1)
    return 1.0 - box_ops.paired_giou(pred, gt)


def classification_loss_terms(
    logits: jax.Array, classes: jax.Array, background_weight: float
) -> jax.Array:
    """Per-RoI softmax cross-entropy, times `background_weight` where the target is background.

    As the authors' `weighted_softmax_cross_entropy` (fvlm/losses/base_losses.py): the one-hot
    target's background entry (class 0) is weighted, so background RoIs' losses are scaled and
    foreground RoIs' are not. The caller averages over RoIs (the authors divide by the RoI count,
    not by the sum of weights).

    logits [..., 1 + K], classes [...] int (0 = background) -> [...] float32.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    ce = -jnp.take_along_axis(logp, classes[..., None], -1)[..., 0]
    return jnp.where(classes == 0, background_weight, 1.0) * ce


def _mask_loss(model, params, feats, samples, batch, cfg: RCNNConfig) -> jax.Array:
    """BCE of 28x28 class-agnostic masks on the foreground RoIs (fixed count per image)."""
    num_fg = max(1, int(round(cfg.roi.batch_per_image * cfg.roi.positive_fraction)))
    order = jnp.argsort(~samples["fg"], axis=1, stable=True)[:, :num_fg]  # fg first
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
    rois = jax.lax.stop_gradient(take(samples["rois"]))
    fg = take(samples["fg"])
    gi = take(samples["gt_index"])
    gt_masks = batch["masks"].astype(jnp.float32)  # [B, M, Hm, Wm]
    b, _, hm, wm = gt_masks.shape
    inst = jnp.take_along_axis(gt_masks, gi[:, :, None, None], 1)  # [B, F, Hm, Wm]
    out = 2 * cfg.roi.mask_pool_size
    # Gathers, not the matmul form: the same values but summed in another order, which could
    # move a sample lying within float rounding of 0.5 across the threshold (and this RoIAlign
    # has one channel and no backward pass, so the choice costs nothing).
    targets = batched_roi_align(
        inst.reshape(b * num_fg, hm, wm, 1),
        rois.reshape(b * num_fg, 1, 4),
        output_size=out,
        spatial_scale=hm / cfg.image_size,
        sampling_ratio=2,
        method="gather",
    ).reshape(b, num_fg, out, out)
    targets = (targets >= 0.5).astype(jnp.float32)
    roi_feats = _pool(feats, rois, cfg.roi.mask_pool_size, cfg)
    logits = model.apply({"params": params}, roi_feats, method=model.mask_outputs)
    bce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    per_roi = jnp.mean(bce, axis=(-1, -2))
    return jnp.sum(jnp.where(fg, per_roi, 0.0)) / jnp.maximum(jnp.sum(fg), 1.0)


def _region_scores(
    model,
    params: Any,
    images: jax.Array,
    text_embeddings: jax.Array,
    text_valid: jax.Array,
    cfg: RCNNConfig,
    vlm_region_embeddings_fn,
    vlm_logit_scale: jax.Array | None,
) -> dict[str, Any]:
    """Backbone, proposals, box refinement (`cfg.infer.box_passes` passes of the box head) and
    the class scores of both scorers.

    The VLM pools its region features from the proposals (`cfg.infer.vlm_pool_boxes` =
    "proposals", as the authors' code) or from the refined boxes, shrunk by
    `cfg.infer.vlm_box_scale`; its classifier is [the detector's background row,
    text_embeddings], the background row shared with the detector's classifier as in the
    authors' code.

    Returns dict: feats (the pyramid), boxes [B, P, 4] refined proposals, det_probs
    [B, P, 1 + K] detector softmax (column 0 background), vlm_logits [B, P, 1 + K] (column 0
    background; padded vocabulary entries -1e9) or None (no VLM), objectness [B, P],
    props_valid [B, P].
    """
    apply = lambda method, *a: model.apply({"params": params}, *a, method=method)  # noqa: E731
    feats = apply(model.features, images)
    obj, box = flatten_rpn(apply(model.rpn_outputs, feats), cfg)
    props, objectness, props_valid = _batched_proposals(
        obj,
        box,
        cfg,
        pre_nms_top_k=cfg.infer.pre_nms_top_k,
        post_nms_top_k=cfg.infer.post_nms_top_k,
    )
    boxes, det_probs = props, 0.0
    for i in range(cfg.infer.box_passes):
        # Pass i uses cascade stage i's head (the last stage's once the stages run out).
        stage = min(i, num_box_stages(cfg) - 1)
        pooled = _pool(feats, boxes, cfg.roi.pool_size, cfg)
        deltas, emb = apply(model.box_outputs, pooled, stage)
        boxes = box_ops.decode_deltas(deltas, boxes, weights=stage_box_weights(stage))
        boxes = box_ops.clip_boxes(boxes, cfg.image_size, cfg.image_size)
        logits = apply(model.class_logits, emb, text_embeddings, text_valid)
        det_probs = det_probs + jax.nn.softmax(logits, -1) / cfg.infer.box_passes
    vlm_logits = None
    if vlm_region_embeddings_fn is not None:
        pool_boxes = props if cfg.infer.vlm_pool_boxes == "proposals" else boxes
        region = vlm_region_embeddings_fn(
            images, box_ops.shrink_boxes(pool_boxes, cfg.infer.vlm_box_scale)
        )
        if cfg.infer.vlm_temperature is None:
            if vlm_logit_scale is None:
                raise ValueError("vlm_temperature=None needs the pretrained vlm_logit_scale")
            scale = vlm_logit_scale
        else:
            scale = 1.0 / cfg.infer.vlm_temperature
        background = apply(model.background_embedding)
        classifier = jnp.concatenate(
            [background[None], text_embeddings.astype(jnp.float32)], axis=0
        )
        vlm_logits = jnp.einsum("bpe,ke->bpk", region, classifier) * scale
        valid = jnp.concatenate([jnp.ones((1,), bool), text_valid])
        vlm_logits = jnp.where(valid, vlm_logits, -1e9)
    return dict(
        feats=feats,
        boxes=boxes,
        det_probs=det_probs,
        vlm_logits=vlm_logits,
        objectness=objectness,
        props_valid=props_valid,
    )


def fused_class_scores(
    det_probs: jax.Array,
    vlm_logits: jax.Array | None,
    objectness: jax.Array,
    text_valid: jax.Array,
    is_novel: jax.Array,
    cfg: RCNNConfig,
) -> jax.Array:
    """[..., K] class scores by `cfg.infer.fusion` (see detection.score_fusion).

    det_probs [..., 1 + K] detector softmax, vlm_logits [..., 1 + K] or None (detector only),
    both with background in column 0; objectness [...].
    """
    kw = dict(
        is_novel=is_novel,
        w_base=cfg.infer.w_base,
        w_novel=cfg.infer.w_novel,
        objectness_exponent=cfg.infer.objectness_exponent,
    )
    if cfg.infer.fusion == "authors":
        vlm_probs = None if vlm_logits is None else jax.nn.softmax(vlm_logits, -1)
        return fuse_scores_with_background(det_probs, vlm_probs, objectness, valid=text_valid, **kw)
    # "classes_only": the VLM softmax over the classes alone, no background, no renormalisation.
    vlm_probs = None if vlm_logits is None else jax.nn.softmax(vlm_logits[..., 1:], -1)
    return fuse_scores(det_probs[..., 1:], vlm_probs, objectness, **kw)


def _final_detections(
    model,
    params: Any,
    scored: dict[str, Any],
    vlm_logits: jax.Array | None,
    text_valid: jax.Array,
    is_novel: jax.Array,
    cfg: RCNNConfig,
    with_masks: bool,
) -> dict[str, jax.Array]:
    """Score fusion (none when `vlm_logits` is None), per-class NMS and (optionally) masks."""
    scores = fused_class_scores(
        scored["det_probs"], vlm_logits, scored["objectness"], text_valid, is_novel, cfg
    )
    scores = jnp.where(scored["props_valid"][..., None] & text_valid, scores, 0.0)
    out_boxes, out_scores, out_classes, out_valid = jax.vmap(
        lambda bx, s: per_class_nms(
            bx,
            s,
            iou_threshold=cfg.infer.nms_iou,
            max_output=cfg.infer.max_detections,
            score_threshold=cfg.infer.score_threshold,
        )
    )(scored["boxes"], scores)
    if cfg.infer.box_voting_iou is not None:
        out_boxes = jax.vmap(
            lambda kb, kc, kv, bx, s: vote_boxes(
                kb, kc, kv, bx, s, iou_threshold=cfg.infer.box_voting_iou
            )
        )(out_boxes, out_classes, out_valid, scored["boxes"], scores)
    out = dict(boxes=out_boxes, scores=out_scores, classes=out_classes, valid=out_valid)
    if with_masks:
        mask_feats = _pool(scored["feats"], out_boxes, cfg.roi.mask_pool_size, cfg)
        out["masks"] = jax.nn.sigmoid(
            model.apply({"params": params}, mask_feats, method=model.mask_outputs)
        )
    return out


def detect(
    model,
    params: Any,
    images: jax.Array,
    text_embeddings: jax.Array,
    text_valid: jax.Array,
    is_novel: jax.Array,
    cfg: RCNNConfig,
    *,
    vlm_region_embeddings_fn=None,
    vlm_logit_scale: jax.Array | None = None,
    with_masks: bool = True,
) -> dict[str, jax.Array]:
    """Inference: fixed-size detections per image over the given vocabulary.

    Args:
      images: [B, S, S, 3].
      text_embeddings: [K, E] unit-norm (padded), text_valid [K], is_novel [K].
      vlm_region_embeddings_fn: optional `(images, boxes [B, P, 4]) -> [B, P, E]` unit-norm
        region embeddings from the frozen pretrained backbone; enables VLM score fusion.
      vlm_logit_scale: the pretrained model's learned logit scale, used when
        `cfg.infer.vlm_temperature` is None.
      with_masks: also run the mask head on the detections.

    Returns dict: boxes [B, D, 4] pixels, scores [B, D], classes [B, D] (vocabulary index),
    valid [B, D], and (with_masks) masks [B, D, 28, 28] probabilities.
    """
    variant = "detector_only" if vlm_region_embeddings_fn is None else "fused"
    return detect_variants(
        model,
        params,
        images,
        text_embeddings,
        text_valid,
        is_novel,
        cfg,
        (variant,),
        vlm_region_embeddings_fn=vlm_region_embeddings_fn,
        vlm_logit_scale=vlm_logit_scale,
        with_masks=with_masks,
    )[variant]


def detect_variants(
    model,
    params: Any,
    images: jax.Array,
    text_embeddings: jax.Array,
    text_valid: jax.Array,
    is_novel: jax.Array,
    cfg: RCNNConfig,
    variants: tuple[str, ...] = ("fused", "detector_only"),
    *,
    vlm_region_embeddings_fn=None,
    vlm_logit_scale: jax.Array | None = None,
    with_masks: bool = True,
) -> dict[str, dict[str, jax.Array]]:
    """`detect` with ("fused") and without ("detector_only") VLM score fusion, from one pass.

    The variants share everything up to the class scores, so evaluation, which reports both,
    computes them together. Arguments as `detect` ("fused" needs `vlm_region_embeddings_fn`).
    Returns {variant: `detect`'s dict} for each of `variants`.
    """
    unknown = set(variants) - {"fused", "detector_only"}
    if unknown or ("fused" in variants and vlm_region_embeddings_fn is None):
        raise ValueError(
            f"variants {variants}: choose from 'fused' (needs vlm_region_embeddings_fn) and "
            "'detector_only'"
        )
    scored = _region_scores(
        model,
        params,
        images,
        text_embeddings,
        text_valid,
        cfg,
        vlm_region_embeddings_fn,
        vlm_logit_scale,
    )
    vlm_logits = {"fused": scored["vlm_logits"], "detector_only": None}
    return {
        v: _final_detections(
            model, params, scored, vlm_logits[v], text_valid, is_novel, cfg, with_masks
        )
        for v in variants
    }
