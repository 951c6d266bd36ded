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

    c.data = ml_collections.ConfigDict()
    c.data.name = "shapes_world"  # see rovit_jax.data.sources.DETECTION_DATASETS
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.world = ml_collections.ConfigDict(
        dict(
            image_size=128, num_train=6000, num_validation=500, num_test=500, max_objects=6, seed=0
        )
    )
    c.data.train_split = "train"
    c.data.eval_split = "test"
    # COCO-format datasets ("lvis", "coco", "ov_coco", "objects365", "tfds_coco" for evaluation):
    # the annotation JSONs and image folders (LVIS: the COCO root holding train2017/, val2017/).
    c.data.train_annotations = ""
    c.data.train_images = ""
    c.data.eval_annotations = ""
    c.data.eval_images = ""
    c.data.num_workers = 1  # threads decoding and augmenting each host's batch
    c.data.with_masks = True  # box-only datasets (objects365, tfds_coco) never have masks
    # Categories held out of detection training (novel): LVIS frequency groups listed here
    # (OV-COCO marks its 17 novel categories "r").
    c.data.novel_frequencies = ("r",)

    # det, rpn, roi, head, infer, text, init, eval and optim: defaults, allowed values and
    # bounds are the typed sections of rovit_jax.detection.settings.
    add_sections(c, DETECTION_SECTIONS)

    return c
