"""COCO readers: instances JSON + image folder, captions JSON, tfds `coco/2017`, the OV-COCO split.

Detection sources produce the example dicts of `detection_input` (see its module docstring):

  {"image": uint8 [H, W, 3], "image_id": int, "boxes": float32 [N, 4] normalised (y0, x0, y1, x1),
   "labels": int32 [N] dataset category ids, "masks": bool [N, H, W] (with_masks only)}

Conventions shared by every COCO-format reader (COCO, LVIS, Objects365):
  * the JSON and the image folder may be local or in a bucket (`gs://bucket/coco/val2017`):
    every file is read through `rovit_jax.paths`;
  * images are served in increasing image-id order, whatever the JSON order; an image's
    instances keep their order in the JSON;
  * boxes: JSON [x, y, w, h] pixels -> (y / H, x / W, (y + h) / H, (x + w) / W) with H, W the
    image's "height" / "width" in the JSON (not clipped here: the batcher clips and drops);
  * masks: polygons and RLEs (compressed or not) decoded with pycocotools exactly as
    `COCO.annToMask` does;
  * crowd annotations ("iscrowd": 1) are left out of the training targets unless
    `include_crowd=True`, but kept in `ground_truth()` (COCO evaluation treats them as ignore
    regions);
  * images without annotations are kept (empty examples: negatives for the detector);
  * unusable images raise `CorruptImageError` naming the file when accessed — a missing file
    too, so the batcher substitutes the example and counts it instead of stopping a long run;
    an annotation whose segmentation cannot be decoded raises `InvalidExampleError` (same
    treatment). Problems with the JSON itself (missing file or key, dangling ids) raise at
    construction: FileNotFoundError / ValueError naming the file, key and value.

OV-COCO (48 base / 17 novel categories) for the detection task:

  table = ov_coco_split(source.categories)        # novel marked "r", base "f"
  train = CocoDetectionSource(train_json, train_dir, categories=table.ids())
  category_map = {cid: i for i, cid in enumerate(table.base_ids())}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rovit_jax import paths
from rovit_jax.data.categories import (
    COCO_CATEGORIES,
    OV_COCO_BASE,
    OV_COCO_NOVEL,
    Category,
    CategoryTable,
    coco_category_table,
)
from rovit_jax.data.detection_example import InvalidExampleError
from rovit_jax.data.image_text import DEFAULT_MAX_PIXELS, CorruptImageError, decode_image

# ----------------------------------------------------------------------------------------------
# JSON and file helpers (shared with the LVIS / Objects365 / Flickr30k readers).


def load_json(path: str | os.PathLike, what: str = "annotation JSON") -> Any:
    """Loads a JSON file (local or URL); FileNotFoundError / ValueError naming the file."""
    path = os.fspath(path)
    if not paths.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(paths.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


def check_dir(path: str | os.PathLike, what: str = "image folder") -> str:
    """Returns `path` as str; FileNotFoundError naming it if it is not a directory (or a bucket
    folder: a URL prefix holding objects)."""
    path = os.fspath(path)
    if not paths.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_keys(data: Any, keys: Sequence[str], where: str) -> None:
    """ValueError naming the first of `keys` missing from the dict `data`."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must hold a JSON object, got {type(data).__name__}")
    for key in keys:
        if key not in data:
            raise ValueError(f"{where} has no {key!r} key (keys: {sorted(data)})")


def read_image_bytes(path: str) -> bytes:
    """The encoded bytes of image file `path` (local or URL); CorruptImageError naming it when
    it cannot be read, so the batcher substitutes the example instead of stopping the run."""
    try:
        return paths.read_bytes(path)
    except FileNotFoundError:  # the same words for a file and an object (gcsfs names its API URL)
        raise CorruptImageError(f"image file not found: {path}") from None
    except OSError as e:
        raise CorruptImageError(f"cannot read image file {path}: {e}") from e


def read_image_file(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decoded uint8 [H, W, 3] image at `path`; CorruptImageError naming the file otherwise."""
    data = read_image_bytes(path)
    try:
        return decode_image(data, max_pixels=max_pixels)
    except CorruptImageError as e:
        raise CorruptImageError(f"image file {path}: {e}") from e


def path_suffixes(relative: str) -> list[str]:
    """'a/b/c.jpg' -> ['a/b/c.jpg', 'b/c.jpg', 'c.jpg']: where a listed file may sit locally.

    Annotation files name images relative to the layout their authors used (Objects365's
    "images/v1/patch8/x.jpg", LVIS's "train2017/x.jpg"); trying ever shorter suffixes finds the
    file under an image folder holding the patch folders, the split folders, or the files.
    """
    parts = [p for p in relative.replace("\\", "/").split("/") if p not in ("", ".")]
    return ["/".join(parts[i:]) for i in range(len(parts))]


def xywh_to_yxyx(bbox: np.ndarray, height: float, width: float) -> np.ndarray:
    """COCO [N, 4] (x, y, w, h) pixel boxes -> float32 [N, 4] (y0, x0, y1, x1) normalised."""
    b = np.asarray(bbox, np.float64).reshape(-1, 4)
    out = np.stack([b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], axis=1)
    return (out / np.array([height, width, height, width], np.float64)).astype(np.float32)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> bool [height, width].

    Same decoding as pycocotools' `COCO.annToMask`. Raises ValueError for an empty or malformed
    segmentation and for an RLE whose size is not (height, width).
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("empty polygon list")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, Mapping) and "counts" in segmentation:
        size = tuple(int(s) for s in segmentation.get("size", ()))
        if size != (height, width):
            raise ValueError(f"RLE size {size} differs from the image's {(height, width)}")
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(dict(segmentation), height, width)
        else:
            counts = segmentation["counts"]
            rle = {"size": [height, width], "counts": counts}
            if isinstance(counts, str):
                rle["counts"] = counts.encode("ascii")
    else:
        raise ValueError(f"unrecognised segmentation of type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(np.bool_)


def _int_ids(ids: Iterable[int] | CategoryTable | None) -> set[int] | None:
    if ids is None:
        return None
    if isinstance(ids, CategoryTable):
        return set(ids.ids())
    return {int(i) for i in ids}


# ----------------------------------------------------------------------------------------------
# COCO-format detection (shared by COCO, LVIS and Objects365).


class CocoStyleDetectionSource:
    """Random-access detection examples from a COCO-format annotation JSON and an image folder.

    Subclasses change how an image record names its file (`_relative_paths`) and which image
    keys are required.

    Attributes:
      categories: CategoryTable of the served categories (id order; LVIS frequencies kept).
      image_ids: served image ids, increasing; `source[i]` is image `image_ids[i]`.
    """

    _what = "COCO annotation JSON"
    _image_keys: tuple[str, ...] = ("id", "width", "height", "file_name")

    def __init__(
        self,
        annotation_json: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        categories: Iterable[int] | CategoryTable | None = None,
        include_crowd: bool = False,
        with_masks: bool = True,
        image_ids: Iterable[int] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        """Reads and indexes the JSON (images themselves are read on access).

        Args:
          annotation_json: path of the instances JSON ({"images", "annotations", "categories"}).
          image_dir: folder holding the image files.
          categories: category ids (or a CategoryTable) to serve; annotations of other
            categories are left out. None keeps every category of the JSON.
          include_crowd: keep "iscrowd" annotations in the training targets.
          with_masks: decode instance masks ("masks" key); needs a segmentation on every
            served annotation.
          image_ids: serve only these images (e.g. an evaluation subset); None serves all.
          max_pixels: refuse images that decode to more pixels than this.

        Raises:
          FileNotFoundError: the JSON or the image folder does not exist.
          ValueError: the JSON lacks a required key, or an annotation names an unknown image
            or category, or `categories` / `image_ids` name ids the JSON does not have.
        """
        self.annotation_json = os.fspath(annotation_json)
        data = load_json(self.annotation_json, self._what)
        self.image_dir = check_dir(image_dir)
        where = f"{self._what} {self.annotation_json}"
        require_keys(data, ("images", "annotations", "categories"), where)
        self.include_crowd, self.with_masks, self.max_pixels = include_crowd, with_masks, max_pixels

        all_categories = CategoryTable.from_coco_json(data)
        keep_cats = _int_ids(categories)
        if keep_cats is None:
            self.categories = all_categories
        else:
            unknown = keep_cats - set(all_categories.ids())
            if unknown:
                raise ValueError(f"categories {sorted(unknown)} are not in {where}")
            self.categories = all_categories.restrict(keep_cats)
        served = set(self.categories.ids())
        self._category_records = {
            int(c["id"]): c for c in data["categories"] if int(c["id"]) in served
        }

        images: dict[int, Mapping[str, Any]] = {}
        for i, im in enumerate(data["images"]):
            require_keys(im, self._image_keys, f"{where}: images[{i}]")
            image_id = int(im["id"])
            if image_id in images:
                raise ValueError(f"{where}: image id {image_id} appears more than once")
            images[image_id] = im
        wanted = sorted(images) if image_ids is None else sorted({int(i) for i in image_ids})
        missing = [i for i in wanted if i not in images]
        if missing:
            raise ValueError(f"image ids {missing[:10]} are not in {where}")
        self.image_ids: list[int] = wanted
        self._images = [images[i] for i in wanted]
        self._position = {image_id: k for k, image_id in enumerate(wanted)}

        all_category_ids = set(all_categories.ids())
        self._annotations: list[list[Mapping[str, Any]]] = [[] for _ in wanted]
        for i, ann in enumerate(data["annotations"]):
            require_keys(ann, ("image_id", "category_id", "bbox"), f"{where}: annotations[{i}]")
            image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
            if image_id not in images:
                raise ValueError(
                    f"{where}: annotation {ann.get('id', i)!r} has image_id {image_id}, "
                    "not an image of the JSON"
                )
            if category_id not in all_category_ids:
                raise ValueError(
                    f"{where}: annotation {ann.get('id', i)!r} has category_id {category_id}, "
                    "not a category of the JSON"
                )
            k = self._position.get(image_id)
            if k is not None and category_id in self._category_records:
                self._annotations[k].append(ann)

    # ---- file lookup ---------------------------------------------------------------------------
    def _relative_paths(self, image: Mapping[str, Any]) -> list[str]:
        """Candidate paths of an image's file, relative to image_dir, most specific first."""
        return path_suffixes(str(image["file_name"]))

    def image_path(self, index: int) -> str:
        """Path of image `index`'s file; CorruptImageError naming it if no candidate exists."""
        candidates = [
            os.path.join(self.image_dir, p) for p in self._relative_paths(self._images[index])
        ]
        for path in candidates:
            if paths.isfile(path):
                return path
        tried = "" if len(candidates) < 2 else f" (also tried {', '.join(candidates[1:])})"
        first = candidates[0] if candidates else self.image_dir
        raise CorruptImageError(f"image file not found: {first}{tried}")

    # ---- annotations without pixels -----------------------------------------------------------
    def annotations(self, index: int) -> list[Mapping[str, Any]]:
        """JSON annotations that form image `index`'s targets (crowd excluded unless included)."""
        anns = self._annotations[index]
        if self.include_crowd:
            return list(anns)
        return [a for a in anns if not a.get("iscrowd", 0)]

    def num_crowd(self, index: int) -> int:
        """Number of crowd annotations of image `index` (of the served categories)."""
        return sum(1 for a in self._annotations[index] if a.get("iscrowd", 0))

    def labels(self, index: int) -> np.ndarray:
        """int32 [N] category ids of image `index`'s targets, without reading the image."""
        return np.asarray([int(a["category_id"]) for a in self.annotations(index)], np.int32)

    def ground_truth(self) -> dict[str, Any]:
        """The JSON restricted to the served images and categories (crowd annotations kept).

        {"images", "annotations", "categories"}, ready for `evaluation.detection.evaluate_coco`
        (or `evaluate_lvis` for LVIS); the records are the JSON's own dicts (copied).
        """
        return {
            "images": [dict(im) for im in self._images],
            "annotations": [dict(a) for anns in self._annotations for a in anns],
            "categories": [dict(self._category_records[i]) for i in self.categories.ids()],
        }

    # ---- examples ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        record = self._images[index]
        height, width = int(record["height"]), int(record["width"])
        path = self.image_path(index)
        image = read_image_file(path, max_pixels=self.max_pixels)
        if image.shape[:2] != (height, width):
            # Boxes are normalised by the JSON size: a mismatch would misplace every target.
            raise CorruptImageError(
                f"image file {path} is {image.shape[1]}x{image.shape[0]} (WxH) but the JSON "
                f"says {width}x{height} for image id {record['id']}"
            )
        anns = self.annotations(index)
        boxes = xywh_to_yxyx(np.asarray([a["bbox"] for a in anns], np.float64), height, width)
        example = {
            "image": image,
            "image_id": int(record["id"]),
            "boxes": boxes,
            "labels": np.asarray([int(a["category_id"]) for a in anns], np.int32),
        }
        if self.with_masks:
            masks = np.zeros((len(anns), height, width), np.bool_)
            for k, ann in enumerate(anns):
                try:
                    masks[k] = segmentation_to_mask(ann.get("segmentation"), height, width)
                except Exception as e:  # pycocotools raises bare Exception / TypeError too
                    raise InvalidExampleError(
                        f"annotation {ann.get('id')!r} of image {record['id']} ({path}): "
                        f"unusable segmentation ({type(e).__name__}: {e}); use "
                        "with_masks=False for box-only training"
                    ) from e
            example["masks"] = masks
        return example


class CocoDetectionSource(CocoStyleDetectionSource):
    """COCO instances JSON (e.g. instances_train2017.json) + its image folder (train2017/).

    See `CocoStyleDetectionSource` for the arguments and the module docstring for conventions.
    """


# ----------------------------------------------------------------------------------------------
# Captions.


class CocoCaptionsSource:
    """COCO captions JSON (captions_*2017.json) + image folder as an ImageTextSource.

    `source[i] -> {"image": encoded bytes, "caption": str}`. Images are in increasing id order
    (those without captions are left out); captions keep their JSON order. With
    `all_captions=True` there is one example per (image, caption) pair, image-major; otherwise one
    per image with its first caption. A missing image file raises CorruptImageError naming it.
    """

    def __init__(
        self,
        captions_json: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        all_captions: bool = False,
    ):
        path = os.fspath(captions_json)
        data = load_json(path, "COCO captions JSON")
        self.image_dir = check_dir(image_dir)
        where = f"COCO captions JSON {path}"
        require_keys(data, ("images", "annotations"), where)
        files: dict[int, str] = {}
        for i, im in enumerate(data["images"]):
            require_keys(im, ("id", "file_name"), f"{where}: images[{i}]")
            files[int(im["id"])] = str(im["file_name"])
        captions: dict[int, list[str]] = {}
        for i, ann in enumerate(data["annotations"]):
            require_keys(ann, ("image_id", "caption"), f"{where}: annotations[{i}]")
            image_id = int(ann["image_id"])
            if image_id not in files:
                raise ValueError(f"{where}: annotations[{i}] has image_id {image_id}, not an image")
            captions.setdefault(image_id, []).append(str(ann["caption"]).strip())
        self.image_ids = sorted(captions)
        self._files = [files[i] for i in self.image_ids]
        self._captions = [captions[i] for i in self.image_ids]
        self._pairs = [
            (k, c)
            for k, caps in enumerate(self._captions)
            for c in (range(len(caps)) if all_captions else range(1))
        ]

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, c = self._pairs[int(index)]
        path = os.path.join(self.image_dir, self._files[k])
        return {"image": read_image_bytes(path), "caption": self._captions[k][c]}

    def captions(self) -> list[str]:
        """Every example's caption, in example order (no image is read)."""
        return [self._captions[k][c] for k, c in self._pairs]

    def text_to_image(self) -> np.ndarray:
        """int32 [len(self)]: the image index (in `image_ids` order) of each example's caption."""
        return np.asarray([k for k, _ in self._pairs], np.int32)


# ----------------------------------------------------------------------------------------------
# The open-vocabulary COCO split.


def ov_coco_split(categories: CategoryTable | None = None) -> CategoryTable:
    """The 65 OV-COCO categories with novel ones marked "r" and base ones "f".

    Args:
      categories: the dataset's table (e.g. `CocoDetectionSource.categories`), whose ids are
        kept; None uses the official COCO 2017 ids.

    Returns:
      CategoryTable in `categories`' order, so `base_ids()` gives the 48 base and
      `novel_ids()` the 17 novel category ids (with the default novel_frequencies=("r",)).

    Raises:
      ValueError: a split category name is not in `categories`.
    """
    table = coco_category_table() if categories is None else categories
    marks = {**{n: "f" for n in OV_COCO_BASE}, **{n: "r" for n in OV_COCO_NOVEL}}
    missing = sorted(set(marks) - set(table.names()))
    if missing:
        raise ValueError(f"OV-COCO categories {missing} are not in the category table")
    return CategoryTable(
        tuple(Category(c.id, c.name, marks[c.name]) for c in table if c.name in marks)
    )


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets coco/2017.


class _TfrecordSplit:
    """Random access to a tfds split stored as TFRecord (tfds's default format).

    tfds only offers random access (`as_data_source`) for array_record; this indexes the split's
    TFRecord shards once and parses single records with the dataset's own feature spec.
    """

    def __init__(self, builder, split: str, decoders: Mapping[str, Any]):
        from rovit_jax.data.web_shards import index_tfrecord

        try:
            instructions = builder.info.splits[split].file_instructions
        except KeyError as e:
            raise ValueError(
                f"split {split!r} not in dataset {builder.info.full_name} "
                f"(has {list(builder.info.splits)})"
            ) from e
        self._features, self._decoders = builder.info.features, decoders
        self._files: list[str] = []
        offsets, lengths, files = [], [], []
        for fi in instructions:
            index = index_tfrecord(os.fspath(fi.filename))[fi.skip : fi.skip + fi.take]
            self._files.append(os.fspath(fi.filename))
            offsets.append(index[:, 0])
            lengths.append(index[:, 1])
            files.append(np.full(len(index), len(self._files) - 1, np.int32))
        self._offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self._lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self._file_of = np.concatenate(files) if files else np.zeros(0, np.int32)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Any:
        from rovit_jax.data.web_shards import read_record

        path = self._files[self._file_of[index]]
        try:
            record = read_record(path, int(self._offsets[index]), int(self._lengths[index]))
            return self._features.deserialize_example_np(record, decoders=self._decoders)
        except (OSError, ValueError) as e:
            raise CorruptImageError(f"{path}: unreadable record {index} ({e})") from e


def _tfds_label_ids(names: Sequence[str]) -> np.ndarray:
    """tfds ClassLabel index -> official COCO id (int64 [80]).

    A prepared coco/2017 names its labels after the JSON's categories (in id order); an
    unprepared builder only has "0".."79", which are that same order.
    """
    if len(names) != len(COCO_CATEGORIES):
        raise ValueError(
            f"expected {len(COCO_CATEGORIES)} COCO labels, the dataset has {len(names)}"
        )
    if all(str(n).isdigit() for n in names):
        return np.asarray([cid for cid, _ in COCO_CATEGORIES], np.int64)[
            np.asarray([int(n) for n in names])
        ]
    by_name = {name: cid for cid, name in COCO_CATEGORIES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"dataset labels {unknown[:5]} are not COCO 2017 category names")
    return np.asarray([by_name[n] for n in names], np.int64)


class TfdsCocoDetectionSource:
    """tfds `coco/2017` (boxes only: the tfds dataset has no masks) as a DetectionSource.

    Labels are mapped from tfds's contiguous 0..79 to the official COCO ids, so `categories`
    and `ov_coco_split()` are the same as with `CocoDetectionSource`. Crowd instances are left
    out unless `include_crowd`. Train with `DetectionBatches(..., with_masks=False)`.
    Works with array_record (tfds data source) and TFRecord (indexed here) preparations.
    """

    def __init__(
        self,
        builder_or_name: Any,
        split: str,
        data_dir: str | None = None,
        *,
        include_crowd: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        import tensorflow_datasets as tfds  # Heavy import kept local.

        if isinstance(builder_or_name, str):
            builder = tfds.builder(builder_or_name, data_dir=data_dir)
        else:
            builder = builder_or_name
        self.builder, self.split = builder, split
        decoders = {"image": tfds.decode.SkipDecoding()}
        try:
            self._records = builder.as_data_source(split, decoders=decoders)
        except NotImplementedError:  # prepared as TFRecord: no tfds random access
            self._records = _TfrecordSplit(builder, split, decoders)
        except (ValueError, AssertionError) as e:
            if not builder.is_prepared():
                raise FileNotFoundError(
                    f"tfds dataset {builder.info.full_name} is not prepared in "
                    f"{builder.data_dir} (run tfds build or download_and_prepare first)"
                ) from e
            raise
        objects = builder.info.features["objects"]
        self._label_ids = _tfds_label_ids(list(objects["label"].names))
        self.categories = coco_category_table()
        self.include_crowd, self.max_pixels = include_crowd, max_pixels

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._records[int(index)]
        image = ex["image"]
        if isinstance(image, bytes):
            image = decode_image(image, max_pixels=self.max_pixels)
        image = np.asarray(image, np.uint8)
        objects = ex["objects"]
        bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
        label = np.asarray(objects["label"], np.int64).reshape(-1)
        crowd = np.asarray(objects["is_crowd"], np.bool_).reshape(-1)
        if not len(bbox) == len(label) == len(crowd):
            raise InvalidExampleError(
                f"{self.builder.info.full_name}[{self.split}] example {index}: objects have "
                f"{len(bbox)} boxes, {len(label)} labels, {len(crowd)} is_crowd flags"
            )
        if label.size and (label.min() < 0 or label.max() >= len(self._label_ids)):
            raise InvalidExampleError(
                f"example {index}: labels outside [0, {len(self._label_ids)})"
            )
        keep = np.ones(len(bbox), np.bool_) if self.include_crowd else ~crowd
        return {
            "image": image,
            "image_id": int(np.asarray(ex["image/id"]).item()),
            "boxes": bbox[keep],
            "labels": self._label_ids[label[keep]].astype(np.int32),
        }
