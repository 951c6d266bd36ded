"""Defaults for every pretraining config field; configs/ files override what they change.

Each field the paper names carries the paper's value (PAPER.md); values the paper does not state
are marked "unverified" where they matter.
"""

from __future__ import annotations

import ml_collections

from rovit_jax.config_sections import add_sections
from rovit_jax.pretrain_settings import PRETRAIN_SECTIONS
from rovit_jax.run_config import add_run_settings
from rovit_jax.train.optim import NO_DECAY  # noqa: F401  (its home before optim was typed)


def pretrain_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "pretrain"
    # steps, batch, seed, logging, checkpoints, guard, mesh, sharding, dtype, remat, ...
    add_run_settings(c)
    c.scan_layers = False  # one nn.scan over the blocks: faster compiles, stacked parameters

    c.data = ml_collections.ConfigDict()
    c.data.name = "shapes_world"  # see rovit_jax.data.sources.PRETRAIN_DATASETS
    c.data.data_dir = ml_collections.FieldReference(
        None, field_type=str
    )  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.world = ml_collections.ConfigDict(
        dict(
            image_size=128, num_train=6000, num_validation=500, num_test=500, max_objects=6, seed=0
        )
    )
    c.data.tfds_name = ""  # with name="tfds": a builder stored as array_record
    c.data.train_files = ""  # with name="web_shards": folder, glob or {000..099} pattern
    c.data.annotations = ""  # with name="coco_captions" / "karpathy": the captions JSON
    c.data.images = ""  # ... and their image folder
    c.data.num_workers = 1  # threads indexing web shards and decoding each host's batch
    c.data.shard_image_key = "jpg"  # img2dataset's feature names in web shards
    c.data.shard_caption_key = "txt"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_key = "image"  # tfds feature names
    c.data.caption_key = "caption"
    # Retrieval evaluation data; name "" = the training data's eval_split. The other fields
    # override the training data's (e.g. name="karpathy", annotations=..., images=..., split).
    c.data.eval = ml_collections.ConfigDict(
        dict(name="", tfds_name="", annotations="", images="", split="")
    )

    # model (image and text towers), loss, cpe, pp, tokenizer, eval and optim: defaults, allowed
    # values and bounds are the typed sections of rovit_jax.pretrain_settings (optim:
    # rovit_jax.train.optim).
    add_sections(c, PRETRAIN_SECTIONS)
    return c
