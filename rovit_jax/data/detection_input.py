"""Detection input on the host (numpy): example format, LSJ / resize-and-pad, fixed-shape batches.

Example format (what every detection reader produces, shapes world and COCO/LVIS alike):

  {"image": uint8 [H, W, 3] (or encoded image bytes, decoded by the pipeline),
   "image_id": int,
   "boxes": float32 [N, 4] normalised (y0, x0, y1, x1) in pixel-edge coordinates,
   "labels": int32 [N] dataset category ids,
   "masks": bool or uint8 [N, H, W], nonzero on the instance's pixels (optional)}

The transforms (`large_scale_jitter`, `resize_and_pad`) return an example in the same format for
the square output canvas (image `[S, S, 3]`, boxes normalised by S, masks `[N, S, S]` bool) plus

  "image_info": float32 [4] = (original height, original width, scale, 0), where `scale` maps
      original pixels to canvas pixels (`original = canvas / scale` when nothing was cropped; the
      resized size is rounded to whole pixels, so this is exact to within half a pixel);
  "valid_size": int32 [2] = (height, width) of the image content at the top left of the canvas;
      the rest of the canvas is padding (zero).

When masks are present the transformed boxes are recomputed as the tight bounds of the
transformed masks (as ViTDet does with LSJ): a crop that cuts a shape shrinks its extent along the
cut too, which clipping the old box cannot know. Instances whose box ends up thinner than
`min_box_size` canvas pixels (cropped away, or too small after downscaling) are dropped.

`DetectionBatches` turns a random-access source of examples into deterministic fixed-shape
training batches (see its docstring); `eval_detection_batches` gives ordered, unaugmented,
padded batches for inference.

What happens to hostile input. Three outcomes, decided by where the problem is:

* Refused with an error, at construction: problems of a whole annotation file or of the
  arguments — a missing JSON or image folder (FileNotFoundError naming it), a JSON without a
  required key, duplicate image ids, an annotation naming an image or category the JSON does
  not have (ValueError naming the file, the record and the id; see `coco`), a bad argument of
  `DetectionBatches` (ValueError naming it).

* Skipped (the example is replaced by a deterministic substitute, counted once per replaced
  stream position in `skipped` and in `skipped_by_reason[reason]`, the reason of the original
  example's first problem) — one image or record that cannot be used as a whole:

    reason               skipped when
    -------------------  ----------------------------------------------------------------------
    undecodable_image    image bytes cannot be decoded (random bytes, truncated file, missing
                         file of a COCO-format dataset)
    unreadable_file      reading the image failed with an OSError
    image_too_large      the header (or the array) has more than `max_pixels` pixels
    zero_size_image      the image has zero height or width (0 x W)
    image_too_small      a side is shorter than 2 pixels (e.g. a 1x1 image)
    bad_image_format     the image is not uint8 [H, W, 3]
    bad_image_id         image_id is not an integer
    missing_field        "image", "boxes" or "labels" is missing (or the example is not a dict)
    bad_boxes            boxes are not numeric or not [N, 4]
    bad_labels           labels are not integers (int32 range), not [N], or N differs from boxes
    bad_mask_shape       masks are not [N, H, W] for the N boxes and the image's H x W
    bad_mask_dtype       masks are neither bool nor numeric
    undecodable_mask     an encoded mask cannot be decoded
    missing_masks        the batcher trains masks (`with_masks=True`) but the example has
                         instances and no masks
    invalid_annotation   a reader found an annotation it cannot turn into targets (e.g. an
                         undecodable COCO segmentation)

* Dropped (the instance leaves the example, the example stays; counted per instance in
  `dropped[reason]`) — one annotation among good ones:

    bad_box              the box is unusable; `bad_boxes[kind]` says how (`bad_box_counts`):
                         nonfinite (NaN / inf coordinate), negative_size (y1 < y0 or x1 < x0),
                         zero_size (y1 == y0 or x1 == x0), outside_image (no overlap with the
                         image); boxes partly outside are clipped, not dropped
    unmapped_category    its category is not in the training vocabulary (unknown ids, and the
                         held-out novel categories)
    cropped_or_tiny      the augmentation cropped it away or left it thinner than min_box_size
    over_max_instances   beyond the first `max_instances` of the image

`counts()` gives all tallies flat: `{"skipped/<reason>": n, "dropped/<reason>": n,
"bad_box/<kind>": n}` (the bad_box kinds add up to "dropped/bad_box"). Errors other than
CorruptImageError / InvalidExampleError (a reader bug) are not caught and stop the run.
Evaluation (`eval_detection_batches`) never substitutes: an unusable image's row has mask 0.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from rovit_jax.data.image_text import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SKIP_REASONS,
    MIN_IMAGE_SIDE,
    CorruptImageError,
    check_image_size,
    decode_image,
    map_in_order,
    worker_pool,
)
from rovit_jax.data.stream import (
    EpochShuffledStream,
    UnusableExampleError,
    error_reason,
    load_with_substitutes,
)

# Instance-drop reasons counted by DetectionBatches.dropped.
DROP_REASONS = ("bad_box", "unmapped_category", "cropped_or_tiny", "over_max_instances")
# How a dropped box is bad (DetectionBatches.bad_boxes), in the order they are tested.
BAD_BOX_KINDS = ("nonfinite", "negative_size", "zero_size", "outside_image")
# Example-skip reasons counted by DetectionBatches.skipped_by_reason (module docstring).
DETECTION_SKIP_REASONS = IMAGE_SKIP_REASONS + (
    "bad_image_format",
    "bad_image_id",
    "missing_field",
    "bad_boxes",
    "bad_labels",
    "bad_mask_shape",
    "bad_mask_dtype",
    "undecodable_mask",
    "missing_masks",
    "invalid_annotation",
)


class InvalidExampleError(UnusableExampleError):
    """An example does not follow the documented format (wrong shapes, dtypes or lengths) or
    its annotations cannot be turned into targets; `reason` says which rule it broke."""

    default_reason = "invalid_annotation"


class DetectionSource(Protocol):
    """Random-access detection examples: `source[i]` -> example dict (see the module docstring).

    `__getitem__` may raise CorruptImageError or InvalidExampleError for an unusable example.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------
# Example construction and checks.


def _decode_mask(data: Any) -> np.ndarray:
    """One mask (encoded PNG bytes or array [H, W] / [H, W, 1]) -> bool [H, W]."""
    if isinstance(data, bytes):
        try:
            with Image.open(io.BytesIO(data)) as im:
                data = np.asarray(im.convert("L"))
        except Exception as e:  # PIL raises many types for bad data.
            raise CorruptImageError(
                f"undecodable mask ({type(e).__name__}: {e})", reason="undecodable_mask"
            ) from e
    mask = np.asarray(data)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    return mask > 0


def example_from_shapes_record(
    record: Mapping[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, Any]:
    """Converts a shapes-world data-source record into the detection example format.

    Args:
      record: `builder.as_data_source(split)[i]`: "image" uint8 [S, S, 3] or PNG bytes (with
        SkipDecoding), "image_id", and "objects" with per-object lists "bbox" (normalised
        (y0, x0, y1, x1)), "label" and "mask" (uint8 [S, S, 1] with 255 on visible pixels, or PNG
        bytes).
      max_pixels: refuse images that decode to more pixels than this.

    Returns:
      An example dict with image uint8 [S, S, 3], image_id int, boxes float32 [N, 4],
      labels int32 [N] and masks bool [N, S, S].

    Raises:
      CorruptImageError: the image or a mask cannot be decoded.
    """
    image = record["image"]
    if isinstance(image, bytes):
        image = decode_image(image, max_pixels=max_pixels)
    image = np.asarray(image, dtype=np.uint8)
    objects = record["objects"]
    masks = [_decode_mask(m) for m in objects["mask"]]
    return {
        "image": image,
        "image_id": int(np.asarray(record["image_id"]).item()),
        "boxes": np.asarray(objects["bbox"], np.float32).reshape(-1, 4),
        "labels": np.asarray(objects["label"], np.int64).reshape(-1).astype(np.int32),
        "masks": np.stack(masks) if masks else np.zeros((0,) + image.shape[:2], np.bool_),
    }


class ShapesDetectionSource:
    """Random access to a shapes-world split as detection examples (image bytes decoded here)."""

    def __init__(self, builder, split: str, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        import tensorflow_datasets as tfds  # Heavy import kept local.

        if split not in builder.info.splits:
            raise ValueError(
                f"split {split!r} not in dataset {builder.info.full_name} "
                f"(has {list(builder.info.splits)})"
            )
        # Images stay encoded in the record so a corrupt file surfaces as CorruptImageError here,
        # where the batcher can replace the example.
        self._source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        self._max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return example_from_shapes_record(self._source[int(index)], max_pixels=self._max_pixels)


def base_category_map(
    frequency_groups: Mapping[str, Sequence[int]], keep: Sequence[str] = ("f", "c")
) -> dict[int, int]:
    """Dataset category id -> training index for the categories of the `keep` frequency groups.

    Ids are numbered in increasing order. With the default (frequent + common), rare categories
    are left out of detection training, as in the open-vocabulary LVIS protocol (base / novel).
    """
    for group in keep:
        if group not in frequency_groups:
            raise ValueError(f"keep has group {group!r}, not in {sorted(frequency_groups)}")
    ids = sorted({int(i) for group in keep for i in frequency_groups[group]})
    return {cid: index for index, cid in enumerate(ids)}


def _image_array(image: Any, *, max_pixels: int, min_side: int) -> np.ndarray:
    """A decoded image as checked uint8 [H, W, 3]; raises InvalidExampleError / CorruptImageError."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(image, max_pixels=max_pixels, min_side=min_side)
    try:
        image = np.asarray(image)
    except Exception as e:  # ragged lists and other non-arrays
        raise InvalidExampleError(
            f"image must be uint8 [H, W, 3], got {type(image).__name__} ({e})",
            reason="bad_image_format",
        ) from e
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidExampleError(
            f"image must be uint8 [H, W, 3] with H, W > 0, got {image.dtype} {image.shape}",
            reason="bad_image_format",
        )
    try:
        check_image_size(image.shape[0], image.shape[1], max_pixels=max_pixels, min_side=min_side)
    except CorruptImageError as e:  # same rule and reason as for encoded images
        raise InvalidExampleError(str(e), reason=e.reason) from e
    return image


def validate_example(
    example: Mapping[str, Any],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
) -> dict[str, Any]:
    """Checks an example and returns a normalised copy (decoded image, canonical dtypes).

    Returns:
      dict with image uint8 [H, W, 3], image_id int, boxes float32 [N, 4], labels int32 [N],
      masks bool [N, H, W] (only if given), and any other keys passed through. Box VALUES are
      not checked here (NaN, inverted, outside): `drop_invalid_boxes` drops those instances.

    Raises (only these two, whatever the input; `reason` names the broken rule, see the
    module docstring):
      InvalidExampleError: a field is missing or has the wrong type, shape, dtype or length,
        or the image array is empty, too small or too large.
      CorruptImageError: encoded image bytes cannot be decoded or are refused by their header.
    """
    if not isinstance(example, Mapping):
        raise InvalidExampleError(
            f"an example must be a dict, got {type(example).__name__}", reason="missing_field"
        )
    for key in ("image", "boxes", "labels"):
        if key not in example:
            raise InvalidExampleError(
                f"example has no {key!r} field (keys: {sorted(map(str, example))})",
                reason="missing_field",
            )
    out = dict(example)
    image = _image_array(example["image"], max_pixels=max_pixels, min_side=min_side)
    out["image"] = image
    try:
        out["image_id"] = int(np.asarray(example.get("image_id", -1)).item())
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidExampleError(
            f"image_id must be an integer, got {example.get('image_id')!r:.80}",
            reason="bad_image_id",
        ) from e
    try:
        boxes = np.asarray(example["boxes"], np.float32)
    except Exception as e:  # strings, ragged lists, objects: all "not numeric"
        raise InvalidExampleError(
            f"boxes are not a numeric array ({type(e).__name__}: {e})", reason="bad_boxes"
        ) from e
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidExampleError(
            f"boxes must be [N, 4], got shape {boxes.shape}", reason="bad_boxes"
        )
    try:
        labels = np.asarray(example["labels"])
    except Exception as e:
        raise InvalidExampleError(
            f"labels are not an array ({type(e).__name__}: {e})", reason="bad_labels"
        ) from e
    labels = labels.reshape(-1) if labels.size == 0 or labels.ndim == 1 else labels
    if labels.ndim != 1 or labels.shape[0] != boxes.shape[0]:
        raise InvalidExampleError(
            f"labels must be [N] with N = {boxes.shape[0]} boxes, got shape {labels.shape}",
            reason="bad_labels",
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise InvalidExampleError(
            f"labels must be integers, got dtype {labels.dtype}", reason="bad_labels"
        )
    info = np.iinfo(np.int32)
    if labels.size and (labels.min() < info.min or labels.max() > info.max):
        raise InvalidExampleError(
            f"labels must fit int32, got range [{labels.min()}, {labels.max()}]",
            reason="bad_labels",
        )
    out["boxes"], out["labels"] = boxes, labels.astype(np.int32)
    if example.get("masks") is not None:
        out["masks"] = _checked_masks(example["masks"], boxes.shape[0], image.shape[:2])
    else:
        out.pop("masks", None)
    return out


def _checked_masks(masks: Any, num: int, hw: tuple[int, int]) -> np.ndarray:
    """Masks as bool [num, H, W]; raises InvalidExampleError (bad_mask_shape / bad_mask_dtype)."""
    try:
        masks = np.asarray(masks)
    except Exception as e:  # ragged per-instance masks
        raise InvalidExampleError(
            f"masks must be [N, H, W] = {(num, *hw)}, got {type(masks).__name__} ({e})",
            reason="bad_mask_shape",
        ) from e
    if masks.size == 0 and num == 0:
        masks = np.zeros((0, *hw), np.bool_)
    if masks.shape != (num, *hw):
        raise InvalidExampleError(
            f"masks must be [N, H, W] = {(num, *hw)}, got shape {masks.shape}",
            reason="bad_mask_shape",
        )
    if masks.dtype == np.bool_:
        return masks
    if not np.issubdtype(masks.dtype, np.number):
        raise InvalidExampleError(
            f"masks must be bool or numeric, got dtype {masks.dtype}", reason="bad_mask_dtype"
        )
    return masks != 0


def _select(example: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    """The example restricted to the instances where `keep` (bool [N]) holds."""
    out = dict(example)
    for key in ("boxes", "labels", "masks"):
        if key in out:
            out[key] = out[key][keep]
    return out


def drop_invalid_boxes(example: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Drops instances whose box is unusable and clips the others to the image.

    An instance is dropped when a coordinate is NaN or infinite, or when its box, clipped to
    [0, 1], has zero or negative height or width (degenerate, inverted, or outside the image).
    Takes a validated example; returns (example, number of dropped instances).
    """
    boxes = example["boxes"]
    finite = np.isfinite(boxes).all(axis=1)
    clipped = np.clip(np.where(finite[:, None], boxes, 0.0), 0.0, 1.0)
    keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    out = _select(example, keep)
    out["boxes"] = clipped[keep]
    return out, int((~keep).sum())


def bad_box_counts(boxes: np.ndarray) -> dict[str, int]:
    """How many of `boxes` (float [N, 4] normalised) `drop_invalid_boxes` drops, by kind.

    Each dropped box counts once, under the first kind of BAD_BOX_KINDS that applies:
    nonfinite (a NaN / inf coordinate), negative_size (y1 < y0 or x1 < x0), zero_size
    (y1 == y0 or x1 == x0), outside_image (no positive-area overlap with [0, 1]^2). The counts
    add up to the number `drop_invalid_boxes` drops.
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    finite = np.isfinite(b).all(axis=1)
    safe = np.where(finite[:, None], b, 0.0)
    h, w = safe[:, 2] - safe[:, 0], safe[:, 3] - safe[:, 1]
    negative = finite & ((h < 0) | (w < 0))
    zero = finite & ~negative & ((h == 0) | (w == 0))
    clipped = np.clip(safe, 0.0, 1.0)
    overlaps = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    outside = finite & ~negative & ~zero & ~overlaps
    kinds = (~finite, negative, zero, outside)
    return {kind: int(mask.sum()) for kind, mask in zip(BAD_BOX_KINDS, kinds)}


def filter_categories(
    example: dict[str, Any], category_map: Mapping[int, int]
) -> tuple[dict[str, Any], int]:
    """Drops instances whose label is not a key of category_map; returns (example, dropped)."""
    keep = np.asarray([int(label) in category_map for label in example["labels"]], np.bool_)
    return _select(example, keep), int((~keep).sum())


# ----------------------------------------------------------------------------------------------
# Geometric transforms.


def _check_output_size(output_size: Any) -> int:
    if isinstance(output_size, bool) or not isinstance(output_size, (int, np.integer)):
        raise ValueError(f"output_size must be a positive integer, got {output_size!r}")
    if output_size < 1:
        raise ValueError(f"output_size must be a positive integer, got {output_size!r}")
    return int(output_size)


def _check_min_box_size(min_box_size: float) -> float:
    if not np.isfinite(min_box_size) or min_box_size < 0:
        raise ValueError(f"min_box_size must be finite and >= 0, got {min_box_size!r}")
    return float(min_box_size)


def _resize_masks(
    masks: np.ndarray,
    factors: tuple[float, float],
    offset: tuple[int, int],
    content: tuple[int, int],
    size: int,
) -> np.ndarray:
    """Resamples bool [N, H, W] masks onto the canvas: bool [N, size, size].

    Canvas pixel (i, j) of the content region samples source position
    ((oy + i + 0.5) / fy, (ox + j + 0.5) / fx), exactly as the image resize does; bilinear
    (antialiased when shrinking) and thresholded at one half. Each instance is resampled only
    around its own extent, which keeps the cost proportional to the objects, not to N * size^2.
    """
    n, h, w = masks.shape
    fy, fx = factors
    oy, ox = offset
    ch, cw = content
    out = np.zeros((n, size, size), np.bool_)
    rows_any, cols_any = masks.any(axis=2), masks.any(axis=1)
    # Source margin covering the bilinear filter support (it widens to 1/f pixels when shrinking).
    margin_y, margin_x = int(np.ceil(1.0 / min(fy, 1.0))) + 1, int(np.ceil(1.0 / min(fx, 1.0))) + 1
    for k in range(n):
        rows, cols = np.flatnonzero(rows_any[k]), np.flatnonzero(cols_any[k])
        if rows.size == 0:
            continue
        # Canvas region that can receive this instance, one pixel of slack on each side.
        ya = max(int(np.floor(rows[0] * fy - oy)) - 1, 0)
        yb = min(int(np.ceil((rows[-1] + 1) * fy - oy)) + 1, ch)
        xa = max(int(np.floor(cols[0] * fx - ox)) - 1, 0)
        xb = min(int(np.ceil((cols[-1] + 1) * fx - ox)) + 1, cw)
        if ya >= yb or xa >= xb:
            continue
        # Its source window (continuous), and an integer crop of the mask around it.
        sy0, sy1 = (oy + ya) / fy, min((oy + yb) / fy, h)
        sx0, sx1 = (ox + xa) / fx, min((ox + xb) / fx, w)
        cy0, cy1 = max(int(np.floor(sy0)) - margin_y, 0), min(int(np.ceil(sy1)) + margin_y, h)
        cx0, cx1 = max(int(np.floor(sx0)) - margin_x, 0), min(int(np.ceil(sx1)) + margin_x, w)
        crop = Image.fromarray(masks[k, cy0:cy1, cx0:cx1].astype(np.uint8) * 255)
        box = (
            max(sx0 - cx0, 0.0),
            max(sy0 - cy0, 0.0),
            min(sx1 - cx0, cx1 - cx0),
            min(sy1 - cy0, cy1 - cy0),
        )
        region = np.asarray(crop.resize((xb - xa, yb - ya), Image.BILINEAR, box=box))
        out[k, ya:yb, xa:xb] = region >= 128
    return out


def _tight_boxes(masks: np.ndarray) -> np.ndarray:
    """Pixel-edge tight bounds (y0, x0, y1, x1) of bool [N, S, S] masks; zeros for empty masks."""
    n, h, w = masks.shape
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    nonempty = rows.any(axis=1)
    y0 = np.argmax(rows, axis=1)
    y1 = h - np.argmax(rows[:, ::-1], axis=1)
    x0 = np.argmax(cols, axis=1)
    x1 = w - np.argmax(cols[:, ::-1], axis=1)
    boxes = np.stack([y0, x0, y1, x1], axis=1).astype(np.float32)
    return np.where(nonempty[:, None], boxes, 0.0).reshape(n, 4)


def _transform(
    example: dict[str, Any],
    *,
    size: int,
    scale: float,
    unit_offset: tuple[float, float],
    flip: bool,
    min_box_size: float,
) -> dict[str, Any]:
    """Scale by `scale`, crop a size x size window, optionally mirror, pad to the square canvas.

    `unit_offset` in [0, 1)^2 places the crop window within the scaled image when it is larger
    than the canvas (0 = top / left).
    """
    image = example["image"]
    h, w = image.shape[:2]
    nh, nw = max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)
    fy, fx = nh / h, nw / w  # exact per-axis factors after rounding the scaled size
    oy = min(int(unit_offset[0] * (max(nh - size, 0) + 1)), max(nh - size, 0))
    ox = min(int(unit_offset[1] * (max(nw - size, 0) + 1)), max(nw - size, 0))
    ch, cw = min(nh - oy, size), min(nw - ox, size)

    # The crop window in source coordinates; resizing only it equals resize-then-crop.
    box = (ox / fx, oy / fy, min((ox + cw) / fx, w), min((oy + ch) / fy, h))
    content = np.asarray(Image.fromarray(image).resize((cw, ch), Image.BILINEAR, box=box))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:ch, :cw] = content[:, ::-1] if flip else content

    out = {k: v for k, v in example.items() if k not in ("image", "boxes", "labels", "masks")}
    out["image"] = canvas
    if "masks" in example:
        masks = _resize_masks(example["masks"], (fy, fx), (oy, ox), (ch, cw), size)
        if flip:
            masks[:, :ch, :cw] = masks[:, :ch, cw - 1 :: -1]
        boxes = _tight_boxes(masks)
    else:
        pix = example["boxes"].astype(np.float64) * np.array([h, w, h, w])
        pix = pix * np.array([fy, fx, fy, fx]) - np.array([oy, ox, oy, ox])
        pix = np.clip(pix, 0.0, np.array([ch, cw, ch, cw], np.float64))
        if flip:
            pix = np.stack([pix[:, 0], cw - pix[:, 3], pix[:, 2], cw - pix[:, 1]], axis=1)
        boxes = pix.astype(np.float32).reshape(-1, 4)
        masks = None
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_box_size) & (
        (boxes[:, 3] - boxes[:, 1]) >= min_box_size
    )
    keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # never keep empty boxes
    out["boxes"] = boxes[keep] / np.float32(size)
    out["labels"] = example["labels"][keep]
    if masks is not None:
        out["masks"] = masks[keep]
    out["image_info"] = np.array([h, w, scale, 0.0], np.float32)
    out["valid_size"] = np.array([ch, cw], np.int32)
    return out


def large_scale_jitter(
    example: Mapping[str, Any],
    rng: np.random.Generator,
    *,
    output_size: int,
    scale_range: Sequence[float] = (0.1, 2.0),
    flip: bool = True,
    min_box_size: float = 1.0,
) -> dict[str, Any]:
    """Large-scale jitter (ViTDet / Copy-Paste): random scale, random crop, pad, random flip.

    The image is resized so its long side is `output_size * s`, s ~ U(scale_range); a random
    output_size x output_size window is cropped where the result is larger; the content is
    mirrored left-right with probability 1/2 when `flip`; the canvas is padded with zeros at the
    bottom / right. Boxes and masks follow the image (see the module docstring for the output
    format, box recomputation from masks and the `min_box_size` drop rule).

    Args:
      example: an example in the module's format (validated here; bad boxes are dropped).
      rng: the only source of randomness; four draws per call whatever the options.
      output_size: canvas side S in pixels.
      scale_range: (low, high) with 0 < low <= high.
      flip: allow the random horizontal flip.
      min_box_size: instances whose canvas box is thinner than this (pixels) are dropped.

    Returns:
      example with image uint8 [S, S, 3], boxes float32 [K, 4] normalised by S, labels int32 [K],
      masks bool [K, S, S] (if given), image_info float32 [4], valid_size int32 [2].
    """
    size = _check_output_size(output_size)
    min_box_size = _check_min_box_size(min_box_size)
    low, high = (float(v) for v in scale_range)
    if not (0.0 < low <= high and np.isfinite(high)):
        raise ValueError(
            f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}"
        )
    ex, _ = drop_invalid_boxes(validate_example(example))
    s = rng.uniform(low, high)
    unit_offset = rng.random(2)
    mirror = rng.random() < 0.5
    h, w = ex["image"].shape[:2]
    return _transform(
        ex,
        size=size,
        scale=size * s / max(h, w),
        unit_offset=(float(unit_offset[0]), float(unit_offset[1])),
        flip=bool(flip and mirror),
        min_box_size=min_box_size,
    )


def resize_and_pad(
    example: Mapping[str, Any], *, output_size: int, min_box_size: float = 1.0
) -> dict[str, Any]:
    """Evaluation transform: long side resized to output_size, zero padding at the bottom / right.

    Predictions in canvas pixels map back to the original image by dividing by
    `image_info[2]` (the scale). Same output format as `large_scale_jitter`.
    """
    size = _check_output_size(output_size)
    min_box_size = _check_min_box_size(min_box_size)
    ex, _ = drop_invalid_boxes(validate_example(example))
    h, w = ex["image"].shape[:2]
    return _transform(
        ex,
        size=size,
        scale=size / max(h, w),
        unit_offset=(0.0, 0.0),
        flip=False,
        min_box_size=min_box_size,
    )


def _float_image(canvas: np.ndarray, valid_size: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3] canvas -> float32 in [-1, 1], exactly 0 on padding (ViTDet pads with 0)."""
    image = canvas.astype(np.float32) / 127.5 - 1.0
    image[int(valid_size[0]) :] = 0.0
    image[:, int(valid_size[1]) :] = 0.0
    return image


# ----------------------------------------------------------------------------------------------
# Batches.


class NoBatches:
    """The batches of an evaluation-only run (total_steps = 0): asking for one is an error."""

    def __init__(self) -> None:
        self.skipped = 0
        self.skipped_by_reason: dict[str, int] = {}

    def counts(self) -> dict[str, int]:
        return {}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        raise RuntimeError(f"an evaluation-only run has no training batch (step {step})")


class DetectionBatches:
    """Deterministic per-step detection training batches for this host.

    Mirrors `image_text.PretrainBatches`: the batch of global step `s` is a pure function of
    (seed, s), made of stream positions `[s * B, (s + 1) * B)` of an endless stream visiting the
    dataset in a fresh permutation each epoch; each host takes its contiguous slice.

    `batch(step)` returns, with b = this host's share of `global_batch`, S = `image_size`,
    I = `max_instances` and M = S / `mask_stride`:
      image: float32 [b, S, S, 3] in [-1, 1], 0 on padding;
      boxes: float32 [b, I, 4] (y0, x0, y1, x1) in pixels of the padded canvas, 0 on padding;
      classes: int32 [b, I] training-vocabulary index (`category_map[label]`), -1 on padding;
      masks: uint8 [b, I, M, M] (only if `with_masks`) instance masks on the canvas at stride
        `mask_stride`: mask pixel (i, j) covers canvas pixels [m*i, m*i + m) x [m*j, m*j + m) and
        is 1 when at least half of them belong to the instance, so a canvas-pixel box maps to
        mask coordinates by dividing by m (the mask head RoIAligns its targets from these);
      valid: bool [b, I] real instances;
      image_info: float32 [b, 4] (original height, original width, scale, 0).

    Per example: decode and check, drop bad boxes (`drop_invalid_boxes`), drop instances whose
    category is not in `category_map` (this holds rare / novel categories out of training), apply
    `large_scale_jitter` (seeded by (seed, epoch, dataset index)), keep the first `max_instances`
    instances in annotation order. Images left without instances are kept as negatives (a row of
    padding, `valid` all False). Dropped instances are counted per reason in `dropped` (and
    bad boxes per kind in `bad_boxes`). An example whose image cannot be used or that breaks
    the format is replaced by a deterministic substitute and counted in `skipped` (replaced
    stream positions) and in `skipped_by_reason`. The module docstring lists every reason;
    batches and counts are the same for any `num_workers`.
    """

    def __init__(
        self,
        source: DetectionSource,
        *,
        global_batch: int,
        image_size: int,
        max_instances: int,
        seed: int,
        category_map: Mapping[int, int] | None = None,
        scale_range: Sequence[float] = (0.1, 2.0),
        flip: bool = True,
        with_masks: bool = True,
        mask_stride: int = 4,
        min_box_size: float = 1.0,
        process_index: int = 0,
        process_count: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_substitutes: int = 64,
        num_workers: int = 1,
    ):
        self.stream = EpochShuffledStream(
            len(source),
            global_batch=global_batch,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
        self.index_at, self.positions = self.stream.index_at, self.stream.positions
        self.pool = worker_pool(num_workers)
        size = _check_output_size(image_size)
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances!r}")
        if mask_stride < 1 or size % mask_stride:
            raise ValueError(
                f"mask_stride must be a positive divisor of image_size {size}, got {mask_stride!r}"
            )
        low, high = (float(v) for v in scale_range)
        if not (0.0 < low <= high and np.isfinite(high)):
            raise ValueError(
                f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}"
            )
        if category_map is not None:
            category_map = {int(k): int(v) for k, v in category_map.items()}
            bad = {k: v for k, v in category_map.items() if v < 0}
            if bad:
                raise ValueError(f"category_map values must be >= 0, got {bad}")
        self.source = source
        self.global_batch, self.image_size, self.seed = global_batch, size, seed
        self.max_instances, self.category_map = int(max_instances), category_map
        self.scale_range, self.flip = (low, high), flip
        self.with_masks, self.mask_stride = with_masks, int(mask_stride)
        self.min_box_size = _check_min_box_size(min_box_size)
        self.max_pixels, self.max_substitutes = max_pixels, max_substitutes
        self.skipped = 0
        self.skipped_by_reason: dict[str, int] = dict.fromkeys(DETECTION_SKIP_REASONS, 0)
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.bad_boxes = dict.fromkeys(BAD_BOX_KINDS, 0)

    def _load_one(self, idx: int) -> dict[str, Any]:
        """The validated example at dataset index `idx`, or raises (see the module docstring)."""
        ex = validate_example(self.source[idx], max_pixels=self.max_pixels)
        if self.with_masks and "masks" not in ex:
            if len(ex["labels"]):
                raise InvalidExampleError(
                    "with_masks=True but the example has no masks", reason="missing_masks"
                )
            ex["masks"] = np.zeros((0,) + ex["image"].shape[:2], np.bool_)
        return ex

    def _load(self, index: int) -> tuple[int, dict[str, Any], str | None]:
        """(dataset index, validated example, skip reason of `index` or None if it was used)."""
        failures: list[Exception] = []
        idx, ex, substituted = load_with_substitutes(
            index,
            len(self.source),
            self._load_one,
            errors=(CorruptImageError, InvalidExampleError),
            max_substitutes=self.max_substitutes,
            what="detection example",
            failures=failures,
        )
        # Counted under the original example's problem, whatever its substitutes' were.
        return idx, ex, error_reason(failures[0]) if substituted else None

    def _row(
        self, position: int
    ) -> tuple[dict[str, np.ndarray], str | None, dict[str, int], dict[str, int]]:
        """(one batch row, skip reason or None, drops per DROP_REASONS, bad boxes per kind)."""
        counts = dict.fromkeys(DROP_REASONS, 0)
        epoch, index = self.index_at(position)
        idx, ex, reason = self._load(index)
        kinds = bad_box_counts(ex["boxes"])
        ex, bad = drop_invalid_boxes(ex)
        counts["bad_box"] += bad
        if self.category_map is not None:
            ex, unmapped = filter_categories(ex, self.category_map)
        else:  # identity vocabulary: only negative labels cannot index it
            keep = ex["labels"] >= 0
            ex, unmapped = _select(ex, keep), int((~keep).sum())
        counts["unmapped_category"] += unmapped
        num_before = len(ex["labels"])
        if not self.with_masks:
            ex.pop("masks", None)
        ex = large_scale_jitter(
            ex,
            np.random.default_rng([self.seed, epoch, idx, 1]),
            output_size=self.image_size,
            scale_range=self.scale_range,
            flip=self.flip,
            min_box_size=self.min_box_size,
        )
        num = len(ex["labels"])
        counts["cropped_or_tiny"] += num_before - num
        counts["over_max_instances"] += max(num - self.max_instances, 0)
        k = min(num, self.max_instances)

        size, cap = self.image_size, self.max_instances
        boxes = np.zeros((cap, 4), np.float32)
        boxes[:k] = ex["boxes"][:k] * np.float32(size)
        classes = np.full((cap,), -1, np.int32)
        labels = ex["labels"][:k]
        classes[:k] = (
            [self.category_map[int(c)] for c in labels] if self.category_map is not None else labels
        )
        valid = np.zeros((cap,), np.bool_)
        valid[:k] = True
        row = {
            "image": _float_image(ex["image"], ex["valid_size"]),
            "boxes": boxes,
            "classes": classes,
            "valid": valid,
            "image_info": ex["image_info"],
        }
        if self.with_masks:
            m, stride = size // self.mask_stride, self.mask_stride
            masks = np.zeros((cap, m, m), np.uint8)
            if k:
                cover = ex["masks"][:k].reshape(k, m, stride, m, stride).mean(axis=(2, 4))
                masks[:k] = cover >= 0.5
            row["masks"] = masks
        return row, reason, counts, kinds

    def batch(self, step: int) -> dict[str, np.ndarray]:
        results = map_in_order(self.pool, self._row, self.stream.host_positions(step))
        for _, reason, drops, kinds in results:  # in stream order, whatever the workers
            if reason is not None:  # One count per replaced stream position.
                self.skipped += 1
                self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
            for key, n in drops.items():
                self.dropped[key] += n
            for key, n in kinds.items():
                self.bad_boxes[key] += n
        rows = [row for row, _, _, _ in results]
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

    def counts(self) -> dict[str, int]:
        """Flat tallies for logging: `{"skipped/<reason>": n, "dropped/<reason>": n,
        "bad_box/<kind>": n}`, every known key present (zeros too)."""
        out = {f"skipped/{reason}": n for reason, n in self.skipped_by_reason.items()}
        out.update({f"dropped/{reason}": n for reason, n in self.dropped.items()})
        out.update({f"bad_box/{kind}": n for kind, n in self.bad_boxes.items()})
        return out

    def restore_counts(self, counts: Mapping[str, int]) -> None:
        """Restores tallies saved from `counts()` (e.g. on resume); `skipped` becomes the sum of
        the per-reason skips."""
        for key, n in counts.items():
            group, _, name = str(key).partition("/")
            table = {
                "skipped": self.skipped_by_reason,
                "dropped": self.dropped,
                "bad_box": self.bad_boxes,
            }.get(group)
            if table is not None and name:
                table[name] = int(n)
        self.skipped = sum(self.skipped_by_reason.values())


def eval_detection_batches(
    source: DetectionSource,
    *,
    batch_size: int,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[dict[str, np.ndarray]]:
    """Ordered, unaugmented inference batches over the whole source, padded with a mask.

    Every host yields the same number of batches, holding its `batch_size // process_count`
    slice of each global batch (big_vision-style padding). Each batch has
      image: float32 [b, S, S, 3] (`resize_and_pad`, in [-1, 1], 0 on padding);
      image_info: float32 [b, 4] (original height, original width, scale, 0); divide canvas
        coordinates by the scale to get original pixels;
      image_id: int64 [b] (-1 on padding and on unusable examples);
      mask: bool [b], False on padding and on unusable examples (undecodable or malformed images);
      index: int32 [b], the dataset index (-1 on padding).
    Annotations are ignored here; evaluation reads ground truth from the dataset itself.
    Unusable images (any skip reason of the module docstring) are masked, never substituted.
    """
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be positive and divisible by the {process_count} hosts"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    size = _check_output_size(image_size)
    n = len(source)
    local = batch_size // process_count
    blank = np.zeros((size, size, 3), np.float32)
    for b in range(-(-n // batch_size)):
        images, infos, ids, mask, index = [], [], [], [], []
        first = b * batch_size + process_index * local
        for i in range(first, first + local):
            image, info, image_id, ok = blank, np.zeros(4, np.float32), -1, False
            if i < n:
                try:
                    raw = source[i]
                    ex = validate_example(
                        {
                            "image": raw.get("image"),
                            "image_id": raw.get("image_id", -1),
                            "boxes": np.zeros((0, 4), np.float32),
                            "labels": np.zeros((0,), np.int32),
                        },
                        max_pixels=max_pixels,
                    )
                    ex = resize_and_pad(ex, output_size=size)
                    image = _float_image(ex["image"], ex["valid_size"])
                    info, image_id, ok = ex["image_info"], ex["image_id"], True
                except (CorruptImageError, InvalidExampleError) as e:
                    logging.warning("evaluation: skipping detection example %d: %s", i, e)
            images.append(image)
            infos.append(info)
            ids.append(image_id)
            mask.append(ok)
            index.append(i if i < n else -1)
        yield {
            "image": np.stack(images),
            "image_info": np.stack(infos).astype(np.float32),
            "image_id": np.asarray(ids, np.int64),
            "mask": np.asarray(mask, np.bool_),
            "index": np.asarray(index, np.int32),
        }
