"""Config -> data: the one place that maps `config.data` to readers, tokenizers and vocabularies.

Pretraining (`image_text_data`), `config.data.name`:
  "shapes_world"   the embedded procedural world (built on first use under data_dir);
  "tfds"           an image-text tfds dataset stored as array_record (`tfds_name`);
  "web_shards"     img2dataset-style TFRecord shards (`train_files`: folder, glob or list);
  "coco_captions"  COCO captions JSON + image folder (`annotations`, `images`);
  "karpathy"       a Karpathy split JSON (Flickr30k / COCO) + image folder.
Retrieval evaluation reads `config.data.eval` (same fields; name "" = the training data's
`eval_split`). Captions-per-image datasets evaluate every caption against every image.

Detection (`detection_data`), `config.data.name`:
  "shapes_world"   the embedded world, categories with LVIS-style frequency groups;
  "lvis"           LVIS v1 JSON + COCO images (federated evaluation, base = f + c, novel = r);
  "coco"           COCO instances JSON + images (all 80 categories are base);
  "ov_coco"        COCO restricted to the 48 base / 17 novel open-vocabulary split;
  "objects365"     Objects365 JSON + images (evaluation of a transferred vocabulary);
  "tfds_coco"      tfds `coco/2017` for training (boxes only), the official JSON for evaluation.
Paths: `train_annotations`, `train_images`, `eval_annotations`, `eval_images`.

The text tower's tokenizer always comes from the PRETRAINING config (`tokenizer_for`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from rovit_jax.data import image_text
from rovit_jax.data.categories import CategoryTable

PRETRAIN_DATASETS = ("shapes_world", "tfds", "web_shards", "coco_captions", "karpathy")
DETECTION_DATASETS = ("shapes_world", "lvis", "coco", "ov_coco", "objects365", "tfds_coco")


def default_data_dir() -> str:
    return os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def _require(data: ml_collections.ConfigDict, key: str, prefix: str = "data") -> str:
    value = data.get(key)
    if not value:
        raise ValueError(f"config key `{prefix}.{key}` is required for {prefix}.name={data.name!r}")
    return value


def shapes_builder(data: ml_collections.ConfigDict):
    """The shapes-world builder of `data.world`, built once (the chief first on many hosts)."""
    from jax.experimental import multihost_utils

    from rovit_jax.data import shapes_tfds

    data_dir = data.get("data_dir") or default_data_dir()
    # Chief builds first so hosts sharing a data_dir never race; others then find it built
    # (or build their own identical copy on host-local disk).
    if jax.process_index() == 0:
        builder = shapes_tfds.build_shapes_world(data_dir, **data.world)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("shapes_world_built")
    if jax.process_index() != 0:
        builder = shapes_tfds.build_shapes_world(data_dir, **data.world)
    return builder


def tokenizer_for(pretrain_config: ml_collections.ConfigDict):
    """The text tokenizer of a pretraining config (shapes world: trained on its captions)."""
    from rovit_jax.data import tokenizer as tok_lib

    tok = pretrain_config.tokenizer
    if pretrain_config.data.name == "shapes_world" and not tok.get("model_path"):
        tokenizer = tok_lib.shapes_tokenizer(
            shapes_builder(pretrain_config.data),
            max_len=int(tok.max_len),
            vocab_size=int(tok.vocab_size),
        )
    else:
        if not tok.get("model_path"):
            raise ValueError(
                "config key `tokenizer.model_path` is required (a SentencePiece .model file) "
                f"for data.name={pretrain_config.data.name!r}"
            )
        if not os.path.isfile(tok.model_path):
            raise FileNotFoundError(f"config key `tokenizer.model_path`: no file {tok.model_path}")
        tokenizer = tok_lib.SentencePieceTokenizer(tok.model_path, int(tok.max_len))
    if tokenizer.vocab_size > int(tok.vocab_size):
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
    data: ml_collections.ConfigDict, split: str, prefix: str, *, evaluation: bool
) -> tuple[Any, list[str] | None, np.ndarray | None]:
    """(source, every caption or None, caption -> image index or None) for one split of `data`.

    Datasets with several captions per image train on every (image, caption) pair and evaluate
    one example per image against every caption.
    """
    name = data.name
    if name == "shapes_world":
        return image_text.TfdsImageTextSource(shapes_builder(data), split), None, None
    if name == "tfds":
        import tensorflow_datasets as tfds

        builder = tfds.builder(_require(data, "tfds_name", prefix), data_dir=data.get("data_dir"))
        keys = dict(image_key=data.image_key, caption_key=data.caption_key)
        return image_text.TfdsImageTextSource(builder, split, **keys), None, None
    if name == "web_shards":
        from rovit_jax.data.web_shards import WebShardsImageTextSource

        source = WebShardsImageTextSource(
            _require(data, "train_files", prefix),
            image_key=data.get("shard_image_key") or "jpg",
            caption_key=data.get("shard_caption_key") or "txt",
            num_workers=int(data.get("num_workers") or 1),
        )
        return source, None, None
    if name == "coco_captions":
        from rovit_jax.data.coco import CocoCaptionsSource

        ann, images = _require(data, "annotations", prefix), _require(data, "images", prefix)
        every = CocoCaptionsSource(ann, images, all_captions=True)
        if not evaluation:
            return every, None, None
        grouped = CocoCaptionsSource(ann, images, all_captions=False)
        return grouped, every.captions(), np.asarray(every.text_to_image(), np.int32)
    if name == "karpathy":
        from rovit_jax.data.flickr30k import KarpathyCaptionsSource

        ann, images = _require(data, "annotations", prefix), _require(data, "images", prefix)
        if not evaluation:
            return KarpathyCaptionsSource(ann, images, split), None, None
        grouped = KarpathyCaptionsSource(ann, images, split, grouped=True)
        return grouped, grouped.captions(), np.asarray(grouped.retrieval_groups(), np.int32)
    raise ValueError(
        f"config key `{prefix}.name`: unknown {name!r}; choose one of {PRETRAIN_DATASETS}"
    )


def image_text_data(config: ml_collections.ConfigDict) -> ImageTextData:
    """Tokenizer, training source and retrieval-evaluation data of a pretraining config."""
    data = config.data
    tokenizer = tokenizer_for(config)
    train, _, _ = _image_text_source(data, data.train_split, "data", evaluation=False)
    eval_cfg = data.get("eval")
    if eval_cfg is None or not eval_cfg.get("name"):
        if data.name == "web_shards":
            raise ValueError(
                "config key `data.eval.name` is required with data.name='web_shards' "
                f"(choose one of {PRETRAIN_DATASETS})"
            )
        evaluated = _image_text_source(data, data.eval_split, "data", evaluation=True)
    else:
        merged = ml_collections.ConfigDict(data.to_dict())
        merged.update(eval_cfg.to_dict())
        split = eval_cfg.get("split") or data.eval_split
        evaluated = _image_text_source(merged, split, "data.eval", evaluation=True)
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


BOX_ONLY_DATASETS = ("objects365", "tfds_coco")


def detection_has_masks(data: ml_collections.ConfigDict) -> bool:
    """Whether a detection dataset config yields instance masks (box-only datasets do not)."""
    return data.name not in BOX_ONLY_DATASETS and bool(data.get("with_masks", True))


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


def detection_data(config: ml_collections.ConfigDict, *, need_train: bool = True) -> DetectionData:
    """Readers, category table and evaluation protocol of a detection config."""
    data = config.data
    name = data.name
    if name == "shapes_world":
        from rovit_jax.data.shapes_detection import ShapesDetectionSource

        builder = shapes_builder(data)
        table = CategoryTable.from_records(builder.info.metadata["categories"])
        evaluation = ShapesDetectionSource(builder, data.eval_split)
        return DetectionData(
            table=table,
            train=ShapesDetectionSource(builder, data.train_split) if need_train else None,
            eval=evaluation,
            protocol="lvis",
            eval_ids=[c.id + 1 for c in table],
            ground_truth=lambda n: _shapes_ground_truth(evaluation, table, n),
            with_masks=detection_has_masks(data),
        )
    if name not in DETECTION_DATASETS:
        raise ValueError(
            f"config key `data.name`: unknown {name!r}; choose one of {DETECTION_DATASETS}"
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
    with_masks = detection_has_masks(data)
    kwargs: dict[str, Any] = {} if name == "objects365" else {"with_masks": with_masks}
    # Evaluation needs the official JSON (COCO-format ground truth) for every dataset.
    eval_ann = _require(data, "eval_annotations")
    evaluation = cls(eval_ann, _require(data, "eval_images"), **kwargs)
    table = evaluation.categories
    if name == "ov_coco":
        table = ov_coco_split(table)
        evaluation = cls(eval_ann, data.eval_images, categories=table, **kwargs)
    elif name in ("coco", "tfds_coco", "objects365"):
        # Every category is "seen" unless the config marks otherwise: frequency "f".
        table = CategoryTable(
            tuple(dataclasses.replace(c, frequency=c.frequency or "f") for c in table)
        )
    train = None
    if need_train and name == "tfds_coco":
        from rovit_jax.data.coco import TfdsCocoDetectionSource

        train = TfdsCocoDetectionSource("coco/2017", data.train_split, data.get("data_dir"))
    elif need_train and name != "objects365":
        train = cls(
            _require(data, "train_annotations"),
            _require(data, "train_images"),
            categories=table,
            **kwargs,
        )
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
