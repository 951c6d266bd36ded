"""Defaults for every detection-finetuning config field (paper values where the paper names one).

See PAPER.md in the project's design notes; "unverified" marks values the paper does not state.
"""

from __future__ import annotations

import ml_collections

from rovit_jax.pretrain_config import NO_DECAY
from rovit_jax.run_config import add_run_settings


def detect_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "detect"
    c.total_steps = 46_000  # unverified (LVIS, ViTDet-style schedule)
    c.batch_size = 256  # unverified
    c.checkpoint_every = 1000
    add_run_settings(c)  # seed, logging, checkpoints, guard, mesh, sharding, dtype, remat, ...

    # Where the pretrained towers come from: a pretraining run's workdir ("" = <workdir>/pretrain).
    # With run_pretraining, a missing pretraining run is trained first from `c.pretrain`.
    c.init = ml_collections.ConfigDict()
    c.init.pretrain_workdir = ""
    c.init.run_pretraining = False
    # A finetuned detector run to start from (evaluation with another vocabulary, e.g.
    # LVIS -> Objects365 transfer with total_steps = 0); "" = from the pretrained backbone.
    c.init.detector_workdir = ""
    c.pretrain = ml_collections.ConfigDict()  # a full pretraining config when run_pretraining

    c.data = ml_collections.ConfigDict()
    c.data.name = "shapes_world"  # see rovit_jax.data.sources.DETECTION_DATASETS
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.world = ml_collections.ConfigDict(
        dict(
            image_size=128, num_train=6000, num_validation=500, num_test=500, max_objects=6, seed=0
        )
    )
    c.data.train_split = "train"
    c.data.eval_split = "test"
    # COCO-format datasets ("lvis", "coco", "ov_coco", "objects365", "tfds_coco" for evaluation):
    # the annotation JSONs and image folders (LVIS: the COCO root holding train2017/, val2017/).
    c.data.train_annotations = ""
    c.data.train_images = ""
    c.data.eval_annotations = ""
    c.data.eval_images = ""
    c.data.num_workers = 1  # threads decoding and augmenting each host's batch
    c.data.with_masks = True  # box-only datasets (objects365, tfds_coco) never have masks
    # Categories held out of detection training (novel): LVIS frequency groups listed here
    # (OV-COCO marks its 17 novel categories "r").
    c.data.novel_frequencies = ("r",)

    c.det = ml_collections.ConfigDict()
    c.det.image_size = 1024  # paper: 1024 px
    c.det.scale_range = (0.1, 2.0)  # large-scale jitter
    c.det.flip = True
    c.det.max_instances = 300  # the authors' MAX_NUM_INSTANCES (fvlm dito_train_and_eval.gin)
    c.det.mask_stride = 4  # gt instance masks kept at image_size / mask_stride for mask targets
    c.det.window_size = 16  # ViTDet windows: 64x64 grid at 1024/16 -> 4x4 windows
    c.det.global_blocks = (2, 5, 8, 11)  # blocks 3, 6, 9, 12 of B/16 (0-based)
    c.det.min_level = 2
    c.det.max_level = 5
    c.det.fpn_channels = 256

    c.rpn = ml_collections.ConfigDict()
    c.rpn.objectness = "centerness"  # "centerness" (localization quality, paper) | "binary"
    c.rpn.anchor_size = 8.0  # anchor side = anchor_size * stride
    # The authors': one anchor per location with centerness (maskrcnn_map_fn.aspect_ratios =
    # [1.0]; their parser refuses more); (0.5, 1.0, 2.0) is Faster R-CNN's (this project's before).
    c.rpn.aspect_ratios = (1.0,)
    # Box targets (centerness) / sampled objectness (binary, centerness "positives"): anchors with
    # IoU >= fg_iou, plus each gt's best anchor, are positive, < bg_iou negative.
    c.rpn.fg_iou = 0.7
    c.rpn.bg_iou = 0.3
    c.rpn.batch_per_image = 256  # also the normaliser of the RPN losses (the authors' 256)
    c.rpn.positive_fraction = 0.5
    c.rpn.pre_nms_top_k = 2000
    c.rpn.nms_iou = 0.7  # paper: proposal NMS 0.7 in training
    c.rpn.post_nms_top_k = 1000
    # Proposal NMS inside each pyramid level, then the overall top post_nms_top_k (the authors'
    # multilevel_propose_rois); False: one NMS over all levels together (this project's before).
    c.rpn.per_level_nms = True
    # Centerness objectness training (rpn.objectness = "centerness"), rcnn.rpn_loss_single:
    #   "all_sampled" (the authors' RpnAnchorCenternessLabeler + RpnCenterLoss): anchors matched at
    #     IoU >= centerness_fg_iou (plus each gt's best anchor) regress sigmoid(objectness) with L1
    #     to the centerness of their centre in the gt (0 outside it), anchors below
    #     centerness_bg_iou to 0, on a sample of centerness_batch_per_image anchors with at most
    #     centerness_positive_fraction positives; / centerness_batch_per_image.
    #   "positives": centerness on the sampled positives only, / their number (background never
    #     ranked down; this project's before, with box_loss "giou", weight 1, coding "log").
    c.rpn.centerness_loss = "all_sampled"
    c.rpn.centerness_fg_iou = 0.3  # the authors' rpn_center_match_threshold
    c.rpn.centerness_bg_iou = 0.1  # the authors' rpn_center_unmatched_threshold
    c.rpn.centerness_batch_per_image = 256  # the authors' rpn_center_batch_size_per_im
    c.rpn.centerness_positive_fraction = 255 / 256  # the authors' rpn_center_fg_fraction
    # Box loss of the centerness RPN: weight * (1 - IoU) of the decoded box with its gt, summed
    # over the positive anchors (all of them with "all_sampled") (the authors' RpnBoxIoULoss:
    # plain IoU, weight 8). "giou": 1 - GIoU.
    c.rpn.box_loss = "iou"
    c.rpn.box_loss_weight = 8.0
    # Box outputs (l, t, r, b) from the anchor centre: "linear" in units of the anchor's size (the
    # authors' LRTB coder) | "log": log-multiples of the anchor's half sizes.
    c.rpn.box_coding = "linear"

    c.roi = ml_collections.ConfigDict()
    c.roi.batch_per_image = 512  # paper: 512 RoIs per image
    c.roi.positive_fraction = 0.25  # paper: 25% foreground
    c.roi.fg_iou = 0.5
    c.roi.pool_size = 7
    c.roi.mask_pool_size = 14  # 28x28 masks
    c.roi.mask_loss_weight = 1.0
    # Weight of the box-regression L1 (summed over foreground RoIs, divided by all sampled RoIs).
    c.roi.box_loss_weight = 1.0
    # Classification cross-entropy of background RoIs x 0.9, the loss still averaged over RoIs
    # (the authors' frcnn_background_weight; 1.0 = unweighted, this project's earlier default).
    c.roi.background_weight = 0.9

    c.head = ml_collections.ConfigDict()
    c.head.conv_dim = 256
    c.head.num_convs = 4  # paper: 4 convs + 1 FC
    c.head.fc_dim = 1024
    c.head.mask_conv_dim = 256
    c.head.mask_num_convs = 4
    c.head.base_temperature = 0.01  # logits = cos / (0.01 / exp(learnable scale))
    # Background row of the classifier: "text" (the authors') = the text tower's embedding of the
    # name "." through text.templates, fixed (stored in the bg_embedding parameter, no gradient);
    # "learned" = bg_embedding trained freely (this project's earlier default). Same parameters
    # either way. The VLM's softmax uses the same background row.
    c.head.background = "text"

    c.text = ml_collections.ConfigDict()
    c.text.templates = "vild"  # prompt ensemble name in detection.text_classifier
    # A saved classifier prefix (python -m rovit_jax.classifier) for the evaluation vocabulary;
    # "" = computed from the category names with `templates`.
    c.text.classifier = ""

    c.infer = ml_collections.ConfigDict()
    c.infer.pre_nms_top_k = 1000
    c.infer.post_nms_top_k = 1000
    # Test-time proposal NMS: 1.0 = none, the top-k by objectness (the authors'
    # obj_rpn_nms_threshold_test); training uses rpn.nms_iou.
    c.infer.proposal_nms_iou = 1.0
    c.infer.nms_iou = 0.5  # paper: per-class NMS 0.5
    c.infer.max_detections = 300  # paper: 300
    c.infer.score_threshold = 0.0
    c.infer.vlm_box_scale = 0.7  # boxes shrunk about their centre before VLM pooling
    c.infer.vlm_temperature = ml_collections.FieldReference(0.01, field_type=float)  # None: learned
    c.infer.w_base = 0.35  # paper
    c.infer.w_novel = 0.65  # paper
    c.infer.objectness_exponent = 3.0  # paper
    # Score fusion (detection.score_fusion): "authors" = softmaxes over [background, classes],
    # geometric ensemble on every column, the detector's background probability put back and each
    # RoI renormalised, then x objectness^3; "classes_only" = the VLM softmax over the classes only,
    # no renormalisation (this project's earlier formula).
    c.infer.fusion = "authors"
    # Boxes the VLM pools from (after vlm_box_scale): "proposals" (the authors') | "refined" (the
    # detector's regressed boxes; this project's earlier choice).
    c.infer.vlm_pool_boxes = "proposals"
    # Frozen VLM tower at detection resolution: window attention in every block but those of
    # vlm_global_blocks (negative indices count from the end; the authors' frozen-backbone layout
    # keeps the last block global), with windows of vlm_window_size patches (None: the detector's
    # det.window_size); False = global attention everywhere.
    c.infer.vlm_window_attention = True
    c.infer.vlm_window_size = ml_collections.FieldReference(None, field_type=int)
    c.infer.vlm_global_blocks = (-1,)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4  # unverified
    c.optim.warmup_steps = 250
    c.optim.schedule = "cosine"
    c.optim.end_lr_fraction = 0.0
    c.optim.weight_decay = 0.1  # ViTDet-style (unverified for RO-ViT)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0
    # No weight decay on the backbone (the authors' weight_decay_loss_wrapper.exclude holds
    # 'vision_model'); drop r"^backbone/" to decay it too.
    c.optim.no_decay = list(NO_DECAY) + [r"bg_embedding", r"cls_log_scale", r"^backbone/"]
    c.optim.frozen = []
    c.optim.lr_mults = [(r"^backbone/", 0.1)]  # paper: backbone lr x0.1 (unverified)
    # Gradients scaled before clipping and AdamW, (regex, factor), first match wins: the authors'
    # submodule_gradient_scaling {'vision_model': 0.6} (BACKBONE_LR_SCALE). Their optimizer is SGD
    # momentum, where this is a backbone lr x0.6; AdamW divides by the gradient's running RMS, so
    # here it only changes the backbone's share of the clip_norm global norm (and eps): nearly a
    # no-op. The backbone lr multiplier is lr_mults.
    c.optim.grad_scales = [(r"^backbone/", 0.6)]

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 8
    c.eval.num_images = 0  # 0 = the whole evaluation split
    c.eval.render_images = 4  # held-out images drawn to detections.png in the workdir
    c.eval.render_min_score = 0.3  # detections scoring below this are not drawn
    return c
