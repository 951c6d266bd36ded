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

from rovit_jax.detection.score_fusion import fuse_scores
from rovit_jax.ops import boxes as box_ops
from rovit_jax.ops.anchors import anchor_grid
from rovit_jax.ops.matching import match_boxes, sample_balanced
from rovit_jax.ops.nms import nms, per_class_nms
from rovit_jax.ops.roi_align import batched_roi_align, multilevel_roi_align

OBJECTNESS_MODES = ("binary", "centerness")
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


@dataclasses.dataclass(frozen=True)
class RCNNConfig:
    """Static settings of targets, sampling and inference (all from the task config)."""

    image_size: int
    min_level: int
    max_level: int
    anchor_size: float = 8.0
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    objectness: str = "centerness"
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_k: int = 2000
    rpn_nms_iou: float = 0.7
    rpn_post_nms_top_k: int = 1000
    roi_batch_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_fg_iou: float = 0.5
    roi_pool_size: int = 7
    mask_pool_size: int = 14
    mask_loss_weight: float = 1.0
    # Inference.
    test_pre_nms_top_k: int = 1000
    test_post_nms_top_k: int = 1000
    detection_nms_iou: float = 0.5
    max_detections: int = 300
    score_threshold: float = 0.0
    vlm_box_scale: float = 0.7
    vlm_temperature: float | None = 0.01  # None: the pretrained model's learned temperature
    w_base: float = 0.35
    w_novel: float = 0.65
    objectness_exponent: float = 3.0

    def __post_init__(self):
        if self.objectness not in OBJECTNESS_MODES:
            raise ValueError(
                f"config key `rpn.objectness` = {self.objectness!r}: choose one of "
                f"{OBJECTNESS_MODES}"
            )


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
            aspect_ratios=cfg.aspect_ratios,
            anchor_size=cfg.anchor_size,
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

    binary: Faster R-CNN deltas. centerness: (l, t, r, b) distances from the anchor centre as
    log-multiples of the anchor's half sizes, so a zero output reproduces the anchor.
    """
    if cfg.objectness == "binary":
        return box_ops.decode_deltas(box, anchor_boxes, weights=(1.0, 1.0, 1.0, 1.0))
    cy = (anchor_boxes[..., 0] + anchor_boxes[..., 2]) / 2
    cx = (anchor_boxes[..., 1] + anchor_boxes[..., 3]) / 2
    hh = (anchor_boxes[..., 2] - anchor_boxes[..., 0]) / 2
    hw = (anchor_boxes[..., 3] - anchor_boxes[..., 1]) / 2
    d = jnp.exp(jnp.clip(box, -8.0, math.log(1000.0 / 16)))
    left, top, right, bottom = d[..., 0] * hw, d[..., 1] * hh, d[..., 2] * hw, d[..., 3] * hh
    return jnp.stack([cy - top, cx - left, cy + bottom, cx + right], axis=-1)


def _centerness_target(anchor_boxes: jax.Array, gt: jax.Array) -> jax.Array:
    """Centerness of each anchor centre inside its matched gt box: [N, 4], [N, 4] -> [N]."""
    cy = (anchor_boxes[:, 0] + anchor_boxes[:, 2]) / 2
    cx = (anchor_boxes[:, 1] + anchor_boxes[:, 3]) / 2
    ltrb = jnp.stack([cx - gt[:, 1], cy - gt[:, 0], gt[:, 3] - cx, gt[:, 2] - cy], -1)
    return box_ops.centerness(ltrb)


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
    """
    iou = box_ops.box_iou(anchor_boxes, gt_boxes)
    iou = jnp.where(gt_valid[None, :], iou, -1.0)
    matched, labels = match_boxes(
        iou, gt_valid, fg_threshold=cfg.rpn_fg_iou, bg_threshold=cfg.rpn_bg_iou
    )
    idx, valid = sample_balanced(
        rng,
        labels,
        num_samples=cfg.rpn_batch_per_image,
        positive_fraction=cfg.rpn_positive_fraction,
    )
    lab = jnp.where(valid, labels[idx], -1)
    pos = lab == 1
    norm = float(cfg.rpn_batch_per_image)
    target_box = gt_boxes[matched[idx]]
    a = anchor_boxes[idx]
    if cfg.objectness == "binary":
        logits = obj[idx]
        bce = jnp.maximum(logits, 0) - logits * pos + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        obj_loss = jnp.sum(jnp.where(lab >= 0, bce, 0.0)) / norm
        target = box_ops.encode_deltas(target_box, a, weights=(1.0, 1.0, 1.0, 1.0))
        l1 = jnp.sum(_smooth_l1(box[idx] - target, 1.0 / 9), -1)
        box_loss = jnp.sum(jnp.where(pos, l1, 0.0)) / norm
    else:
        # Localization quality (OLN): regress objectness to centerness on positives only, so
        # unlabelled (possibly novel) objects are never pushed towards "background".
        quality = jax.nn.sigmoid(obj[idx])
        target_q = _centerness_target(a, target_box)
        num_pos = jnp.maximum(jnp.sum(pos), 1.0)
        obj_loss = jnp.sum(jnp.where(pos, jnp.abs(quality - target_q), 0.0)) / num_pos
        pred = decode_rpn_boxes(box[idx], a, cfg)
        giou = box_ops.paired_giou(pred, target_box)
        box_loss = jnp.sum(jnp.where(pos, 1.0 - giou, 0.0)) / num_pos
    return obj_loss, box_loss


def _pool(features: dict[int, jax.Array], boxes: jax.Array, size: int, cfg: RCNNConfig):
    """Multilevel RoIAlign of [B, N, 4] boxes -> [B, N, size, size, C]."""
    return multilevel_roi_align(
        features, boxes, output_size=size, min_level=cfg.min_level, max_level=cfg.max_level
    )


def _batched_proposals(obj, box, cfg: RCNNConfig, *, pre_nms_top_k: int, post_nms_top_k: int):
    """`proposals_single` over the batch: -> boxes [B, P, 4], objectness [B, P], valid [B, P]."""
    anchor_np, _, spans = anchors(cfg)
    anchor_boxes = jnp.asarray(anchor_np)
    return jax.vmap(
        lambda o, bx: proposals_single(
            o,
            bx,
            anchor_boxes,
            spans,
            cfg,
            pre_nms_top_k=pre_nms_top_k,
            post_nms_top_k=post_nms_top_k,
        )
    )(obj, box)


def _smooth_l1(x: jax.Array, beta: float) -> jax.Array:
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def proposals_single(
    obj: jax.Array,
    box: jax.Array,
    anchor_boxes: jax.Array,
    spans: list[tuple[int, int, int]],
    cfg: RCNNConfig,
    *,
    pre_nms_top_k: int,
    post_nms_top_k: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k per level, decode, clip, NMS: -> boxes [P, 4], objectness [P], valid [P]."""
    scores = jax.nn.sigmoid(obj)
    cand_boxes, cand_scores = [], []
    for _, start, n in spans:
        k = min(pre_nms_top_k, n)
        s, i = jax.lax.top_k(scores[start : start + n], k)
        cand_scores.append(s)
        cand_boxes.append(decode_rpn_boxes(box[start + i], anchor_boxes[start + i], cfg))
    boxes = box_ops.clip_boxes(jnp.concatenate(cand_boxes), cfg.image_size, cfg.image_size)
    scores = jnp.concatenate(cand_scores)
    ok = box_ops.valid_box_mask(boxes) & (
        jnp.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= 1.0
    )
    scores = jnp.where(ok, scores, -jnp.inf)
    keep, keep_valid = nms(boxes, scores, iou_threshold=cfg.rpn_nms_iou, max_output=post_nms_top_k)
    keep = jnp.maximum(keep, 0)
    return boxes[keep], jnp.where(keep_valid, scores[keep], 0.0), keep_valid


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
        fg_threshold=cfg.roi_fg_iou,
        bg_threshold=cfg.roi_fg_iou,
        allow_low_quality=False,
    )
    labels = jnp.where(cands_valid, labels, -1)
    idx, valid = sample_balanced(
        rng,
        labels,
        num_samples=cfg.roi_batch_per_image,
        positive_fraction=cfg.roi_positive_fraction,
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
        pre_nms_top_k=cfg.rpn_pre_nms_top_k,
        post_nms_top_k=cfg.rpn_post_nms_top_k,
    )
    samples = jax.vmap(lambda k, p, pv, g, c, v: sample_rois_single(k, p, pv, g, c, v, cfg))(
        jax.random.split(k_roi, b), props, props_valid, gt_boxes, gt_classes, gt_valid
    )
    rois = jax.lax.stop_gradient(samples["rois"])
    roi_feats = _pool(feats, rois, cfg.roi_pool_size, cfg)
    deltas, emb = apply(model.box_outputs, roi_feats)
    logits = apply(model.class_logits, emb, text_embeddings, text_valid)
    valid = samples["valid"]
    fg = samples["fg"]
    logp = jax.nn.log_softmax(logits, -1)
    ce = -jnp.take_along_axis(logp, samples["classes"][..., None], -1)[..., 0]
    num_valid = jnp.maximum(jnp.sum(valid), 1.0)
    cls_loss = jnp.sum(jnp.where(valid, ce, 0.0)) / num_valid
    l1 = jnp.sum(jnp.abs(deltas - samples["box_targets"]), -1)
    box_loss = jnp.sum(jnp.where(fg, l1, 0.0)) / num_valid

    if "masks" in batch:
        mask_loss = _mask_loss(model, params, feats, samples, batch, cfg)
    else:
        mask_loss = jnp.zeros((), jnp.float32)
    total = (
        jnp.mean(rpn_obj_loss)
        + jnp.mean(rpn_box_loss)
        + cls_loss
        + box_loss
        + cfg.mask_loss_weight * mask_loss
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
    )
    return total, metrics


def _mask_loss(model, params, feats, samples, batch, cfg: RCNNConfig) -> jax.Array:
    """BCE of 28x28 class-agnostic masks on the foreground RoIs (fixed count per image)."""
    num_fg = max(1, int(round(cfg.roi_batch_per_image * cfg.roi_positive_fraction)))
    order = jnp.argsort(~samples["fg"], axis=1, stable=True)[:, :num_fg]  # fg first
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
    rois = jax.lax.stop_gradient(take(samples["rois"]))
    fg = take(samples["fg"])
    gi = take(samples["gt_index"])
    gt_masks = batch["masks"].astype(jnp.float32)  # [B, M, Hm, Wm]
    b, _, hm, wm = gt_masks.shape
    inst = jnp.take_along_axis(gt_masks, gi[:, :, None, None], 1)  # [B, F, Hm, Wm]
    out = 2 * cfg.mask_pool_size
    targets = batched_roi_align(
        inst.reshape(b * num_fg, hm, wm, 1),
        rois.reshape(b * num_fg, 1, 4),
        output_size=out,
        spatial_scale=hm / cfg.image_size,
        sampling_ratio=2,
    ).reshape(b, num_fg, out, out)
    targets = (targets >= 0.5).astype(jnp.float32)
    roi_feats = _pool(feats, rois, cfg.mask_pool_size, cfg)
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
    """Backbone, proposals, box refinement and per-class probabilities of both scorers.

    Returns dict: feats (the pyramid), boxes [B, P, 4] refined proposals, det_probs [B, P, K],
    vlm_probs [B, P, K] or None (no VLM), objectness [B, P], props_valid [B, P].
    """
    apply = lambda method, *a: model.apply({"params": params}, *a, method=method)  # noqa: E731
    feats = apply(model.features, images)
    obj, box = flatten_rpn(apply(model.rpn_outputs, feats), cfg)
    props, objectness, props_valid = _batched_proposals(
        obj,
        box,
        cfg,
        pre_nms_top_k=cfg.test_pre_nms_top_k,
        post_nms_top_k=cfg.test_post_nms_top_k,
    )
    roi_feats = _pool(feats, props, cfg.roi_pool_size, cfg)
    deltas, emb = apply(model.box_outputs, roi_feats)
    boxes = box_ops.decode_deltas(deltas, props, weights=BOX_WEIGHTS)
    boxes = box_ops.clip_boxes(boxes, cfg.image_size, cfg.image_size)
    logits = apply(model.class_logits, emb, text_embeddings, text_valid)
    det_probs = jax.nn.softmax(logits, -1)[..., 1:]
    vlm_probs = None
    if vlm_region_embeddings_fn is not None:
        region = vlm_region_embeddings_fn(images, box_ops.shrink_boxes(boxes, cfg.vlm_box_scale))
        if cfg.vlm_temperature is None:
            if vlm_logit_scale is None:
                raise ValueError("vlm_temperature=None needs the pretrained vlm_logit_scale")
            scale = vlm_logit_scale
        else:
            scale = 1.0 / cfg.vlm_temperature
        vlm_logits = jnp.einsum("bpe,ke->bpk", region, text_embeddings) * scale
        vlm_logits = jnp.where(text_valid, vlm_logits, -1e9)
        vlm_probs = jax.nn.softmax(vlm_logits, -1)
    return dict(
        feats=feats,
        boxes=boxes,
        det_probs=det_probs,
        vlm_probs=vlm_probs,
        objectness=objectness,
        props_valid=props_valid,
    )


def _final_detections(
    model,
    params: Any,
    scored: dict[str, Any],
    vlm_probs: jax.Array | None,
    text_valid: jax.Array,
    is_novel: jax.Array,
    cfg: RCNNConfig,
    with_masks: bool,
) -> dict[str, jax.Array]:
    """Score fusion (none when `vlm_probs` is None), per-class NMS and (optionally) masks."""
    scores = fuse_scores(
        scored["det_probs"],
        vlm_probs,
        scored["objectness"],
        is_novel=is_novel,
        w_base=cfg.w_base,
        w_novel=cfg.w_novel,
        objectness_exponent=cfg.objectness_exponent,
    )
    scores = jnp.where(scored["props_valid"][..., None] & text_valid, scores, 0.0)
    out_boxes, out_scores, out_classes, out_valid = jax.vmap(
        lambda bx, s: per_class_nms(
            bx,
            s,
            iou_threshold=cfg.detection_nms_iou,
            max_output=cfg.max_detections,
            score_threshold=cfg.score_threshold,
        )
    )(scored["boxes"], scores)
    out = dict(boxes=out_boxes, scores=out_scores, classes=out_classes, valid=out_valid)
    if with_masks:
        mask_feats = _pool(scored["feats"], out_boxes, cfg.mask_pool_size, cfg)
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
        `cfg.vlm_temperature` is None.
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
    vlm_probs = {"fused": scored["vlm_probs"], "detector_only": None}
    return {
        v: _final_detections(
            model, params, scored, vlm_probs[v], text_valid, is_novel, cfg, with_masks
        )
        for v in variants
    }
