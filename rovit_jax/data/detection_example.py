"""The detection example format, its checks and the instance filters every detection reader
and the batcher share.

Example format (what every detection reader produces, shapes world and COCO/LVIS alike):

  {"image": uint8 [H, W, 3] (or encoded image bytes, decoded by the pipeline),
   "image_id": int,
   "boxes": float32 [N, 4] normalised (y0, x0, y1, x1) in pixel-edge coordinates,
   "labels": int32 [N] dataset category ids,
   "masks": bool or uint8 [N, H, W], nonzero on the instance's pixels (optional)}

`validate_example` checks an example against this format and raises `InvalidExampleError` /
`CorruptImageError` with a reason key; the reason keys, and what the batcher does with each
(skip the example, drop an instance), are listed in `data.detection_input`'s docstring.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
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
)
from rovit_jax.data.stream import UnusableExampleError

# Instance-drop reasons counted by DetectionBatches.dropped.
DROP_REASONS = ("bad_box", "unmapped_category", "cropped_or_tiny", "over_max_instances")
# How a dropped box is bad (DetectionBatches.bad_boxes), in the order they are tested.
BAD_BOX_KINDS = ("nonfinite", "negative_size", "zero_size", "outside_image")
# Example-skip reasons counted by DetectionBatches.skipped_by_reason (see `data.detection_input`).
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


def decode_mask(data: Any) -> np.ndarray:
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


def select_instances(example: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
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
    out = select_instances(example, keep)
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
    return select_instances(example, keep), int((~keep).sum())
