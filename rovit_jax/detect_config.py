"""Defaults for every detection-finetuning config field (paper values where the paper names one).

See PAPER.md in the project's design notes; "unverified" marks values the paper does not state.
"""

from __future__ import annotations

import ml_collections

from rovit_jax.config_sections import add_sections
from rovit_jax.detection.settings import DETECTION_SECTIONS, DetectRunSettings
from rovit_jax.run_config import add_run_settings


def detect_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "detect"
    # steps, batch, seed, logging, checkpoints, guard, mesh, sharding, dtype, remat, ...
    add_run_settings(c, DetectRunSettings)

    # Where the pretrained towers come from: a pretraining run's workdir ("" = <workdir>/pretrain).
    # With run_pretraining, a missing pretraining run is trained first from `c.pretrain`.
    c.pretrain = ml_collections.ConfigDict()  # a full pretraining config when run_pretraining

    # data (data.world), det, rpn, roi, head, infer, text, init, eval and optim: defaults,
    # allowed values and bounds are the typed sections of rovit_jax.detection.settings (data:
    # rovit_jax.data.settings).
    add_sections(c, DETECTION_SECTIONS)

    return c
