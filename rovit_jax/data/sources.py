"""Config -> data: the one place that maps a config's typed `data` section to readers,
tokenizers and vocabularies.

The dataset names and the fields each reads are defined in `data.settings`
(`ImageTextDataSettings` for pretraining, `DetectionDataSettings` for detection); this module
builds their readers. Retrieval evaluation reads `data.eval` (`RetrievalDataSettings`);
captions-per-image datasets evaluate every caption against every image. The text tower's
tokenizer always comes from the PRETRAINING config (`tokenizer_for`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from rovit_jax import config_check as cc
from rovit_jax import paths
from rovit_jax.config_sections import resolved_sections
from rovit_jax.data import image_text
from rovit_jax.data.categories import CategoryTable
from rovit_jax.data.settings import (
    BOX_ONLY_DATASETS,
    DETECTION_DATASETS,
    PRETRAIN_DATASETS,
    DetectionDataSettings,
    ImageTextDataSettings,
    RetrievalDataSettings,
    WorldSettings,
)

__all__ = [
    "BOX_ONLY_DATASETS",
    "DETECTION_DATASETS",
    "DetectionData",
    "ImageTextData",
    "PRETRAIN_DATASETS",
    "default_data_dir",
    "detection_data",
    "image_text_data",
    "shapes_builder",
    "text_tokenizer",
    "tokenizer_for",
]


def default_data_dir() -> str:
    """$TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds' own default)."""
    return os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def shapes_builder(world: WorldSettings, data_dir: str | None = None):
    """The built shapes world of `world` under `data_dir` (None: `default_data_dir()`), built
    once (the chief first on many hosts)."""
    from jax.experimental import multihost_utils

    from rovit_jax.data import shapes_tfds

    data_dir = data_dir or default_data_dir()
    # Chief builds first so hosts sharing a data_dir never race; others then find it built
    # (or build their own identical copy on host-local disk).
    if jax.process_index() == 0:
        builder = shapes_tfds.build_shapes_world(data_dir, **world.as_kwargs())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("shapes_world_built")
    if jax.process_index() != 0:
        builder = shapes_tfds.build_shapes_world(data_dir, **world.as_kwargs())
    return builder


def tokenizer_for(pretrain_config: ml_collections.ConfigDict):
    """The text tokenizer of a pretraining config (shapes world: trained on its captions)."""
    from rovit_jax.pretrain_settings import TokenizerSettings

    classes = (ImageTextDataSettings, WorldSettings, TokenizerSettings)
    return text_tokenizer(resolved_sections(classes, pretrain_config))


def text_tokenizer(settings: Mapping[str, Any]):
    """The text tokenizer of a pretraining config's typed sections ("data", "data.world",
    "tokenizer"): `tokenizer.*` (`tokenizer.make_tokenizer`), or for the shapes world without a
    `tokenizer.model_path`, a SentencePiece model trained on its captions."""
    from rovit_jax.data import tokenizer as tok_lib

    data, tok = settings["data"], settings["tokenizer"]
    if data.name == "shapes_world" and tok.kind == "sentencepiece" and not tok.model_path:
        tokenizer = tok_lib.shapes_tokenizer(
            shapes_builder(settings["data.world"], data.data_dir),
            max_len=tok.max_len,
            vocab_size=tok.vocab_size,
        )
    else:
        if tok.kind == "sentencepiece" and not tok.model_path:
            raise ValueError(
                "config key `tokenizer.model_path` is required (a SentencePiece .model file) "
                f"for data.name={data.name!r}"
            )
        if tok.model_path and not paths.isfile(tok.model_path):
            raise FileNotFoundError(f"config key `tokenizer.model_path`: no file {tok.model_path}")
        tokenizer = tok_lib.make_tokenizer(tok)
    if tokenizer.vocab_size > tok.vocab_size:
        raise ValueError(
            f"config key `tokenizer.vocab_size` = {tok.vocab_size} "
            f"is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Image-text data.


@dataclasses.dataclass
class ImageTextData:
    """Pretraining inputs.

    Attributes:
      tokenizer: the text tokenizer.
      train: ImageTextSource of training pairs.
      eval_images: ImageTextSource with one example per evaluation image.
      eval_captions: every evaluation caption, or None when caption i describes image i of
        `eval_images` (one caption per image).
      eval_text_to_image: int [len(eval_captions)] image index of each caption, or None.
    """

    tokenizer: Any
    train: Any
    eval_images: Any
    eval_captions: list[str] | None = None
    eval_text_to_image: np.ndarray | None = None


def _image_text_source(
    data: ImageTextDataSettings,
    world: WorldSettings,
    split: str,
    prefix: str,
    *,
    evaluation: bool,
) -> tuple[Any, list[str] | None, np.ndarray | None]:
    """(source, every caption or None, caption -> image index or None) for one split of `data`
    (`prefix` names its section in errors: data or data.eval).

    Datasets with several captions per image train on every (image, caption) pair and evaluate
    one example per image against every caption.
    """
    problems = cc.Problems()
    data.input_problems(problems, prefix=prefix)
    problems.raise_if_any()
    name = data.name
    if name == "shapes_world":
        builder = shapes_builder(world, data.data_dir)
        return image_text.TfdsImageTextSource(builder, split), None, None
    if name == "tfds":
        import tensorflow_datasets as tfds

        builder = tfds.builder(data.tfds_name, data_dir=data.data_dir)
        keys = dict(image_key=data.image_key, caption_key=data.caption_key)
        return image_text.TfdsImageTextSource(builder, split, **keys), None, None
    if name == "web_shards":
        from rovit_jax.data.web_shards import WebShardsImageTextSource

        files = data.train_files
        source = WebShardsImageTextSource(
            files if isinstance(files, str) else list(files),
            image_key=data.shard_image_key,
            caption_key=data.shard_caption_key,
            num_workers=data.num_workers,
        )
        return source, None, None
    if name == "coco_captions":
        from rovit_jax.data.coco import CocoCaptionsSource

        every = CocoCaptionsSource(data.annotations, data.images, all_captions=True)
        if not evaluation:
            return every, None, None
        grouped = CocoCaptionsSource(data.annotations, data.images, all_captions=False)
        return grouped, every.captions(), np.asarray(every.text_to_image(), np.int32)
    # karpathy (the section's choices admit no other name)
    from rovit_jax.data.flickr30k import KarpathyCaptionsSource

    if not evaluation:
        return KarpathyCaptionsSource(data.annotations, data.images, split), None, None
    grouped = KarpathyCaptionsSource(data.annotations, data.images, split, grouped=True)
    return grouped, grouped.captions(), np.asarray(grouped.retrieval_groups(), np.int32)


def retrieval_problems(
    problems: Any, data: ImageTextDataSettings, retrieval: RetrievalDataSettings
) -> None:
    """Adds the problems of the retrieval-evaluation data (`data.eval`): web shards have no
    evaluation split, and a named dataset needs its own fields."""
    if not retrieval.name:
        if data.name == "web_shards":
            problems.add(
                "data.eval.name",
                retrieval.name,
                f"is required with data.name='web_shards' (choose one of {PRETRAIN_DATASETS})",
            )
        return
    merged, _ = data.for_retrieval(retrieval)
    merged.input_problems(problems, prefix="data.eval")


def image_text_data(settings: Mapping[str, Any]) -> ImageTextData:
    """Tokenizer, training source and retrieval-evaluation data of a pretraining config's typed
    sections (`pretrain_settings`: "data", "data.world", "data.eval", "tokenizer")."""
    data, world, retrieval = settings["data"], settings["data.world"], settings["data.eval"]
    problems = cc.Problems()
    retrieval_problems(problems, data, retrieval)
    problems.raise_if_any()
    tokenizer = text_tokenizer(settings)
    train, _, _ = _image_text_source(data, world, data.train_split, "data", evaluation=False)
    evaluated_data, split = data.for_retrieval(retrieval)
    prefix = "data.eval" if retrieval.name else "data"
    evaluated = _image_text_source(evaluated_data, world, split, prefix, evaluation=True)
    return ImageTextData(tokenizer, train, *evaluated)


# ----------------------------------------------------------------------------------------------
# Detection data.


@dataclasses.dataclass
class DetectionData:
    """Detection inputs.

    Attributes:
      table: CategoryTable of every evaluated category (dataset ids; frequencies "f"/"c"/"r",
        novel = the config's `novel_frequencies`).
      train: DetectionSource for training (None for evaluation-only datasets).
      eval: DetectionSource for evaluation.
      protocol: "lvis" (federated AP with AP_r/c/f) or "coco".
      eval_ids: evaluation category id of each category of `table`, in table order.
      ground_truth: n -> ground-truth dict (LVIS or COCO format) of the first n eval images.
      with_masks: whether the sources carry instance masks.
    """

    table: CategoryTable
    train: Any
    eval: Any
    protocol: str
    eval_ids: list[int]
    ground_truth: Callable[[int], dict[str, Any]]
    with_masks: bool = True


def _shapes_ground_truth(source, table: CategoryTable, n: int) -> dict[str, Any]:
    """Exhaustive LVIS-style ground truth of the first n shapes images (ids shifted by one)."""
    from rovit_jax.evaluation import detection as det_eval

    images, annotations = [], []
    for i in range(n):
        ex = source[i]
        h, w = ex["image"].shape[:2]
        images.append({"id": int(ex["image_id"]), "height": h, "width": w})
        boxes = np.asarray(ex["boxes"], np.float32) * np.array([h, w, h, w], np.float32)
        annotations += det_eval.annotations_from_arrays(
            int(ex["image_id"]),
            boxes,
            np.asarray(ex["labels"]) + 1,
            masks=np.asarray(ex["masks"]) > 0 if ex.get("masks") is not None else None,
        )
    categories = [{"id": c.id + 1, "name": c.name, "frequency": c.frequency} for c in table]
    return det_eval.make_lvis_gt(images, categories, annotations)


def _first_images(gt: Mapping[str, Any], image_ids: list[int]) -> dict[str, Any]:
    keep = set(image_ids)
    out = dict(gt)
    out["images"] = [im for im in gt["images"] if int(im["id"]) in keep]
    out["annotations"] = [a for a in gt["annotations"] if int(a["image_id"]) in keep]
    return out


def detection_data(settings: Mapping[str, Any], *, need_train: bool = True) -> DetectionData:
    """Readers, category table and evaluation protocol of a detection config's typed sections
    (`detection_settings`: "data", "data.world")."""
    data: DetectionDataSettings = settings["data"]
    problems = cc.Problems()
    data.input_problems(problems, need_train=need_train)
    problems.raise_if_any()
    name = data.name
    if name == "shapes_world":
        from rovit_jax.data.shapes_detection import ShapesDetectionSource

        builder = shapes_builder(settings["data.world"], data.data_dir)
        table = CategoryTable.from_records(builder.info.metadata["categories"])
        evaluation = ShapesDetectionSource(builder, data.eval_split)
        return DetectionData(
            table=table,
            train=ShapesDetectionSource(builder, data.train_split) if need_train else None,
            eval=evaluation,
            protocol="lvis",
            eval_ids=[c.id + 1 for c in table],
            ground_truth=lambda n: _shapes_ground_truth(evaluation, table, n),
            with_masks=data.has_masks,
        )

    from rovit_jax.data.coco import CocoDetectionSource, ov_coco_split
    from rovit_jax.data.lvis import LvisDetectionSource
    from rovit_jax.data.objects365 import Objects365DetectionSource

    cls = {
        "lvis": LvisDetectionSource,
        "coco": CocoDetectionSource,
        "ov_coco": CocoDetectionSource,
        "tfds_coco": CocoDetectionSource,  # evaluated on the official JSON
        "objects365": Objects365DetectionSource,
    }[name]
    with_masks = data.has_masks
    kwargs: dict[str, Any] = {} if name == "objects365" else {"with_masks": with_masks}
    # Evaluation needs the official JSON (COCO-format ground truth) for every dataset.
    evaluation = cls(data.eval_annotations, data.eval_images, **kwargs)
    table = evaluation.categories
    if name == "ov_coco":
        table = ov_coco_split(table)
        evaluation = cls(data.eval_annotations, data.eval_images, categories=table, **kwargs)
    elif name in ("coco", "tfds_coco", "objects365"):
        # Every category is "seen" unless the config marks otherwise: frequency "f".
        table = CategoryTable(
            tuple(dataclasses.replace(c, frequency=c.frequency or "f") for c in table)
        )
    train = None
    if need_train and name == "tfds_coco":
        from rovit_jax.data.coco import TfdsCocoDetectionSource

        train = TfdsCocoDetectionSource("coco/2017", data.train_split, data.data_dir)
    elif need_train and data.has_training_split:
        train = cls(data.train_annotations, data.train_images, categories=table, **kwargs)
    full_gt = evaluation.ground_truth()
    protocol = "lvis" if name == "lvis" else "coco"
    return DetectionData(
        table=table,
        train=train,
        eval=evaluation,
        protocol=protocol,
        eval_ids=list(table.ids()),
        ground_truth=lambda n: _first_images(full_gt, evaluation.image_ids[:n]),
        with_masks=with_masks,
    )
