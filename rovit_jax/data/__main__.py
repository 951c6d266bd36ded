"""Checks a dataset on disk with the project's readers: counts, decode failures, rendered samples.

  python -m rovit_jax.data check --format coco --annotations instances_val2017.json \\
      --images val2017 --render 4 --out /some/folder

Every path may also be a URL (`gs://bucket/coco/val2017`); the shapes data dir is handed to
tensorflow-datasets as it is.

Formats and what --annotations / --images mean:
  coco, lvis, objects365   instances JSON / image folder
  coco-captions            captions JSON / image folder
  karpathy                 Karpathy split JSON / image folder (--split, default "test")
  web                      --images: TFRecord shards (folder, glob or "{000..099}" pattern)
  shapes                   --images: tfds data dir (default $TFDS_DATA_DIR or
                           ~/tensorflow_datasets; the world is generated there if missing);
                           --split (default "train"); --world "image_size=64,num_train=100,..."

Prints one "name: value" line per count. Exit code 0 when the data could be read (decode
failures are reported, not fatal), 2 with a one-line message on missing or malformed input.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from rovit_jax import paths
from rovit_jax.data.categories import CategoryTable
from rovit_jax.data.detection_example import InvalidExampleError
from rovit_jax.data.image_text import CorruptImageError, decode_image

DETECTION_FORMATS = ("coco", "lvis", "objects365", "shapes")
CAPTION_FORMATS = ("coco-captions", "karpathy", "web")
FORMATS = DETECTION_FORMATS + CAPTION_FORMATS
_UNUSABLE = (CorruptImageError, InvalidExampleError)


class InputError(Exception):
    """Missing or malformed command-line input (reported with exit code 2)."""


def _need(value: str | None, flag: str, fmt: str) -> str:
    if not value:
        raise InputError(f"--format {fmt} needs {flag}")
    return value


def _parse_world(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise InputError(f"--world item {item!r} is not key=integer")
        out[key.strip()] = int(value)
    return out


# ----------------------------------------------------------------------------------------------
# Opening sources.


def open_detection(args: argparse.Namespace) -> tuple[Any, CategoryTable]:
    """(source, category table) for a detection format."""
    fmt = args.format
    if fmt == "shapes":
        from rovit_jax.data import shapes_tfds
        from rovit_jax.data.shapes_detection import ShapesDetectionSource
        from rovit_jax.data.sources import default_data_dir

        data_dir = args.images or default_data_dir()
        try:
            builder = shapes_tfds.build_shapes_world(data_dir, **_parse_world(args.world))
        except (TypeError, ValueError) as e:  # an unknown --world key, or a value out of range
            raise InputError(f"--world: {e}") from e
        split = args.split or "train"
        source = ShapesDetectionSource(builder, split)
        return source, CategoryTable.from_records(builder.info.metadata["categories"])
    annotations = _need(args.annotations, "--annotations", fmt)
    images = _need(args.images, "--images", fmt)
    if fmt == "coco":
        from rovit_jax.data.coco import CocoDetectionSource as cls
    elif fmt == "lvis":
        from rovit_jax.data.lvis import LvisDetectionSource as cls
    else:
        from rovit_jax.data.objects365 import Objects365DetectionSource as cls
    source = cls(annotations, images)
    return source, source.categories


def open_captions(args: argparse.Namespace) -> Any:
    """An ImageTextSource for a caption format."""
    fmt = args.format
    if fmt == "web":
        from rovit_jax.data.web_shards import WebShardsImageTextSource

        return WebShardsImageTextSource(_need(args.images, "--images", fmt), num_workers=2)
    annotations = _need(args.annotations, "--annotations", fmt)
    images = _need(args.images, "--images", fmt)
    if fmt == "karpathy":
        from rovit_jax.data.flickr30k import KarpathyCaptionsSource

        return KarpathyCaptionsSource(annotations, images, split=args.split or "test")
    from rovit_jax.data.coco import CocoCaptionsSource

    return CocoCaptionsSource(annotations, images, all_captions=True)


# ----------------------------------------------------------------------------------------------
# Counting.


def _labels(source: Any, index: int) -> np.ndarray:
    """Target labels of one example, without decoding the image when the source allows it."""
    if hasattr(source, "labels"):
        return source.labels(index)
    return np.asarray(source[index]["labels"])


def detection_counts(source: Any, table: CategoryTable) -> dict[str, Any]:
    """Images, instances, crowd, empty images and per-frequency-group counts of a source."""
    per_category: dict[int, int] = {}
    empty = crowd = 0
    for i in range(len(source)):
        labels = _labels(source, i)
        empty += labels.size == 0
        for label in labels.tolist():
            per_category[label] = per_category.get(label, 0) + 1
        if hasattr(source, "num_crowd"):
            crowd += source.num_crowd(i)
    counts: dict[str, Any] = {
        "images": len(source),
        "instances": sum(per_category.values()),
        "crowd_instances_excluded": crowd,
        "categories": len(table),
        "categories_without_instances": sum(1 for c in table if not per_category.get(c.id)),
        "images_without_annotations": empty,
    }
    for group, ids in table.frequency_groups().items():
        if ids:
            name = group or "unknown"
            instances = sum(per_category.get(i, 0) for i in ids)
            counts[f"frequency {name}"] = f"categories={len(ids)} instances={instances}"
    return counts


def decode_failures(source: Any, num: int, *, detection: bool) -> tuple[int, int, str]:
    """(failures, checked, first error message) over the first `num` examples."""
    checked = min(num, len(source))
    failures, first = 0, ""
    for i in range(checked):
        try:
            ex = source[i]
            if not detection:
                decode_image(ex["image"])
        except _UNUSABLE as e:
            failures += 1
            first = first or f"example {i}: {e}"
    return failures, checked, first


def caption_counts(source: Any) -> dict[str, Any]:
    counts: dict[str, Any] = {"examples": len(source)}
    if hasattr(source, "retrieval_groups"):
        groups = source.retrieval_groups()
        per_image = np.bincount(groups, minlength=source.num_images)
        counts.update(
            images=source.num_images,
            captions=len(groups),
            captions_per_image=f"min={per_image.min()} max={per_image.max()}",
        )
    elif hasattr(source, "text_to_image"):
        groups = source.text_to_image()
        counts.update(images=len(source.image_ids), captions=len(groups))
    if hasattr(source, "files"):
        counts["shards"] = len(source.files)
    return counts


# ----------------------------------------------------------------------------------------------
# Rendering.


def _sample_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over [0, n) (deterministic)."""
    if n == 0 or k <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n)).round()})


def render_detection_samples(
    source: Any, table: CategoryTable, num: int, out_dir: str, prefix: str
) -> list[str]:
    """Writes `num` examples with their boxes and category names; returns the PNG paths."""
    from rovit_jax.detection.render import draw_detections, save_png

    names = table.by_id()
    written = []
    for i in _sample_indices(len(source), num):
        try:
            ex = source[i]
        except _UNUSABLE as e:
            print(f"render: skipping example {i}: {e}")
            continue
        image = np.asarray(ex["image"])
        h, w = image.shape[:2]
        boxes = np.asarray(ex["boxes"], np.float64).reshape(-1, 4) * [h, w, h, w]
        labels = np.asarray(ex["labels"]).tolist()
        label_names = [names[c].name if c in names else str(c) for c in labels]
        path = os.path.join(out_dir, f"{prefix}_{i:06d}_id{int(ex.get('image_id', i))}.png")
        drawn = draw_detections(
            image,
            boxes,
            np.ones(len(labels)),
            np.arange(len(labels)),
            label_names,
            max_boxes=max(len(labels), 1),
            min_score=0.0,
            upscale=max(1, 256 // max(h, w)),
        )
        save_png(drawn, path)
        written.append(path)
    return written


def render_caption_samples(source: Any, num: int, out_dir: str, prefix: str) -> list[str]:
    """Writes `num` images (long side at most 384 px) with their caption underneath."""
    from rovit_jax.detection.render import save_png

    written = []
    for i in _sample_indices(len(source), num):
        try:
            ex = source[i]
            image = Image.fromarray(decode_image(ex["image"]))
        except _UNUSABLE as e:
            print(f"render: skipping example {i}: {e}")
            continue
        image.thumbnail((384, 384))
        lines = _wrap(ex["caption"], max(image.width // 7, 20))
        canvas = Image.new("RGB", (image.width, image.height + 14 * len(lines) + 6), "white")
        canvas.paste(image, (0, 0))
        draw = ImageDraw.Draw(canvas)
        for k, line in enumerate(lines):
            draw.text((3, image.height + 3 + 14 * k), line, fill=(0, 0, 0))
        path = os.path.join(out_dir, f"{prefix}_{i:06d}.png")
        save_png(canvas, path)
        written.append(path)
    return written


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines or [""]


# ----------------------------------------------------------------------------------------------
# Entry point.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rovit_jax.data", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="count a dataset and render samples")
    check.add_argument("--format", required=True, choices=FORMATS)
    check.add_argument("--annotations", help="annotation / caption / split JSON")
    check.add_argument("--images", help="image folder (web: shards; shapes: tfds data dir)")
    check.add_argument("--split", help="karpathy: split name (test); shapes: split (train)")
    check.add_argument("--render", type=int, default=0, help="number of samples to render")
    check.add_argument("--out", help="folder for rendered PNGs (created)")
    check.add_argument("--decode-check", type=int, default=100, help="examples decoded (K)")
    check.add_argument("--world", default="", help="shapes: generation parameters k=v,...")
    return parser


def run_check(args: argparse.Namespace) -> None:
    if args.render and not args.out:
        raise InputError("--render needs --out")
    detection = args.format in DETECTION_FORMATS
    if detection:
        source, table = open_detection(args)
        counts = detection_counts(source, table)
    else:
        source = open_captions(args)
        counts = caption_counts(source)
    print(f"format: {args.format}")
    for key, value in counts.items():
        print(f"{key}: {value}")
    failures, checked, first = decode_failures(source, args.decode_check, detection=detection)
    print(f"decode_failures: {failures} of first {checked}")
    if first:
        print(f"first_failure: {first}")
    if hasattr(source, "undecodable_captions"):
        print(f"non_utf8_captions: {source.undecodable_captions} of first {checked}")
    if args.render:
        paths.makedirs(args.out)
        prefix = args.format.replace("-", "_")
        if detection:
            written = render_detection_samples(source, table, args.render, args.out, prefix)
        else:
            written = render_caption_samples(source, args.render, args.out, prefix)
        print(f"rendered: {len(written)} -> {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_check(args)
    except (InputError, FileNotFoundError, ValueError) as e:
        message = " ".join(str(e).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
