"""Objects365 reader (COCO-format JSON, images in patch folders), for zero-shot transfer.

Objects365 JSONs name files as the authors laid them out ("images/v1/patch8/
objects365_v1_00420917.jpg" in v2), while downloads unpack to e.g. "train/patch8/...". The file
is looked up in `image_dir` under ever shorter suffixes of "file_name" ("images/v1/patch8/x.jpg",
"v1/patch8/x.jpg", "patch8/x.jpg", "x.jpg"), so `image_dir` may be the folder holding the patch
folders or a flat folder of images. Objects365 has boxes only (no masks), and no frequency
groups: detectors trained elsewhere are evaluated on its vocabulary (`categories.names()`).
Examples follow the COCO-format conventions of `rovit_jax.data.coco`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from rovit_jax.data.categories import CategoryTable
from rovit_jax.data.coco import CocoStyleDetectionSource
from rovit_jax.data.image_text import DEFAULT_MAX_PIXELS


class Objects365DetectionSource(CocoStyleDetectionSource):
    """Objects365 JSON + image folder as a box-only DetectionSource (no "masks" key).

    Train or evaluate with `DetectionBatches(..., with_masks=False)` / box AP.
    """

    _what = "Objects365 annotation JSON"

    def __init__(
        self,
        annotation_json: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        categories: Iterable[int] | CategoryTable | None = None,
        include_crowd: bool = False,
        image_ids: Iterable[int] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        """Arguments and errors as for `CocoStyleDetectionSource` (with_masks is always False)."""
        super().__init__(
            annotation_json,
            image_dir,
            categories=categories,
            include_crowd=include_crowd,
            with_masks=False,
            image_ids=image_ids,
            max_pixels=max_pixels,
        )
