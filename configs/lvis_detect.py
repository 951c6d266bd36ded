r"""RO-ViT open-vocabulary detection recipe for LVIS v1 at 1024 px (ViT-B/16 or ViT-L/16).

  python -m rovit_jax.main --config=configs/lvis_detect.py:variant=L/16 \
      --config.init.pretrain_workdir=gs://bucket/rovit_l16_pretrain \
      --config.data.train_annotations=lvis_v1_train.json --config.data.train_images=coco \
      --config.data.eval_annotations=lvis_v1_val.json --config.data.eval_images=coco \
      --workdir=gs://bucket/lvis_l16

`data.*_images` is the COCO 2017 root holding train2017/ and val2017/ (LVIS images are COCO's).
Paper values (PAPER.md): 1024 px, large-scale jitter 0.1-2.0 with flip, rare categories removed from
training (base = frequent + common, novel = rare), ViTDet window attention with global blocks
3/6/9/12 (B/16) or 6/12/18/24 (L/16), simple feature pyramid P2-P5 (256 ch, LayerNorm), centerness
objectness, 4-conv + FC box head, 512 RoIs at 25% foreground, 28x28 class-agnostic masks,
temperature 0.01, VLM fusion w = 0.35 / 0.65 with objectness^3, per-class NMS 0.5, 300 detections,
federated LVIS evaluation with AP_r. Unverified: backbone lr x0.1, batch, steps, optimizer values.

  # Memory per device of the L/16 recipe on 256 devices (no LVIS, no pretraining run needed):
  python -m rovit_jax.plan --devices=256 \
      --config=configs/lvis_detect.py:variant=L/16,layout=fsdp,remat=full \
      --config.eval.batch_size=256

Start from a public checkpoint imported as a run (README, "Start from SigLIP or CLIP"):

  python -m rovit_jax.main --config=configs/lvis_detect.py:init=clip_b16 ...    # runs/clip_b16
  python -m rovit_jax.main --config=configs/lvis_detect.py:init=siglip_b16 ...  # runs/siglip_b16
  python -m rovit_jax.main --config=configs/lvis_detect.py:init=PATH ...        # any run folder

Arguments: `init` (clip_b16 | siglip_b16: the B/16 backbone of the run that README's import
command writes to runs/<name>; or a run folder's path), `variant` (B/16 | L/16), `batch`,
`steps`, `small` (a tiny CPU smoke run of the recipe
on the configured data, with the backbone of a `small` pretraining run), and for parallelism and
memory (configs/detect_recipe.py, rovit_jax.train.layouts):
  layout  data (default: batch split over every device, state replicated) | fsdp (batch, parameters
          and optimizer state split over every device) | fsdp_tp (fsdp x tensor parallelism over
          a `model` axis of `tp` devices)
  tp      size of the `model` axis with layout=fsdp_tp (default 1)
  remat   none (default) | full | dots: rematerialise each backbone block in the backward pass
  dtype   float32 (default) | bfloat16 compute; parameters and optimizer state stay float32
"""

from rovit_jax.config_args import parse_arg
from rovit_jax.config_files import load_sibling

detect_recipe = load_sibling(__file__, "detect_recipe")


# `init` shorthands: the folders README's import commands write, and their backbone.
IMPORTED_RUNS = {"clip_b16": ("runs/clip_b16", "B/16"), "siglip_b16": ("runs/siglip_b16", "B/16")}


def get_config(arg=None):
    a = parse_arg(
        arg,
        init="",
        variant="B/16",
        batch=256,
        steps=46_000,
        small=False,
        layout="data",
        tp=1,
        remat="none",
        dtype="float32",
    )
    variant = a.variant
    if a.init in IMPORTED_RUNS:
        workdir, variant = IMPORTED_RUNS[a.init]
    else:
        workdir = a.init  # a path, or "" (init.pretrain_workdir given separately)
    c = detect_recipe.recipe(
        variant, a.batch, a.steps, layout=a.layout, tp=a.tp, remat=a.remat, dtype=a.dtype
    )
    if workdir:
        c.init.pretrain_workdir = workdir
    c.data.name = "lvis"
    c.data.novel_frequencies = ("r",)
    if a.small:
        detect_recipe.make_small(c)
    return c
