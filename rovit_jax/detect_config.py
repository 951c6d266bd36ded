"""Defaults for every detection-finetuning config field (paper values where the paper names one).

See PAPER.md in the project's design notes; "unverified" marks values the paper does not state.
"""

from __future__ import annotations

import ml_collections

from rovit_jax.config_sections import add_sections
from rovit_jax.detection.settings import DETECTION_SECTIONS
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

    # det, rpn, roi, head, infer, text, init and eval: defaults, allowed values and bounds are
    # the typed sections of rovit_jax.detection.settings.
    add_sections(c, DETECTION_SECTIONS)

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

    return c
