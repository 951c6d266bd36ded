"""The detection config's sections `det`, `rpn`, `roi`, `head`, `infer`, `text`, `init`,
`eval` and `optim` and its run keys, typed (with `data` and `data.world`, defined in
`rovit_jax.data.settings`): each field's default, allowed values, bounds and
older-run value, written once.

`detect_config.detect_defaults()` builds its sections from these classes, `tasks.detect` resolves
them once from a config (`detection_settings`), and `rcnn.RCNNConfig` carries the typed
objects to every function that reads them. Defaults are the authors' (their F-VLM / DITO
detection code, which RO-ViT's detector follows) or the paper's where either names a value;
"this project's before" marks a kept alternative. `older` values are what a run config written
before the field existed was trained and evaluated with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from rovit_jax.config_sections import (
    Section,
    older_defaults,
    redefault,
    resolved_sections,
    setting,
)
from rovit_jax.data.settings import DetectionDataSettings, WorldSettings
from rovit_jax.detection.score_fusion import FUSION_MODES
from rovit_jax.detection.text_classifier import PROMPT_ENSEMBLES
from rovit_jax.models.detector import BACKGROUND_MODES
from rovit_jax.run_config import RunSettings
from rovit_jax.train.optim import NO_DECAY, OptimSettings

__all__ = [
    "CENTERNESS_LOSSES",
    "DETECTION_SECTIONS",
    "DetSettings",
    "DetectEvalSettings",
    "DetectOptimSettings",
    "DetectRunSettings",
    "HeadSettings",
    "InferSettings",
    "InitSettings",
    "OBJECTNESS_MODES",
    "OLDER_DEFAULTS",
    "RPN_BOX_CODINGS",
    "ROI_BOX_LOSSES",
    "RPN_BOX_LOSSES",
    "RPNSettings",
    "RoISettings",
    "TextSettings",
    "VLM_POOL_BOXES",
    "detection_settings",
]

OBJECTNESS_MODES = ("binary", "centerness")
# Centerness RPN (rpn.objectness = "centerness") options; the first of each is the authors'
# (see rcnn.rpn_loss_single).
CENTERNESS_LOSSES = ("all_sampled", "positives")
RPN_BOX_LOSSES = ("iou", "giou")
RPN_BOX_CODINGS = ("linear", "log")
# Box loss of the RoI head; the first is the authors' (L1 on the weighted deltas).
ROI_BOX_LOSSES = ("l1", "giou")
# Boxes the frozen VLM pools region features from: the RPN proposals (the authors' code) or the
# detector's refined boxes.
VLM_POOL_BOXES = ("proposals", "refined")

_UNIT = dict(min_value=0.0, max_value=1.0)  # an IoU threshold or a weight in [0, 1]
_FRACTION = dict(min_value=0.0, max_value=1.0, min_exclusive=True)  # (0, 1]


@dataclasses.dataclass(frozen=True)
class DetSettings(Section):
    """`det.*`: the detection canvas, its augmentation, the backbone's windows and the pyramid."""

    SECTION: ClassVar[str] = "det"
    ORDERED: ClassVar = (("min_level", "max_level"),)

    image_size: int = setting(1024, min_value=1)  # paper: 1024 px
    # Large-scale jitter: the image is resized by a factor drawn from this range.
    scale_range: tuple[float, float] = setting(
        (0.1, 2.0), min_value=0.0, min_exclusive=True, ordered=True
    )
    flip: bool = setting(True)
    max_instances: int = setting(300, min_value=1)  # the authors' MAX_NUM_INSTANCES
    mask_stride: int = setting(4, min_value=1)  # gt masks kept at image_size / mask_stride
    # ViTDet windows of window_size patches (64x64 grid at 1024/16 -> 4x4 windows); 0 = global
    # attention everywhere; global_blocks keep global attention (blocks 3, 6, 9, 12 of B/16).
    window_size: int = setting(16, min_value=0)
    global_blocks: tuple[int, ...] = setting((2, 5, 8, 11), min_value=0)
    min_level: int = setting(2, min_value=0)
    max_level: int = setting(5, min_value=0, max_value=16)
    fpn_channels: int = setting(256, min_value=1)


@dataclasses.dataclass(frozen=True)
class RPNSettings(Section):
    """`rpn.*`: anchors, matching, sampling, proposals and the RPN losses."""

    SECTION: ClassVar[str] = "rpn"
    ORDERED: ClassVar = (("bg_iou", "fg_iou"), ("centerness_bg_iou", "centerness_fg_iou"))

    # "centerness" (localisation quality, the paper's) | "binary" (object vs background).
    objectness: str = setting("centerness", choices=OBJECTNESS_MODES)
    anchor_size: float = setting(8.0, min_value=0.0, min_exclusive=True)  # side / stride
    # The authors': one anchor per location with centerness (their parser refuses more);
    # (0.5, 1.0, 2.0) is Faster R-CNN's (this project's before).
    aspect_ratios: tuple[float, ...] = setting(
        (1.0,), min_value=0.0, min_exclusive=True, nonempty=True
    )
    # Box targets (centerness) / sampled objectness (binary, centerness "positives"): anchors with
    # IoU >= fg_iou, plus each gt's best anchor, are positive, < bg_iou negative.
    fg_iou: float = setting(0.7, **_UNIT)
    bg_iou: float = setting(0.3, **_UNIT)
    batch_per_image: int = setting(256, min_value=1)  # also the RPN losses' normaliser
    positive_fraction: float = setting(0.5, **_FRACTION)
    pre_nms_top_k: int = setting(2000, min_value=1)
    nms_iou: float = setting(0.7, min_value=0.0, max_value=1.0, min_exclusive=True)  # training
    post_nms_top_k: int = setting(1000, min_value=1)
    # Proposal NMS inside each pyramid level, then the overall top post_nms_top_k (the authors'
    # multilevel_propose_rois); False: one NMS over all levels together (this project's before).
    per_level_nms: bool = setting(True, older=False)
    # Centerness objectness training (rcnn.rpn_loss_single):
    #   "all_sampled" (the authors' RpnAnchorCenternessLabeler + RpnCenterLoss): anchors matched at
    #     IoU >= centerness_fg_iou (plus each gt's best anchor) regress sigmoid(objectness) with L1
    #     to the centerness of their centre in the gt (0 outside it), anchors below
    #     centerness_bg_iou to 0, on a sample of centerness_batch_per_image anchors with at most
    #     centerness_positive_fraction positives; / centerness_batch_per_image.
    #   "positives": centerness on the sampled positives only, / their number (background never
    #     ranked down; this project's before, with box_loss "giou", weight 1, coding "log").
    centerness_loss: str = setting("all_sampled", choices=CENTERNESS_LOSSES, older="positives")
    centerness_fg_iou: float = setting(0.3, **_UNIT, older=0.3)  # rpn_center_match_threshold
    centerness_bg_iou: float = setting(0.1, **_UNIT, older=0.1)  # ..._unmatched_threshold
    centerness_batch_per_image: int = setting(256, min_value=1, older=256)
    centerness_positive_fraction: float = setting(255 / 256, **_FRACTION, older=255 / 256)
    # Box loss of the centerness RPN: weight * (1 - IoU) of the decoded box with its gt, summed
    # over the positive anchors (all of them with "all_sampled") (the authors' RpnBoxIoULoss:
    # plain IoU, weight 8). "giou": 1 - GIoU.
    box_loss: str = setting("iou", choices=RPN_BOX_LOSSES, older="giou")
    box_loss_weight: float = setting(8.0, min_value=0.0, older=1.0)
    # Box outputs (l, t, r, b) from the anchor centre: "linear" in units of the anchor's size (the
    # authors' LRTB coder) | "log": log-multiples of the anchor's half sizes.
    box_coding: str = setting("linear", choices=RPN_BOX_CODINGS, older="log")


@dataclasses.dataclass(frozen=True)
class RoISettings(Section):
    """`roi.*`: RoI sampling, pooling and the box, class and mask losses' weights."""

    SECTION: ClassVar[str] = "roi"

    batch_per_image: int = setting(512, min_value=1)  # paper: 512 RoIs per image
    positive_fraction: float = setting(0.25, **_FRACTION)  # paper: 25% foreground
    fg_iou: float = setting(0.5, **_UNIT)
    pool_size: int = setting(7, min_value=1)
    mask_pool_size: int = setting(14, min_value=1)  # 28x28 masks
    mask_loss_weight: float = setting(1.0, min_value=0.0)
    # Weight of the box-regression loss (summed over foreground RoIs, divided by all sampled
    # RoIs).
    box_loss_weight: float = setting(1.0, min_value=0.0, older=1.0)
    # "l1": L1 on the deltas encoded with weights (10, 10, 5, 5) (the authors'); "giou":
    # 1 - GIoU of the decoded box with its gt (scale-free, weighs every pixel of error alike).
    box_loss: str = setting("l1", choices=ROI_BOX_LOSSES, older="l1")
    # Classification cross-entropy of background RoIs x 0.9, the loss still averaged over RoIs
    # (the authors' frcnn_background_weight; 1.0 = unweighted, this project's before).
    background_weight: float = setting(0.9, min_value=0.0, older=1.0)
    # Cascade R-CNN: the foreground IoU of each box-head stage after the first (each stage has
    # its own head, trained on the previous stage's regressed boxes re-matched at this IoU;
    # Cascade R-CNN's (0.6, 0.7) after 0.5). Stage k's deltas are encoded with weights
    # (k + 1) x (10, 10, 5, 5) and its losses weighted 0.5**k, as in that paper. () = one
    # head (the authors').
    cascade_ious: tuple[float, ...] = setting(
        (), min_value=0.0, max_value=1.0, min_exclusive=True, max_exclusive=True, older=()
    )


@dataclasses.dataclass(frozen=True)
class HeadSettings(Section):
    """`head.*`: the box/class and mask heads."""

    SECTION: ClassVar[str] = "head"

    conv_dim: int = setting(256, min_value=1)
    num_convs: int = setting(4, min_value=0)  # paper: 4 convs + 1 FC
    fc_dim: int = setting(1024, min_value=1)
    mask_conv_dim: int = setting(256, min_value=1)
    mask_num_convs: int = setting(4, min_value=0)
    # logits = cos / (base_temperature / exp(learnable scale))
    base_temperature: float = setting(0.01, min_value=0.0, min_exclusive=True)
    # Background row of the classifier: "text" (the authors') = the text tower's embedding of the
    # name "." through text.templates, fixed (stored in the bg_embedding parameter, no gradient);
    # "learned" = bg_embedding trained freely (this project's before). Same parameters either
    # way. The VLM's softmax uses the same background row.
    background: str = setting("text", choices=BACKGROUND_MODES, older="learned")


@dataclasses.dataclass(frozen=True)
class InferSettings(Section):
    """`infer.*`: test-time proposals, NMS, VLM region scores and score fusion."""

    SECTION: ClassVar[str] = "infer"

    pre_nms_top_k: int = setting(1000, min_value=1)
    post_nms_top_k: int = setting(1000, min_value=1)
    # Test-time proposal NMS: 1.0 = none, the top-k by objectness (the authors'
    # obj_rpn_nms_threshold_test); training uses rpn.nms_iou (as older runs did at test time).
    proposal_nms_iou: float = setting(
        1.0, min_value=0.0, max_value=1.0, min_exclusive=True, older_from="rpn.nms_iou"
    )
    # Passes of the box head at test time: each pools the previous pass's boxes and regresses
    # them again (iterative box regression); the detector's class probabilities are the mean
    # of the passes' (Cascade R-CNN's test-time ensemble, here with one head). 1: one pass (the
    # authors').
    box_passes: int = setting(1, min_value=1, older=1)
    nms_iou: float = setting(0.5, min_value=0.0, max_value=1.0, min_exclusive=True)  # paper
    # Box voting after NMS (ops.nms.vote_boxes): each detection's box becomes the score-weighted
    # mean of the boxes overlapping it with IoU >= this, by their score for its class. None: off
    # (the authors' inference has none).
    box_voting_iou: float | None = setting(None, min_value=0.0, max_value=1.0, older=None)
    max_detections: int = setting(300, min_value=1)  # paper: 300
    score_threshold: float = setting(0.0)
    vlm_box_scale: float = setting(0.7, min_value=0.0, min_exclusive=True)  # shrink before pooling
    # The VLM logits' temperature; None: the pretrained model's learned one.
    vlm_temperature: float | None = setting(0.01, min_value=0.0, min_exclusive=True)
    w_base: float = setting(0.35, **_UNIT)  # paper
    w_novel: float = setting(0.65, **_UNIT)  # paper
    objectness_exponent: float = setting(3.0, min_value=0.0)  # paper
    # Score fusion (detection.score_fusion): "authors" = softmaxes over [background, classes],
    # geometric ensemble on every column, the detector's background probability put back and each
    # RoI renormalised, then x objectness^3; "classes_only" = the VLM softmax over the classes only,
    # no renormalisation (this project's before).
    fusion: str = setting("authors", choices=FUSION_MODES, older="classes_only")
    # Boxes the VLM pools from (after vlm_box_scale): "proposals" (the authors') | "refined" (the
    # detector's regressed boxes; this project's before).
    vlm_pool_boxes: str = setting("proposals", choices=VLM_POOL_BOXES, older="refined")
    # Frozen VLM tower at detection resolution: window attention in every block but those of
    # vlm_global_blocks (negative indices count from the end; the authors' frozen-backbone layout
    # keeps the last block global), with windows of vlm_window_size patches (None: the detector's
    # det.window_size); False = global attention everywhere (this project's before).
    vlm_window_attention: bool = setting(True, older=False)
    vlm_window_size: int | None = setting(None, min_value=1, older=None)
    vlm_global_blocks: tuple[int, ...] = setting((-1,), older=(-1,))


@dataclasses.dataclass(frozen=True)
class TextSettings(Section):
    """`text.*`: how category names become classifier rows."""

    SECTION: ClassVar[str] = "text"

    templates: str = setting("vild", choices=tuple(PROMPT_ENSEMBLES))  # prompt ensemble
    # A saved classifier prefix (python -m rovit_jax.classifier) for the evaluation vocabulary;
    # "" = computed from the category names with `templates`.
    classifier: str = setting("", older="")


@dataclasses.dataclass(frozen=True)
class InitSettings(Section):
    """`init.*`: where the pretrained towers (and optionally a finetuned detector) come from."""

    SECTION: ClassVar[str] = "init"

    # A pretraining run's workdir ("" = <workdir>/pretrain); with run_pretraining, a missing
    # pretraining run is trained first from the config's `pretrain` section.
    pretrain_workdir: str = setting("", older="")
    # The pretraining checkpoint to start from; None = the run's latest (e.g. a point of a
    # pretraining-length curve: benchmarks/ablations.py).
    pretrain_step: int | None = setting(None, min_value=0, older=None)
    run_pretraining: bool = setting(False, older=False)
    # A finetuned detector run to start from (evaluation with another vocabulary, e.g.
    # LVIS -> Objects365 transfer with total_steps = 0); "" = from the pretrained backbone.
    detector_workdir: str = setting("", older="")


@dataclasses.dataclass(frozen=True)
class DetectEvalSettings(Section):
    """`eval.*` of detection: the held-out images evaluated and drawn."""

    SECTION: ClassVar[str] = "eval"

    batch_size: int = setting(8, min_value=1)
    num_images: int = setting(0, min_value=0, older=0)  # 0 = the whole evaluation split
    render_images: int = setting(4, min_value=0, older=0)  # drawn to <workdir>/detections.png
    render_min_score: float = setting(0.3, min_value=0.0, older=0.3)  # lower ones not drawn


@dataclasses.dataclass(frozen=True)
class DetectOptimSettings(OptimSettings):
    """`optim.*` of detection finetuning: `OptimSettings` with detection's defaults."""

    lr: float = redefault(OptimSettings, "lr", 1e-4)  # unverified
    warmup_steps: int = redefault(OptimSettings, "warmup_steps", 250)
    weight_decay: float = redefault(OptimSettings, "weight_decay", 0.1)  # ViTDet-style, unverified
    # No weight decay on the backbone (the authors' weight_decay_loss_wrapper.exclude holds
    # 'vision_model'); drop r"^backbone/" to decay it too.
    no_decay: tuple[str, ...] = redefault(
        OptimSettings, "no_decay", NO_DECAY + (r"bg_embedding", r"cls_log_scale", r"^backbone/")
    )
    # paper: backbone lr x0.1 (unverified)
    lr_mults: tuple[tuple[str, float], ...] = redefault(
        OptimSettings, "lr_mults", ((r"^backbone/", 0.1),)
    )
    # Gradients scaled before clipping and AdamW: the authors' submodule_gradient_scaling
    # {'vision_model': 0.6} (BACKBONE_LR_SCALE). Their optimizer is SGD momentum, where this is a
    # backbone lr x0.6; AdamW divides by the gradient's running RMS, so here it only changes the
    # backbone's share of the clip_norm global norm (and eps): nearly a no-op. The backbone lr
    # multiplier is lr_mults.
    grad_scales: tuple[tuple[str, float], ...] = redefault(
        OptimSettings, "grad_scales", ((r"^backbone/", 0.6),)
    )


@dataclasses.dataclass(frozen=True)
class DetectRunSettings(RunSettings):
    """The run keys with detection's defaults (`detect_config.add_run_settings` puts them in)."""

    total_steps: int = redefault(RunSettings, "total_steps", 46_000)  # unverified (LVIS, ViTDet)
    batch_size: int = redefault(RunSettings, "batch_size", 256)  # unverified
    checkpoint_every: int = redefault(RunSettings, "checkpoint_every", 1000)


DETECTION_SECTIONS = (
    DetectionDataSettings,  # before its subsection
    WorldSettings,
    DetSettings,
    RPNSettings,
    RoISettings,
    HeadSettings,
    InferSettings,
    TextSettings,
    InitSettings,
    DetectEvalSettings,
    DetectOptimSettings,
)

# {dotted key: value} for run configs written before these fields existed.
OLDER_DEFAULTS: dict[str, Any] = {
    k: v for cls in DETECTION_SECTIONS for k, v in older_defaults(cls).items()
}


def detection_settings(config: Any) -> dict[str, Any]:
    """{section: typed settings} of `config`; ConfigError listing every problem otherwise."""
    return resolved_sections(DETECTION_SECTIONS, config)
