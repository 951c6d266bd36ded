r"""RO-ViT pretraining recipe, ViT-B/16 at 224 px (paper's ablation setting).

  python -m rovit_jax.main --config=configs/vit_b16_224_pretrain.py \
      --config.data.tfds_name=my_image_text --config.tokenizer.model_path=spm64k.model \
      --workdir=gs://bucket/rovit_b16

Paper values: CPE with RRC boxes (scale [0.1, 1], ratio [0.5, 2]) over the PE upsampled to 64x64,
focal sigmoid loss (alpha 0.5, gamma 1), GAP pooling, no CLS token, 224 px, batch 4096 for
ablations (16384 for the main models: unverified). Text tower 12 layers, length 64, 64k
SentencePiece vocabulary (unverified; from the authors' sibling code). Optimizer settings and the
step count are not given in the paper (unverified): AdamW with the values below.

Arguments: `batch`, `steps`, `loss`, `cpe`, `variant` (e.g. L/16), `cpu` (a small batch and a
synthetic-free smoke setup on the shapes world, for benchmarks on this class of machine).
"""

from rovit_jax.config_args import parse_arg
from rovit_jax.pretrain_config import pretrain_defaults


def get_config(arg=None):
    a = parse_arg(arg, batch=4096, steps=100_000, loss="focal", cpe=True, variant="B/16", cpu=False)
    c = pretrain_defaults()
    c.total_steps = a.steps
    c.batch_size = a.batch
    c.model.image.variant = a.variant
    c.model.text.variant = "B" if a.variant.startswith("B") else a.variant.split("/")[0]
    c.pp.image_size = 224
    c.pp.crop_scale = (0.9, 1.0)  # mild RRC on web images (unverified)
    c.cpe.enabled = a.cpe
    c.loss.kind = a.loss

    c.data.name = "tfds"
    c.data.tfds_name = ""  # set to an image-text tfds dataset stored as array_record
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 10_000
    c.optim.weight_decay = 1e-4
    c.checkpoint_every = 2000
    c.log_every = 100
    c.eval_every = 10_000

    if a.cpu:
        c.batch_size = min(a.batch, 8)
        c.data.name = "shapes_world"
        c.tokenizer.max_len = 32
        c.tokenizer.vocab_size = 512
        c.eval.batch_size = 256
    return c
