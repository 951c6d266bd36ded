r"""RO-ViT pretraining recipe at 224 px: ViT-B/16 (ablation setting) or ViT-L/16.

  # img2dataset TFRecord shards, Flickr30k (Karpathy split) retrieval as evaluation:
  python -m rovit_jax.main --config=configs/vit_b16_224_pretrain.py:data=web_shards \
      --config.data.train_files='gs://bucket/laion/{00000..09999}.tfrecord' \
      --config.data.eval.name=karpathy --config.data.eval.annotations=dataset_flickr30k.json \
      --config.data.eval.images=flickr30k-images \
      --config.tokenizer.model_path=spm64k.model --workdir=gs://bucket/rovit_b16

  # ViT-L/16 main model: --config=configs/vit_b16_224_pretrain.py:variant=L/16,batch=16384

  # Does L/16 at batch 16384 fit on 256 devices? (compiles the step, prints memory per device)
  python -m rovit_jax.plan --devices=256 \
      --config=configs/vit_b16_224_pretrain.py:variant=L/16,batch=16384,layout=fsdp,remat=full \
      --config.compute_dtype=bfloat16

Paper values (PAPER.md): CPE with RRC boxes (scale [0.1, 1], ratio [0.5, 2]) over the PE upsampled
to 64x64 (the 1024 px detection grid), focal sigmoid loss (alpha 0.5, gamma 1), GAP pooling, no
CLS token, 224 px, batch 4096 for ablations and 16384 for the main models. Unverified: the text
tower (12 layers, length 64, 64k SentencePiece vocabulary, from the authors' sibling code), the
optimizer (AdamW; lr, warmup, weight decay below), the step count, the embedding width and the
image augmentation (a mild random resized crop and a horizontal flip).

Arguments: `batch`, `steps`, `loss`, `cpe`, `variant` (B/16 | L/16), `data` (tfds | web_shards |
coco_captions | karpathy), `cpu` (B/16 at batch 8 on the shapes world: step benchmarks on a CPU)
and `small` (a tiny model, batch and step count with the configured data: a smoke run of the
recipe on a CPU). Parallelism and memory (rovit_jax.train.layouts, rovit_jax.plan):
  layout  data (default: batch split over every device, state replicated) | fsdp (batch, parameters
          and optimizer state split over every device) | fsdp_tp (fsdp x Megatron tensor
          parallelism over a `model` axis of `tp` devices); sets `mesh`, `sharding_rules` and
          `logical_axis_rules`
  tp      size of the `model` axis with layout=fsdp_tp (default 1; must divide the head counts
          and MLP widths of both towers)
  remat   none (default) | full (recompute each transformer block in the backward pass) | dots
          (keep the matmul outputs, recompute the rest)
  scan    scan the transformer blocks with one nn.scan (stacked parameters, faster compiles)
  dtype   float32 (default) | bfloat16: activations and matmuls; parameters and optimizer state
          stay float32
"""

from rovit_jax.config_args import parse_arg
from rovit_jax.pretrain_config import pretrain_defaults
from rovit_jax.train.layouts import apply_layout

TEXT_TOWER = {"B/16": "B", "L/16": "L"}


def get_config(arg=None):
    a = parse_arg(
        arg,
        batch=4096,
        steps=100_000,
        loss="focal",
        cpe=True,
        variant="B/16",
        data="tfds",
        cpu=False,
        small=False,
        layout="data",
        tp=1,
        remat="none",
        scan=False,
        dtype="float32",
    )
    if a.tp != 1 and a.layout != "fsdp_tp":
        raise ValueError(f"config argument `tp`={a.tp} needs layout=fsdp_tp (got {a.layout!r})")
    c = pretrain_defaults()
    apply_layout(c, a.layout, a.tp)
    c.remat = a.remat
    c.scan_layers = a.scan
    c.compute_dtype = a.dtype
    c.total_steps = a.steps
    c.batch_size = a.batch
    c.model.image.variant = a.variant
    c.model.text.variant = TEXT_TOWER.get(a.variant, a.variant.split("/")[0])
    c.pp.image_size = 224
    # Random resized crop + horizontal flip of web images (the paper states neither; unverified).
    c.pp.crop_scale = (0.9, 1.0)
    c.pp.flip = True
    c.cpe.enabled = a.cpe
    c.cpe.up_size = 64  # 1024 / 16
    c.loss.kind = a.loss

    c.data.name = a.data
    c.data.num_workers = 16  # shard indexing threads
    c.optim.lr = 5e-4  # unverified
    c.optim.warmup_steps = 10_000  # unverified
    c.optim.weight_decay = 1e-4  # unverified
    c.checkpoint_every = 2000
    c.log_every = 100
    c.eval_every = 10_000

    if a.cpu:
        c.batch_size = min(a.batch, 8)
        c.data.name = "shapes_world"
        c.tokenizer.max_len = 32
        c.tokenizer.vocab_size = 512
        c.eval.batch_size = 256
    if a.small:
        c.model.image.variant = "mu/8"
        c.model.text.variant = "mu"
        c.model.embed_dim = 32
        c.pp.image_size = 32
        c.cpe.up_size = 8
        c.tokenizer.max_len = 16
        c.tokenizer.vocab_size = 512
        c.batch_size = 8
        c.total_steps = 2
        c.eval_every = 0
        c.log_every = 1
        c.checkpoint_every = 2
        c.optim.warmup_steps = 1
        c.eval.batch_size = 8
        c.data.num_workers = 1
    return c
