"""The shapes world's tfds records as detection examples (`data.detection_example` format)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rovit_jax.data.detection_example import decode_mask
from rovit_jax.data.image_text import DEFAULT_MAX_PIXELS, decode_image


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
    masks = [decode_mask(m) for m in objects["mask"]]
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
