r"""LVIS evaluation timing: faster-coco-eval (`evaluate_lvis`) against the official `lvis` package.

  python benchmarks/detection_eval.py                       # 2,000 images, bbox and segm
  python benchmarks/detection_eval.py --images=500 --iou_types=bbox

Needs the test extra (`pip install -e .[test]`), which installs the official `lvis` package.

Generates LVIS-style ground truth from a fixed seed (categories split into rare / common /
frequent groups, a few polygon-masked objects per image, federated negative and
not-exhaustive lists) and noisy detections (jittered copies of the objects, some with a wrong
category, plus false positives up to --dets_per_image per image), writes both as JSON, then
times each evaluator from the same files (loading included) and checks that the nine AP
metrics agree.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings

import numpy as np
from pycocotools import mask as mask_utils

from rovit_jax.evaluation.detection import LVIS_METRICS, evaluate_lvis
from rovit_jax.evaluation.lvis_compat import import_lvis

# LVIS v1 has 405 frequent, 461 common and 337 rare categories.
GROUP_SHARE = {"f": 405 / 1203, "c": 461 / 1203, "r": 337 / 1203}


def _polygon(rng: np.random.Generator, x: float, y: float, w: float, h: float) -> list[float]:
    """A star-shaped 12-gon inside the box (x, y, w, h), flattened [x0, y0, x1, y1, ...]."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
    radii = rng.uniform(0.6, 1.0, 12)
    px = x + w / 2 + np.cos(angles) * radii * w / 2
    py = y + h / 2 + np.sin(angles) * radii * h / 2
    return np.round(np.stack([px, py], -1).ravel(), 2).tolist()


def _random_box(rng: np.random.Generator, h: int, w: int) -> tuple[float, float, float, float]:
    bw = float(np.exp(rng.uniform(np.log(8), np.log(0.8 * w))))
    bh = float(np.clip(bw * np.exp(rng.normal(0, 0.4)), 6, 0.8 * h))
    return float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh


def _rle(polygon: list[float], h: int, w: int) -> dict:
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def make_data(
    seed: int, num_images: int, num_categories: int, dets_per_image: int, with_masks: bool
) -> tuple[dict, list[dict]]:
    """Ground truth and detections (with compressed-RLE masks if `with_masks`)."""
    rng = np.random.default_rng(seed)
    freqs = rng.choice(list(GROUP_SHARE), num_categories, p=list(GROUP_SHARE.values()))
    categories = [
        {"id": i + 1, "name": f"category {i + 1}", "frequency": str(f)} for i, f in enumerate(freqs)
    ]
    # Instance frequency follows the group, as in LVIS: frequent categories dominate.
    weights = np.array([{"f": 20.0, "c": 4.0, "r": 1.0}[f] for f in freqs])
    weights /= weights.sum()
    cat_ids = np.arange(1, num_categories + 1)

    images, anns, dets = [], [], []

    def add_det(image_id, cat, box, polygon, h, w):
        det = {
            "image_id": image_id,
            "category_id": int(cat),
            "bbox": [round(v, 2) for v in box],
            "score": round(float(rng.uniform(0.001, 1.0)), 6),
        }
        if with_masks:
            det["segmentation"] = _rle(polygon, h, w)
        dets.append(det)

    for image_id in range(1, num_images + 1):
        h, w = int(rng.integers(240, 480)), int(rng.integers(240, 480))
        objects = []
        for _ in range(int(rng.integers(1, 9))):
            box = _random_box(rng, h, w)
            cat = int(rng.choice(cat_ids, p=weights))
            polygon = _polygon(rng, *box)
            area = float(mask_utils.area(mask_utils.frPyObjects([polygon], h, w))[0])
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [round(v, 2) for v in box],
                    "area": area,
                    "segmentation": [polygon],
                }
            )
            objects.append((cat, box))
        present = sorted({cat for cat, _ in objects})
        absent = np.setdiff1d(cat_ids, present)
        images.append(
            {
                "id": image_id,
                "height": h,
                "width": w,
                "neg_category_ids": rng.choice(absent, min(len(absent), 25), replace=False)
                .astype(int)
                .tolist(),
                "not_exhaustive_category_ids": [c for c in present if rng.random() < 0.2],
            }
        )
        start = len(dets)
        for cat, (x, y, bw, bh) in objects:  # up to three jittered detections per object
            for _ in range(int(rng.integers(0, 4))):
                n = rng.normal(0, 0.1, 4)
                box = (x + n[0] * bw, y + n[1] * bh, bw * np.exp(n[2]), bh * np.exp(n[3]))
                det_cat = cat if rng.random() > 0.15 else rng.choice(cat_ids, p=weights)
                add_det(image_id, det_cat, box, _polygon(rng, *box), h, w)
        # False positives up to dets_per_image; half on a category LVIS will score here.
        scored = list(present) + images[-1]["neg_category_ids"]
        for _ in range(max(0, dets_per_image - (len(dets) - start))):
            box = _random_box(rng, h, w)
            cat = rng.choice(scored) if rng.random() < 0.5 else rng.choice(cat_ids, p=weights)
            add_det(image_id, cat, box, _polygon(rng, *box), h, w)
    return {"images": images, "annotations": anns, "categories": categories}, dets


def official_lvis(gt_path: str, dets_path: str, iou_type: str) -> dict[str, float]:
    lvis = import_lvis()
    logging.getLogger("lvis").setLevel(logging.ERROR)  # one warning per results load
    lvis_gt = lvis.LVIS(gt_path)
    evaluator = lvis.LVISEval(lvis_gt, lvis.LVISResults(lvis_gt, dets_path), iou_type=iou_type)
    evaluator.run()
    return {k: float(evaluator.results[k]) for k in LVIS_METRICS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--categories", type=int, default=300)
    parser.add_argument("--dets_per_image", type=int, default=50)
    parser.add_argument("--iou_types", default="bbox,segm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    iou_types = args.iou_types.split(",")
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    t = time.perf_counter()
    gt, dets = make_data(
        args.seed, args.images, args.categories, args.dets_per_image, "segm" in iou_types
    )
    groups = {f: sum(c["frequency"] == f for c in gt["categories"]) for f in "rcf"}
    print(
        f"data: {len(gt['images'])} images, {len(gt['categories'])} categories "
        f"(r/c/f = {groups['r']}/{groups['c']}/{groups['f']}), {len(gt['annotations'])} objects, "
        f"{len(dets)} detections ({len(dets) / len(gt['images']):.1f} per image); generated in "
        f"{time.perf_counter() - t:.1f} s"
    )

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, dets_path = os.path.join(tmp, "gt.json"), os.path.join(tmp, "dets.json")
        with open(gt_path, "w") as f:
            json.dump(gt, f)
        for iou_type in iou_types:
            with open(dets_path, "w") as f:
                keep = ("image_id", "category_id", "bbox", "score")
                if iou_type == "segm":
                    keep += ("segmentation",)
                json.dump([{k: d[k] for k in keep} for d in dets], f)

            t = time.perf_counter()
            with open(dets_path) as f:
                ours = evaluate_lvis(gt_path, json.load(f), iou_type=iou_type)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            ref = official_lvis(gt_path, dets_path, iou_type)
            t_ref = time.perf_counter() - t

            diff = max(abs(ours[k] - ref[k]) for k in LVIS_METRICS)
            ok &= diff <= 1e-6
            print(
                f"{iou_type}: evaluate_lvis (faster-coco-eval) {t_ours:.2f} s | official lvis "
                f"{t_ref:.2f} s | speed-up {t_ref / t_ours:.1f}x | max |diff| over the 9 APs "
                f"{diff:.1e} ({'agree' if diff <= 1e-6 else 'DISAGREE'})"
            )
            print("  " + "  ".join(f"{k}={ours[k]:.4f}" for k in LVIS_METRICS))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
