r"""RO-ViT open-vocabulary detection recipe for LVIS v1 at 1024 px (ViT-B/16 or ViT-L/16).

  python -m rovit_jax.main --config=configs/lvis_detect.py:variant=L/16 \
      --config.init.pretrain_workdir=gs://bucket/rovit_l16_pretrain --workdir=gs://bucket/lvis_l16

Paper values (PAPER.md): 1024 px, large-scale jitter 0.1-2.0 with flip, rare categories removed from
training (base = frequent + common, novel = rare), ViTDet window attention with global blocks
3/6/9/12 (B/16) or 6/12/18/24 (L/16), simple feature pyramid P2-P5 (256 ch, LayerNorm), centerness
objectness, 4-conv + FC box head, 512 RoIs at 25% foreground, 28x28 class-agnostic masks,
temperature 0.01, VLM fusion w = 0.35 / 0.65 with objectness^3, per-class NMS 0.5, 300 detections.
Backbone lr x0.1, batch, steps and optimizer values are unverified.

NOTE: the LVIS/COCO readers are not part of this release yet; until they land this config serves
the detection benchmark (model and step shapes) and documents the recipe.
"""

from rovit_jax.config_args import parse_arg
from rovit_jax.detect_config import detect_defaults

GLOBAL_BLOCKS = {"B/16": (2, 5, 8, 11), "L/16": (5, 11, 17, 23)}


def get_config(arg=None):
    a = parse_arg(arg, variant="B/16", batch=256, steps=46_000)
    if a.variant not in GLOBAL_BLOCKS:
        raise ValueError(
            f"config argument `variant`={a.variant!r}: choose one of {sorted(GLOBAL_BLOCKS)}"
        )
    c = detect_defaults()
    c.batch_size = a.batch
    c.total_steps = a.steps
    c.data.name = "lvis"
    c.det.global_blocks = GLOBAL_BLOCKS[a.variant]
    c.init.run_pretraining = False
    return c
