r"""Detect free-text queries in images with a trained detection run and draw the results.

  python -m rovit_jax.predict --checkpoint runs/shapes_detect --image scene.png \
      --query "striped red" --query "dotted blue" --out scene_dets.png --json scene_dets.json

`--image` may repeat and may name a folder (its image files); with more than one image, `--out`
is a folder that receives one PNG per image (named after the image) and a progress bar is shown.
The PNG shows translucent masks, boxes and a filled tag "<query> <score>" per detection; the JSON
holds, per image, the boxes (y0, x0, y1, x1 in original pixels), scores, labels (query indices),
names and masks as COCO run-length encodings (pycocotools `mask.decode` reads them).
Images, `--out` and `--json` may be local paths or bucket URLs (gs://...).
Bad input (a missing or unreadable image, a checkpoint that is not a detection run, an empty or
too long query) ends with exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from rovit_jax import paths

__all__ = ["detections_to_json", "expand_images", "main", "mask_to_rle"]


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """bool [H, W] -> COCO RLE {"size": [H, W], "counts": str} (pycocotools compressed)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def detections_to_json(dets, image: str, png: str | None = None) -> dict[str, Any]:
    """One image's `Detections` as a JSON-ready dict (masks as COCO RLE when present)."""
    record: dict[str, Any] = {
        "image": image,
        "height": int(dets.image_size[0]),
        "width": int(dets.image_size[1]),
        "boxes": [[round(float(v), 3) for v in b] for b in dets.boxes],
        "scores": [round(float(s), 6) for s in dets.scores],
        "labels": [int(c) for c in dets.labels],
        "names": list(dets.names),
    }
    if dets.masks is not None:
        record["masks"] = [mask_to_rle(m) for m in dets.masks]
    if png is not None:
        record["rendered"] = png
    return record


def expand_images(specs: Sequence[str]) -> tuple[list[str], bool]:
    """(image paths, whether a folder was given): folders are replaced by their image files."""
    from rovit_jax.inference.images import list_images

    files, folder = [], False
    for spec in specs:
        if paths.isdir(spec):
            files += list_images(spec)
            folder = True
        elif paths.isfile(spec):
            files.append(spec)
        else:
            raise FileNotFoundError(f"image file or folder not found: {spec}")
    return files, folder


def _output_paths(images: list[str], out: str, many: bool) -> list[str]:
    if not many:
        if paths.isdir(out):
            raise ValueError(f"--out {out} is a folder; give a .png file for one image")
        return [out if out.lower().endswith(".png") else out + ".png"]
    if paths.exists(out) and not paths.isdir(out):
        raise ValueError(f"--out {out} is a file; with several images --out must be a folder")
    names, seen = [], set()
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, n = stem, 1
        while name in seen:  # same file name in two folders
            n += 1
            name = f"{stem}_{n}"
        seen.add(name)
        names.append(os.path.join(out, name + ".png"))
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rovit_jax.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a detection run's workdir")
    p.add_argument("--image", action="append", required=True, help="image file or folder")
    p.add_argument("--query", action="append", required=True, help="a free-text query")
    p.add_argument("--out", required=True, help="output PNG (one image) or folder (several)")
    p.add_argument("--json", default=None, help="also write the detections to this JSON file")
    p.add_argument("--threshold", type=float, default=0.3, help="minimum score (default 0.3)")
    p.add_argument("--max_detections", type=int, default=100, help="per image (default 100)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--image_size", type=int, default=None, help="detector canvas size")
    p.add_argument("--no_fusion", action="store_true", help="detector scores only (no VLM)")
    return p


def _fail(message: str) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        images, folder = expand_images(args.image)
        many = folder or len(images) > 1
        outputs = _output_paths(images, args.out, many)
        if args.json and paths.isdir(args.json):
            raise ValueError(f"--json {args.json} is a folder; give a file name")
    except (OSError, ValueError) as e:
        return _fail(e)

    from tqdm import tqdm

    from rovit_jax.detection.render import draw_detections, save_png
    from rovit_jax.inference import Predictor
    from rovit_jax.inference.images import load_image

    try:
        predictor = Predictor.from_checkpoint(
            args.checkpoint,
            step=args.step,
            fusion=not args.no_fusion,
            image_size=args.image_size,
        )
        predictor.require_detector()
        predictor.query_classifier(args.query)  # checks the queries before any image work
    except (OSError, ValueError) as e:
        return _fail(e)

    if many:
        paths.makedirs(args.out)
    records = []
    with tqdm(total=len(images), unit="image", disable=not many, file=sys.stderr) as bar:
        for start in range(0, len(images), predictor.max_batch):
            chunk = images[start : start + predictor.max_batch]
            try:
                arrays = [load_image(p) for p in chunk]
                dets = predictor.predict(
                    arrays,
                    args.query,
                    score_threshold=args.threshold,
                    max_detections=args.max_detections,
                )
            except (OSError, ValueError) as e:
                return _fail(e)
            for path, array, det, out in zip(chunk, arrays, dets, outputs[start:]):
                drawing = draw_detections(
                    array, det.boxes, det.scores, det.labels, args.query, masks=det.masks
                )
                save_png(drawing, out)
                records.append(detections_to_json(det, path, out))
                if not many:
                    print(f"{path}: {len(det)} detections -> {out}")
            bar.update(len(chunk))
    if args.json:
        result = {
            "checkpoint": paths.absolute(args.checkpoint),
            "step": predictor.run.step,
            "queries": list(args.query),
            "score_threshold": args.threshold,
            "fusion": predictor.fusion,
            "box_format": "y0, x0, y1, x1 in original image pixels",
            "images": records,
        }
        paths.write_json(args.json, result)
        print(f"wrote {args.json}")
    if many:
        total = sum(len(r["scores"]) for r in records)
        print(f"{len(records)} images, {total} detections -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
