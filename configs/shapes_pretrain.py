r"""Region-aware pretraining on the generated shapes world: the embedded default, CPU-sized.

  python -m rovit_jax.main --config=configs/shapes_pretrain.py --workdir=/tmp/rovit_shapes

Arguments (`--config=configs/shapes_pretrain.py:steps=300,loss=softmax,cpe=False`):
  steps, batch, loss (focal|sigmoid|softmax), cpe (bool), seed, variant (ViT), text (text tower),
  num_train, tiny (bool: a seconds-long smoke run on a 64-image world, for tests).

The world is rendered at 128 px; pretraining sees whole images at 64 px (an 8x8 patch grid), while
the PE is upsampled to the 32x32 grid detection will use at 256 px, mirroring the paper's
224 px pretraining / 1024 px detection (14x14 -> 64x64).
"""

from rovit_jax.config_args import parse_arg
from rovit_jax.pretrain_config import pretrain_defaults


def get_config(arg=None):
    a = parse_arg(
        arg,
        steps=600,
        batch=64,
        loss="focal",
        cpe=True,
        seed=0,
        variant="pico/8",
        text="pico",
        num_train=6000,
        tiny=False,
    )
    c = pretrain_defaults()
    c.seed = a.seed
    c.total_steps = a.steps
    c.batch_size = a.batch
    c.log_every = 25
    c.checkpoint_every = 200
    c.keep_checkpoints = 2

    c.data.world.update(image_size=128, num_train=a.num_train, num_validation=500, num_test=500)
    c.tokenizer.max_len = 32
    c.tokenizer.vocab_size = 512
    c.pp.image_size = 64

    c.model.image.variant = a.variant
    c.model.text.variant = a.text
    c.model.embed_dim = 128
    c.model.bias_init = -10.0  # A bias keeps the many easy negatives of a small batch quiet early.

    c.cpe.enabled = a.cpe
    c.cpe.up_size = 32
    c.loss.kind = a.loss

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 1e-4
    c.eval.batch_size = 256

    if a.tiny:
        c.total_steps = 12
        c.batch_size = 16
        c.log_every = 2
        c.checkpoint_every = 6
        c.optim.warmup_steps = 2
        c.model.image.variant = "mu/8"
        c.model.text.variant = "mu"
        c.model.embed_dim = 32
        c.data.world.update(image_size=64, num_train=64, num_validation=16, num_test=32)
        c.pp.image_size = 32
        c.cpe.up_size = 16
        c.eval.batch_size = 16
    return c
