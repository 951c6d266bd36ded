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

    # data (data.world, data.eval), model (image and text towers), loss, cpe, pp, tokenizer,
    # eval and optim: defaults, allowed values and bounds are the typed sections of
    # rovit_jax.pretrain_settings (data: rovit_jax.data.settings; optim: rovit_jax.train.optim).
    add_sections(c, PRETRAIN_SECTIONS)
    return c
