"""LVIS v1 reader: annotation JSON + the COCO 2017 image folders, with federated labels.

LVIS v1 images are COCO 2017 images (train and val alike, for both LVIS splits); an image
record names its file through "coco_url" ("http://images.cocodataset.org/train2017/x.jpg") —
or "file_name" in older versions. The file is looked up in `image_dir` as "train2017/x.jpg"
(image_dir = the COCO root holding train2017/ and val2017/), then as "x.jpg" (one flat folder).

Categories carry LVIS frequencies: base = frequent + common, novel = rare (the open-vocabulary
LVIS protocol, `categories.base_ids()` / `novel_ids()` with their defaults). Examples follow the
COCO-format conventions of `rovit_jax.data.coco` (LVIS has no crowd annotations).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlparse

from rovit_jax.data.categories import CategoryTable
from rovit_jax.data.coco import CocoStyleDetectionSource, path_suffixes
from rovit_jax.data.image_text import DEFAULT_MAX_PIXELS


class LvisDetectionSource(CocoStyleDetectionSource):
    """LVIS v1 JSON + COCO image folder as a DetectionSource (instance masks included).

    Attributes (besides those of `CocoStyleDetectionSource`):
      categories: CategoryTable with LVIS frequencies ("f" / "c" / "r").
    """

    _what = "LVIS annotation JSON"
    _image_keys = ("id", "width", "height")

    def __init__(
        self,
        annotation_json: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        categories: Iterable[int] | CategoryTable | None = None,
        with_masks: bool = True,
        image_ids: Iterable[int] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        """Reads and indexes the JSON; arguments as for `CocoStyleDetectionSource`.

        Raises:
          FileNotFoundError / ValueError: as `CocoStyleDetectionSource`, and ValueError when an
            image has neither "coco_url" nor "file_name", or a category lacks a valid
            "frequency".
        """
        super().__init__(
            annotation_json,
            image_dir,
            categories=categories,
            include_crowd=False,
            with_masks=with_masks,
            image_ids=image_ids,
            max_pixels=max_pixels,
        )
        where = f"{self._what} {self.annotation_json}"
        for c in self.categories:
            if not c.frequency:
                raise ValueError(f"{where}: category {c.id} ({c.name!r}) has no 'frequency'")
        for im in self._images:
            if "coco_url" not in im and "file_name" not in im:
                raise ValueError(
                    f"{where}: image {im['id']} has neither 'coco_url' nor 'file_name'"
                )
        served = set(self.categories.ids())
        self._federated = {
            int(im["id"]): (
                [int(c) for c in im.get("neg_category_ids", []) if int(c) in served],
                [int(c) for c in im.get("not_exhaustive_category_ids", []) if int(c) in served],
            )
            for im in self._images
        }

    def _relative_paths(self, image: Mapping[str, Any]) -> list[str]:
        paths = []
        if "coco_url" in image:
            paths += path_suffixes(urlparse(str(image["coco_url"])).path)
        if "file_name" in image:
            paths += [p for p in path_suffixes(str(image["file_name"])) if p not in paths]
        return paths

    def federated(self, image_id: int) -> tuple[list[int], list[int]]:
        """(neg_category_ids, not_exhaustive_category_ids) of an image, as in the JSON.

        Negative categories are verified absent from the image; not-exhaustive ones may have
        unannotated instances. Both are limited to the served categories. KeyError naming the id
        if the image is not served.
        """
        try:
            neg, not_exhaustive = self._federated[int(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id} is not served by this source") from None
        return list(neg), list(not_exhaustive)

    def ground_truth(self) -> dict[str, Any]:
        """The LVIS dict restricted to the served images and categories, for `evaluate_lvis`.

        The federated lists of each image are limited to the served categories too.
        """
        gt = super().ground_truth()
        for im in gt["images"]:
            neg, not_exhaustive = self._federated[int(im["id"])]
            im["neg_category_ids"], im["not_exhaustive_category_ids"] = neg, not_exhaustive
        return gt
