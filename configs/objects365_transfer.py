r"""Zero-shot transfer: an LVIS-trained detector evaluated on Objects365 by swapping the vocabulary.

  python -m rovit_jax.main --config=configs/objects365_transfer.py \
      --config.init.detector_workdir=gs://bucket/lvis_l16 \
      --config.init.pretrain_workdir=gs://bucket/rovit_l16_pretrain \
      --config.data.eval_annotations=objects365_val.json --config.data.eval_images=objects365/val \
      --workdir=gs://bucket/o365_transfer

No training (total_steps = 0): the detector's parameters come from `init.detector_workdir`, the
text classifier is built from the 365 Objects365 names with the same prompt ensemble, and every
category counts as "novel" for fusion (none was seen in detection training). Box AP only
(Objects365 has no masks). The `det.*`, `head.*` and `rpn.*` settings must equal those of the
LVIS run (the same `variant`).

Arguments: `variant` (B/16 | L/16), `small` (tiny CPU smoke run).
"""

from rovit_jax.config_args import parse_arg
from rovit_jax.config_files import load_sibling

detect_recipe = load_sibling(__file__, "detect_recipe")


def get_config(arg=None):
    a = parse_arg(arg, variant="B/16", small=False)
    c = detect_recipe.recipe(a.variant, batch=8, steps=0)
    c.data.name = "objects365"
    c.data.novel_frequencies = ("f",)  # every category is unseen: w_novel for all of them
    if a.small:
        detect_recipe.make_small(c)
    c.total_steps = 0
    return c
