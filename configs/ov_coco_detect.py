r"""Open-vocabulary COCO: train on the 48 base categories, report AP50 on the 17 novel ones.

  python -m rovit_jax.main --config=configs/ov_coco_detect.py \
      --config.init.pretrain_workdir=gs://bucket/rovit_b16_pretrain \
      --config.data.train_annotations=annotations/instances_train2017.json \
      --config.data.train_images=train2017 \
      --config.data.eval_annotations=annotations/instances_val2017.json \
      --config.data.eval_images=val2017 --workdir=gs://bucket/ov_coco_b16

The split is Bansal et al.'s (rovit_jax.data.categories.OV_COCO_BASE / OV_COCO_NOVEL); the 15 other
COCO categories are dropped from training and evaluation. Evaluation is COCO-style; the headline
is `AP50_novel`. The recipe otherwise follows the LVIS one (PAPER.md: the paper reports OV-COCO
with the same detector); schedule values are unverified.

Arguments: `variant` (B/16 | L/16), `batch`, `steps`, `small` (tiny CPU smoke run).
"""

from rovit_jax.config_args import parse_arg
from rovit_jax.config_files import load_sibling

detect_recipe = load_sibling(__file__, "detect_recipe")


def get_config(arg=None):
    a = parse_arg(arg, variant="B/16", batch=64, steps=11_250, small=False)
    c = detect_recipe.recipe(a.variant, a.batch, a.steps)
    c.data.name = "ov_coco"
    c.data.novel_frequencies = ("r",)  # data.sources marks the 17 novel categories "r"
    if a.small:
        detect_recipe.make_small(c)
    return c
