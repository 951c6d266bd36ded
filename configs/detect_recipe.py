"""Shared parts of the paper's detection recipes (LVIS, OV-COCO, Objects365 transfer).

Not a config itself: `lvis_detect.py`, `ov_coco_detect.py` and `objects365_transfer.py` build on
`recipe()` and share the `small` CPU smoke mode of `make_small()`.

`recipe()` also stores the pretraining recipe of the same variant as `c.pretrain`
(configs/vit_b16_224_pretrain.py). A detection run reads its backbone's settings from the
pretraining run's own config.json, not from there; `c.pretrain` is what `init.run_pretraining`
would train and what `python -m rovit_jax.plan` sizes the backbone and text embeddings from.

Parallelism and memory arguments of `recipe()` (see rovit_jax.train.layouts):
  layout  data (default: batch split over every device, state replicated) | fsdp (batch, parameters
          and optimizer state split over every device) | fsdp_tp (fsdp x Megatron tensor
          parallelism of the backbone over a `model` axis of `tp` devices)
  tp      size of the `model` axis with layout=fsdp_tp (default 1)
  remat   none (default) | full | dots: rematerialise each backbone block in the backward pass
  dtype   float32 (default) | bfloat16 compute; parameters and optimizer state stay float32
"""

from rovit_jax.config_files import load_sibling
from rovit_jax.detect_config import detect_defaults
from rovit_jax.train.layouts import apply_layout

vit_b16_224_pretrain = load_sibling(__file__, "vit_b16_224_pretrain")

# ViTDet global-attention blocks (0-based): blocks 3/6/9/12 of B/16, 6/12/18/24 of L/16.
GLOBAL_BLOCKS = {"B/16": (2, 5, 8, 11), "L/16": (5, 11, 17, 23)}


def recipe(
    variant: str,
    batch: int,
    steps: int,
    *,
    layout: str = "data",
    tp: int = 1,
    remat: str = "none",
    dtype: str = "float32",
):
    """The 1024 px ViTDet-style recipe for a pretrained `variant` backbone."""
    if variant not in GLOBAL_BLOCKS:
        raise ValueError(
            f"config argument `variant`={variant!r}: choose one of {sorted(GLOBAL_BLOCKS)}"
        )
    if tp != 1 and layout != "fsdp_tp":
        raise ValueError(f"config argument `tp`={tp} needs layout=fsdp_tp (got {layout!r})")
    c = detect_defaults()
    c.batch_size = batch
    c.total_steps = steps
    c.det.global_blocks = GLOBAL_BLOCKS[variant]
    c.init.run_pretraining = False
    c.pretrain = vit_b16_224_pretrain.get_config(f"variant={variant}")
    apply_layout(c, layout, tp)
    c.remat = remat
    c.compute_dtype = dtype
    return c


def make_small(c):
    """A few steps of a tiny detector at 64 px (backbone of a `small` pretraining run, mu/8)."""
    c.pretrain = vit_b16_224_pretrain.get_config("small")
    c.total_steps = 2
    c.batch_size = 2
    c.log_every = 1
    c.checkpoint_every = 2
    c.optim.warmup_steps = 1
    c.det.image_size = 64
    c.det.max_instances = 8
    c.det.window_size = 4
    c.det.global_blocks = (1,)
    c.det.min_level = 3
    c.det.max_level = 5
    c.det.fpn_channels = 16
    c.rpn.anchor_size = 2.0
    c.rpn.batch_per_image = 32
    c.rpn.pre_nms_top_k = 64
    c.rpn.post_nms_top_k = 32
    c.roi.batch_per_image = 16
    c.head.conv_dim = 16
    c.head.num_convs = 1
    c.head.fc_dim = 32
    c.head.mask_conv_dim = 16
    c.head.mask_num_convs = 1
    c.infer.pre_nms_top_k = 64
    c.infer.post_nms_top_k = 32
    c.infer.max_detections = 20
    c.infer.vlm_temperature = None  # a tiny model's learned scale, not CLIP's 0.01
    c.eval.batch_size = 2
    c.eval.num_images = 0
    return c
