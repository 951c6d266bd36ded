"""The `data` section of pretraining and detection configs, typed: the dataset names, the fields
each dataset reads, their defaults and their checks, written once.

  data          `ImageTextDataSettings` (pretraining) or `DetectionDataSettings` (detection);
  data.world    `WorldSettings`: the embedded shapes world's generation parameters (its tfds
                builder, `data.shapes_tfds`, takes its defaults and checks from here too);
  data.eval     `RetrievalDataSettings`: pretraining's retrieval-evaluation data.

Types and allowed values are checked whenever a config is resolved. What a dataset needs
(`input_problems`: a tfds name, annotation files, image folders) is checked only where the data
will be read, so memory planning accepts a config whose files live on another machine.
`data.sources` maps the typed sections to readers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from rovit_jax import config_check as cc
from rovit_jax.config_sections import Section, setting

__all__ = [
    "BOX_ONLY_DATASETS",
    "DETECTION_DATASETS",
    "DetectionDataSettings",
    "FREQUENCY_GROUPS",
    "ImageTextDataSettings",
    "PRETRAIN_DATASETS",
    "RetrievalDataSettings",
    "WorldSettings",
]

PRETRAIN_DATASETS = ("shapes_world", "tfds", "web_shards", "coco_captions", "karpathy")
DETECTION_DATASETS = ("shapes_world", "lvis", "coco", "ov_coco", "objects365", "tfds_coco")
# Detection datasets without instance masks, and those with no training split of their own.
BOX_ONLY_DATASETS = ("objects365", "tfds_coco")
EVAL_ONLY_DATASETS = ("objects365",)
FREQUENCY_GROUPS = ("f", "c", "r")  # LVIS: frequent, common, rare

# Keys added after the first release: run configs written before them lack them and ran with
# these values.
_OLDER_EMPTY = dict(older="")


def _shard_files(value: Any) -> None:
    """`data.train_files`: a folder, a glob / {000..099} pattern, or a list of files."""
    if isinstance(value, str):
        return
    if cc.is_list(value) and value and all(isinstance(v, str) and v for v in value):
        return
    raise ValueError("must be a folder, a file pattern or a non-empty list of file paths")


def _frequency_groups(value: tuple[str, ...]) -> None:
    bad = [v for v in value if v not in FREQUENCY_GROUPS]
    if bad:
        raise ValueError(f"{bad} are not frequency groups; use {FREQUENCY_GROUPS}")


@dataclasses.dataclass(frozen=True)
class WorldSettings(Section):
    """`data.world.*`: the shapes world's size and seed (`shapes_tfds.build_shapes_world`); each
    set of values is its own tfds config, built once under the data directory."""

    SECTION: ClassVar[str] = "data.world"

    image_size: int = setting(128, min_value=16)
    num_train: int = setting(6000, min_value=1)
    num_validation: int = setting(500, min_value=1)
    num_test: int = setting(500, min_value=1)
    max_objects: int = setting(6, min_value=1)  # each scene has 1..max_objects objects
    seed: int = setting(0, min_value=0)

    def as_kwargs(self) -> dict[str, int]:
        """The builder's keyword arguments (`shapes_tfds.shapes_builder(data_dir, **kwargs)`)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _DataSettings(Section):
    """What both tasks' `data` sections share."""

    SECTION: ClassVar[str] = "data"

    data_dir: str | None = setting(
        None
    )  # tfds folder; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    train_split: str = setting("train")
    eval_split: str = setting("test")
    num_workers: int = setting(1, min_value=1, older=1)  # threads decoding each host's batch
    # Processes decoding each host's batch (0: none, the threads above do it). Threads share
    # one core through the GIL; a TPU host needs tens of processes to feed its chips.
    worker_processes: int = setting(0, min_value=0, older=0)


@dataclasses.dataclass(frozen=True)
class ImageTextDataSettings(_DataSettings):
    """`data.*` of pretraining: which image-text data, and the fields its reader needs.

    shapes_world   the embedded world (`data.world`);
    tfds           an image-text tfds dataset stored as array_record (`tfds_name`, feature
                   names `image_key` / `caption_key`);
    web_shards     img2dataset-style TFRecord shards (`train_files`; feature names
                   `shard_image_key` / `shard_caption_key`); evaluation needs `data.eval`;
    coco_captions  a COCO captions JSON (`annotations`) and its image folder (`images`);
    karpathy       a Karpathy split JSON (Flickr30k / COCO) and its image folder.
    """

    name: str = setting("shapes_world", choices=PRETRAIN_DATASETS)
    tfds_name: str = setting("", older="")
    train_files: object = setting("", validate=_shard_files, older="")
    annotations: str = setting("", older="")
    images: str = setting("", older="")
    shard_image_key: str = setting("jpg", older="jpg")
    shard_caption_key: str = setting("txt", older="txt")
    image_key: str = setting("image", older="image")
    caption_key: str = setting("caption", older="caption")

    def input_problems(self, problems: cc.Problems, *, prefix: str = "data") -> None:
        """Adds a problem for each field dataset `name` needs that is unset (or, for local
        paths, missing on disk); `prefix` names the section in the problems (data.eval)."""
        needed_for = f"{prefix}.name={self.name!r}"
        if self.name == "tfds" and not self.tfds_name:
            problems.add(f"{prefix}.tfds_name", self.tfds_name, f"is required for {needed_for}")
        elif self.name == "web_shards" and not self.train_files:
            problems.add("data.train_files", self.train_files, f"is required for {needed_for}")
        elif self.name in ("coco_captions", "karpathy"):
            for key, kind in (("annotations", "file"), ("images", "dir")):
                cc.path_problems(
                    problems,
                    f"{prefix}.{key}",
                    getattr(self, key),
                    kind=kind,
                    needed_for=needed_for,
                )

    def for_retrieval(self, retrieval: RetrievalDataSettings) -> tuple[ImageTextDataSettings, str]:
        """(the data retrieval evaluation reads, its split): the training data's `eval_split`
        when `retrieval.name` is "", else the training data with `retrieval`'s fields."""
        if not retrieval.name:
            return self, self.eval_split
        merged = dataclasses.replace(
            self,
            name=retrieval.name,
            tfds_name=retrieval.tfds_name,
            annotations=retrieval.annotations,
            images=retrieval.images,
        )
        return merged, retrieval.split or self.eval_split


@dataclasses.dataclass(frozen=True)
class RetrievalDataSettings(Section):
    """`data.eval.*`: pretraining's retrieval-evaluation data. `name` "" evaluates on the
    training data's `eval_split`; otherwise these fields replace the training data's (e.g.
    name="karpathy", annotations=..., images=..., split="test")."""

    SECTION: ClassVar[str] = "data.eval"

    name: str = setting("", choices=("",) + PRETRAIN_DATASETS, older="")
    tfds_name: str = setting("", older="")
    annotations: str = setting("", older="")
    images: str = setting("", older="")
    split: str = setting("", older="")


@dataclasses.dataclass(frozen=True)
class DetectionDataSettings(_DataSettings):
    """`data.*` of detection: which dataset, its files and which categories are novel.

      shapes_world  the embedded world (`data.world`), with LVIS-style frequency groups;
      lvis          LVIS v1 JSONs + COCO images (federated evaluation; novel = rare);
      coco          COCO instances JSONs + images (all 80 categories base);
      ov_coco       COCO restricted to the 48 base / 17 novel open-vocabulary split;
      objects365    Objects365 JSON + images (evaluation of a transferred vocabulary only);
      tfds_coco     tfds `coco/2017` for training (boxes only), the official JSON for evaluation.
    The COCO-format datasets read `eval_annotations` / `eval_images` (LVIS: the COCO root holding
    train2017/, val2017/), and all but objects365 and tfds_coco `train_annotations` /
    `train_images`.
    """

    name: str = setting("shapes_world", choices=DETECTION_DATASETS)
    train_annotations: str = setting("", older="")
    train_images: str = setting("", older="")
    eval_annotations: str = setting("", older="")
    eval_images: str = setting("", older="")
    with_masks: bool = setting(True, older=True)  # box-only datasets never have masks
    # Categories held out of detection training (novel): these frequency groups (OV-COCO marks
    # its 17 novel categories "r").
    novel_frequencies: tuple[str, ...] = setting(("r",), validate=_frequency_groups, older=("r",))

    @property
    def has_masks(self) -> bool:
        """Whether this dataset yields instance masks (box-only datasets do not)."""
        return self.name not in BOX_ONLY_DATASETS and self.with_masks

    @property
    def has_training_split(self) -> bool:
        return self.name not in EVAL_ONLY_DATASETS

    def input_problems(
        self, problems: cc.Problems, *, need_train: bool = True, total_steps: Any = None
    ) -> None:
        """Adds a problem for each file or folder this dataset reads that is unset (or, when
        local, missing), and for training steps on an evaluation-only dataset. `need_train`
        False: only the evaluation data is read."""
        if self.name == "shapes_world":
            return
        needed_for = f"data.name={self.name!r}"
        paths = [("eval_annotations", "file"), ("eval_images", "dir")]
        if need_train and self.name not in BOX_ONLY_DATASETS:
            paths += [("train_annotations", "file"), ("train_images", "dir")]
        for key, kind in paths:
            cc.path_problems(
                problems, f"data.{key}", getattr(self, key), kind=kind, needed_for=needed_for
            )
        if not self.has_training_split and cc.is_int(total_steps) and total_steps > 0:
            problems.add(
                "data.name",
                self.name,
                f"is for evaluation only (no training data) but total_steps = {total_steps}: "
                "set total_steps=0 and init.detector_workdir",
            )
