"""Detection training and evaluation batches: deterministic, fixed-shape, hostile-input proof.

The example format lives in `data.detection_example`, the geometric transforms (LSJ,
resize-and-pad) in `data.detection_transforms`, the readers in `data.coco`, `data.lvis` and
`data.shapes_detection`.

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

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rovit_jax.data.detection_example import (
    BAD_BOX_KINDS,
    DETECTION_SKIP_REASONS,
    DROP_REASONS,
    DetectionSource,
    InvalidExampleError,
    bad_box_counts,
    drop_invalid_boxes,
    filter_categories,
    select_instances,
    validate_example,
)
from rovit_jax.data.detection_transforms import (
    check_min_box_size,
    check_output_size,
    float_canvas,
    large_scale_jitter,
    resize_and_pad,
)
from rovit_jax.data.image_text import DEFAULT_MAX_PIXELS, CorruptImageError
from rovit_jax.data.pixels import DEFAULT_PIXELS, Pixels
from rovit_jax.data.stream import (
    StreamBatches,
    error_reason,
    eval_host_indices,
    load_with_substitutes,
)

# ----------------------------------------------------------------------------------------------
# Batches.


class NoBatches:
    """The batches of an evaluation-only run (total_steps = 0): asking for one is an error."""

    def __init__(self) -> None:
        self.skipped = 0

    def counts(self) -> dict[str, int]:
        return {}

    def restore_counts(self, counts: Mapping[str, int]) -> None:
        del counts  # nothing is counted

    def batch(self, step: int) -> dict[str, np.ndarray]:
        raise RuntimeError(f"an evaluation-only run has no training batch (step {step})")


class DetectionBatches(StreamBatches):
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
        worker_processes: int = 0,
        pixels: Pixels = DEFAULT_PIXELS,
    ):
        size = check_output_size(image_size)
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
        super().__init__(
            len(source),
            global_batch=global_batch,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            num_workers=num_workers,
            worker_processes=worker_processes,
            tallies={
                "skipped": DETECTION_SKIP_REASONS,
                "dropped": DROP_REASONS,
                "bad_box": BAD_BOX_KINDS,
            },
        )
        self.source = source
        self.pixels = pixels
        self.image_size = size
        self.max_instances, self.category_map = int(max_instances), category_map
        self.scale_range, self.flip = (low, high), flip
        self.with_masks, self.mask_stride = with_masks, int(mask_stride)
        self.min_box_size = check_min_box_size(min_box_size)
        self.max_pixels, self.max_substitutes = max_pixels, max_substitutes
        # Per-reason dropped instances and per-kind bad boxes (views of the tallies).
        self.dropped, self.bad_boxes = self.tallies["dropped"], self.tallies["bad_box"]

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
    ) -> tuple[dict[str, np.ndarray], str | None, dict[str, dict[str, int]]]:
        """(one batch row, skip reason or None, {"dropped": per DROP_REASONS, "bad_box": per
        kind})."""
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
            ex, unmapped = select_instances(ex, keep), int((~keep).sum())
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
            "image": float_canvas(ex["image"], ex["valid_size"], self.pixels),
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
        return row, reason, {"dropped": counts, "bad_box": kinds}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self._rows(step)
        return {key: self.stack([r[key] for r in rows]) for key in rows[0]}


def eval_detection_batches(
    source: DetectionSource,
    *,
    batch_size: int,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pixels: Pixels = DEFAULT_PIXELS,
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
    size = check_output_size(image_size)
    n = len(source)
    blank = np.zeros((size, size, 3), np.float32)
    for indices in eval_host_indices(n, batch_size, process_index, process_count):
        images, infos, ids, mask, index = [], [], [], [], []
        for i in indices:
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
                    image = float_canvas(ex["image"], ex["valid_size"], pixels)
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
