"""Detection evaluation: LVIS-style (federated, AP_r / AP_c / AP_f) and COCO-style AP.

Both evaluators run faster-coco-eval (C++ matching and accumulation); `evaluate_lvis` reproduces
the official `lvis` package (LVISEval) and `evaluate_coco` reproduces pycocotools' COCOeval.

Formats (the public LVIS v1 / COCO JSON formats):
  ground truth: {"images": [{"id", "height", "width", "neg_category_ids",
                             "not_exhaustive_category_ids"}],
                 "categories": [{"id", "name", "frequency": "r" | "c" | "f"}],
                 "annotations": [{"id" (> 0), "image_id", "category_id", "bbox": [x, y, w, h],
                                  "area", "segmentation": polygons | RLE}]}
  (the two per-image lists and "frequency" are needed for LVIS only);
  detections: [{"image_id", "category_id", "bbox": [x, y, w, h], "score",
                "segmentation": compressed RLE (for iou_type="segm")}].
Boxes in these files are (x, y, w, h) in pixels; the detector's (y0, x0, y1, x1) pixel boxes are
converted by `detections_to_results` / `annotations_from_arrays`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from pycocotools import mask as mask_utils

from rovit_jax import paths

IOU_TYPES = ("bbox", "segm")
FREQUENCIES = ("r", "c", "f")
LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
COCO_METRICS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
# faster-coco-eval's names (COCOeval_faster.stats_as_dict in LVIS mode) for LVIS_METRICS.
_FASTER_LVIS_NAMES = {
    "AP": "AP_all",
    "AP50": "AP_50",
    "AP75": "AP_75",
    "APs": "AP_small",
    "APm": "AP_medium",
    "APl": "AP_large",
    "APr": "APr",
    "APc": "APc",
    "APf": "APf",
}

GroundTruth = str | os.PathLike | Mapping[str, Any]


def _quiet(*args: Any, **kwargs: Any) -> None:
    """Print function that swallows faster-coco-eval's progress messages."""


# ---------------------------------------------------------------------------------------------
# Input loading and validation.


def load_ground_truth(gt: GroundTruth) -> Mapping[str, Any]:
    """Returns the ground-truth dict from a JSON path, or `gt` itself if it is already a dict."""
    if isinstance(gt, (str, os.PathLike)):
        data = paths.read_json(gt)
    elif isinstance(gt, Mapping):
        data = gt
    else:
        raise TypeError(f"gt must be a JSON path or a dict, got {type(gt).__name__}")
    if not isinstance(data, Mapping):
        raise ValueError(f"gt must hold a JSON object, got {type(data).__name__}")
    return data


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")


def _require_keys(items: Sequence[Mapping[str, Any]], keys: tuple[str, ...], what: str) -> None:
    required = frozenset(keys)
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"ground truth {what}[{i}] must be a dict, got {type(item).__name__}")
        missing = required - item.keys()
        if missing:
            key = next(k for k in keys if k in missing)  # report in a stable order
            raise ValueError(
                f"ground truth {what}[{i}] (id={item.get('id')!r}) is missing the required key "
                f"{key!r}"
            )


def validate_ground_truth(gt: Mapping[str, Any], *, iou_type: str = "bbox", lvis: bool) -> None:
    """Raises ValueError naming the first missing key or inconsistent entry of a ground truth.

    Args:
      gt: the ground-truth dict (format in the module docstring).
      iou_type: "bbox" or "segm"; "segm" also needs image sizes and annotation segmentations.
      lvis: also require the federated fields (`neg_category_ids`,
        `not_exhaustive_category_ids` per image, `frequency` in r/c/f per category).
    """
    _check_iou_type(iou_type)
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"ground truth is missing the required key {key!r}")
    image_keys = ("id", "height", "width") if iou_type == "segm" else ("id",)
    if lvis:
        image_keys += ("neg_category_ids", "not_exhaustive_category_ids")
    ann_keys = ("id", "image_id", "category_id", "bbox", "area")
    if iou_type == "segm":
        ann_keys += ("segmentation",)
    _require_keys(gt["images"], image_keys, "images")
    _require_keys(gt["categories"], ("id", "frequency") if lvis else ("id",), "categories")
    _require_keys(gt["annotations"], ann_keys, "annotations")

    if lvis:
        for cat in gt["categories"]:
            if cat["frequency"] not in FREQUENCIES:
                raise ValueError(
                    f"category {cat['id']!r} has frequency {cat['frequency']!r}; expected one of "
                    f"{FREQUENCIES}"
                )
    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    seen: set[Any] = set()
    for ann in gt["annotations"]:
        ann_id = ann["id"]
        # Both evaluators mark "unmatched" with annotation id 0, so id 0 would silently count as
        # a miss.
        if not isinstance(ann_id, (int, np.integer)) or isinstance(ann_id, bool) or ann_id <= 0:
            raise ValueError(f"annotation ids must be positive integers, got id {ann_id!r}")
        if ann_id in seen:
            raise ValueError(f"annotation id {ann_id!r} appears more than once")
        seen.add(ann_id)
        if ann["image_id"] not in image_ids:
            raise ValueError(f"annotation {ann_id} has image_id {ann['image_id']!r}, not an image")
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"annotation {ann_id} has category_id {ann['category_id']!r}, not a category"
            )
        if lvis and (ann.get("iscrowd") or ann.get("ignore")):
            # The official LVIS API ignores `iscrowd` but honours `ignore`, while faster-coco-eval
            # does the opposite; LVIS has neither, so refuse rather than diverge silently.
            raise ValueError(
                f"annotation {ann_id} is marked iscrowd/ignore; LVIS ground truth has no crowd or "
                "ignored regions"
            )


def _rle_size_error(seg: Any, size: tuple[int, int]) -> str | None:
    if not isinstance(seg, Mapping) or "size" not in seg or "counts" not in seg:
        return "must be an RLE dict with 'size' and 'counts'"
    if tuple(int(s) for s in seg["size"]) != size:
        return f"has size {list(seg['size'])}, but the image is {list(size)} (height, width)"
    return None


def _prepare_detections(
    detections: Sequence[Mapping[str, Any]], gt: Mapping[str, Any], iou_type: str
) -> list[dict[str, Any]]:
    """Validates detections and returns fresh dicts holding only what the evaluator reads.

    The evaluators add keys to the result dicts they are given; building new ones leaves the
    caller's detections untouched.
    """
    if isinstance(detections, (str, bytes, Mapping)) or not isinstance(detections, Sequence):
        raise TypeError(f"detections must be a list of dicts, got {type(detections).__name__}")
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    required = ("image_id", "category_id", "score") + (
        ("bbox",) if iou_type == "bbox" else ("segmentation",)
    )
    out = []
    for i, det in enumerate(detections):
        if not isinstance(det, Mapping):
            raise ValueError(f"detections[{i}] must be a dict, got {type(det).__name__}")
        for key in required:
            if key not in det:
                raise ValueError(f"detections[{i}] is missing the required key {key!r}")
        image_id, category_id, score = det["image_id"], det["category_id"], det["score"]
        if image_id not in sizes:
            raise ValueError(
                f"detections[{i}] has image_id {image_id!r}, which is not an image of the ground "
                "truth"
            )
        if category_id not in category_ids:
            raise ValueError(
                f"detections[{i}] has category_id {category_id!r}, which is not a category of the "
                "ground truth"
            )
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"detections[{i}] has a non-finite score {det['score']!r}")
        entry: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(category_id),
            "score": score,
        }
        if "bbox" in det:
            bbox = [float(v) for v in det["bbox"]]
            if len(bbox) != 4:
                raise ValueError(f"detections[{i}] bbox must be [x, y, w, h], got {det['bbox']!r}")
            entry["bbox"] = bbox
        if iou_type == "segm":
            seg = det["segmentation"]
            error = _rle_size_error(seg, sizes[image_id])
            if error:
                raise ValueError(f"detections[{i}] segmentation {error}")
            counts = seg["counts"]
            entry["segmentation"] = {
                "size": [int(s) for s in seg["size"]],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
            }
        out.append(entry)
    if iou_type == "segm" and len({"bbox" in d for d in out}) > 1:
        # Both official APIs decide from the FIRST result whether results carry boxes (which then
        # set each detection's area); a mixture is ambiguous.
        raise ValueError("detections must either all have a 'bbox' or none of them")
    return out


def limit_detections_per_image(
    detections: Sequence[Mapping[str, Any]], max_dets: int
) -> list[Mapping[str, Any]]:
    """Keeps each image's `max_dets` highest-scoring detections, as LVIS's results loader does.

    Images are grouped in order of first appearance; an image over the limit has its detections
    stably sorted by decreasing score (ties keep input order), so the output order, which the
    evaluators use to break score ties, is the official one.
    """
    by_image: dict[Any, list[Mapping[str, Any]]] = {}
    for det in detections:
        by_image.setdefault(det["image_id"], []).append(det)
    out: list[Mapping[str, Any]] = []
    for dets in by_image.values():
        if len(dets) > max_dets:
            dets = sorted(dets, key=lambda d: d["score"], reverse=True)[:max_dets]
        out.extend(dets)
    return out


def _gt_for_evaluator(gt: Mapping[str, Any]) -> dict[str, Any]:
    """A copy the evaluator may annotate (it adds keys to every annotation) without touching `gt`.

    Copying the per-item dicts is enough: the evaluator adds keys but never edits nested values.
    """
    out = {key: value for key, value in gt.items() if key not in ("images", "annotations")}
    out["images"] = [dict(img) for img in gt["images"]]
    out["annotations"] = [dict(ann) for ann in gt["annotations"]]
    out["categories"] = [dict(cat) for cat in gt["categories"]]
    return out


def _run_faster_eval(
    gt: Mapping[str, Any],
    detections: list[dict[str, Any]],
    iou_type: str,
    *,
    lvis_style: bool,
    max_dets: int | None = None,
) -> COCOeval_faster:
    coco_gt = COCO(_gt_for_evaluator(gt), print_function=_quiet)
    coco_dt = coco_gt.loadRes(detections)
    evaluator = COCOeval_faster(
        coco_gt, coco_dt, iouType=iou_type, print_function=_quiet, lvis_style=lvis_style
    )
    if max_dets is not None:
        evaluator.params.maxDets = [max_dets]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


# ---------------------------------------------------------------------------------------------
# Evaluators.


def evaluate_lvis(
    gt: GroundTruth,
    detections: Sequence[Mapping[str, Any]],
    *,
    iou_type: str = "bbox",
    max_dets: int = 300,
) -> dict[str, float]:
    """LVIS AP (federated evaluation with rare / common / frequent breakdown).

    Same semantics as the official `lvis` package: at most `max_dets` detections per image (top
    scores over all categories); a detection counts only on images where its category is
    annotated or listed in `neg_category_ids`; unmatched detections of a category in the image's
    `not_exhaustive_category_ids` are ignored; IoU thresholds 0.50:0.05:0.95, 101 recall points,
    area ranges small < 32^2 <= medium < 96^2 <= large. LVIS has no crowd or ignored regions
    (annotations flagged `iscrowd` or `ignore` are refused).

    Args:
      gt: LVIS v1 ground truth: a JSON path or an already-loaded dict.
      detections: LVIS result dicts (`image_id`, `category_id`, `bbox` [x, y, w, h], `score`;
        a compressed-RLE `segmentation` for iou_type="segm", where a `bbox`, if given, sets the
        detection's area for the area ranges, as in the official API). Not modified.
      iou_type: "bbox" or "segm".
      max_dets: detections kept per image (LVIS uses 300).

    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}: floats in [0, 1], or -1
      where undefined (no ground truth in that area range / frequency group).
    """
    _check_iou_type(iou_type)
    if isinstance(max_dets, bool) or not isinstance(max_dets, (int, np.integer)) or max_dets < 1:
        raise ValueError(f"max_dets must be a positive integer, got {max_dets!r}")
    gt = load_ground_truth(gt)
    validate_ground_truth(gt, iou_type=iou_type, lvis=True)
    dets = limit_detections_per_image(_prepare_detections(detections, gt, iou_type), max_dets)
    evaluator = _run_faster_eval(gt, dets, iou_type, lvis_style=True, max_dets=int(max_dets))
    stats = evaluator.stats_as_dict
    return {name: float(stats[_FASTER_LVIS_NAMES[name]]) for name in LVIS_METRICS}


def evaluate_coco(
    gt: GroundTruth, detections: Sequence[Mapping[str, Any]], *, iou_type: str = "bbox"
) -> dict[str, float]:
    """COCO AP/AR: pycocotools' 12 summary statistics, computed with faster-coco-eval.

    Args:
      gt: COCO ground truth (JSON path or dict); `iscrowd` annotations are crowd regions.
      detections: COCO result dicts (same format as for `evaluate_lvis`). Not modified.
      iou_type: "bbox" or "segm".

    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
      in pycocotools' `COCOeval.stats` order; -1 where undefined.
    """
    _check_iou_type(iou_type)
    gt = load_ground_truth(gt)
    validate_ground_truth(gt, iou_type=iou_type, lvis=False)
    dets = _prepare_detections(detections, gt, iou_type)
    evaluator = _run_faster_eval(gt, dets, iou_type, lvis_style=False)
    return {name: float(v) for name, v in zip(COCO_METRICS, evaluator.stats[: len(COCO_METRICS)])}


# ---------------------------------------------------------------------------------------------
# Conversions from the detector's arrays and writing results.


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Compressed RLEs (`counts` as str, JSON-ready) of `[N, H, W]` binary masks."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(np.moveaxis(masks != 0, 0, -1).astype(np.uint8))
    rles = mask_utils.encode(fortran)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _instances_from_arrays(
    boxes_yxyx: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray | None,
    category_ids: Sequence[int] | np.ndarray | None,
    valid: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]] | None, np.ndarray | None]:
    """Checks the shared arrays; returns (kept indices, xywh boxes, category ids, RLEs, areas)."""
    boxes = np.asarray(boxes_yxyx, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes_yxyx must be [N, 4], got shape {boxes.shape}")
    n = boxes.shape[0]
    classes = np.asarray(classes)
    if classes.shape != (n,) or (n and not np.issubdtype(classes.dtype, np.integer)):
        raise ValueError(
            f"classes must be an integer array of shape ({n},), got {classes.dtype} {classes.shape}"
        )
    keep = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    if keep.shape != (n,):
        raise ValueError(f"valid must have shape ({n},), got {keep.shape}")
    kept = np.flatnonzero(keep)
    boxes, classes = boxes[kept], classes[kept].astype(np.int64)

    if category_ids is not None:
        table = np.asarray(category_ids)
        if table.ndim != 1 or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(f"category_ids must be a 1-D integer sequence, got {table.dtype}")
        bad = (classes < 0) | (classes >= table.shape[0])
        if bad.any():
            raise ValueError(
                f"class index {int(classes[bad][0])} is outside category_ids (length "
                f"{table.shape[0]})"
            )
        classes = table[classes].astype(np.int64)

    xywh = np.stack(
        [boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], axis=-1
    )
    if (xywh[:, 2:] < 0).any():
        row = int(kept[np.flatnonzero((xywh[:, 2:] < 0).any(axis=1))[0]])
        raise ValueError(f"box {row} has y1 < y0 or x1 < x0: {np.asarray(boxes_yxyx)[row]}")

    rles = areas = None
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim != 3 or masks.shape[0] != n:
            raise ValueError(f"masks must be [{n}, H, W], got shape {masks.shape}")
        masks = masks[kept]
        rles = encode_masks(masks)
        areas = (masks != 0).sum(axis=(1, 2))
    return kept, xywh, classes, rles, areas


def detections_to_results(
    image_id: int,
    boxes_yxyx: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray | None = None,
    category_ids: Sequence[int] | np.ndarray | None = None,
    *,
    valid: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One image's detector output as LVIS/COCO result dicts.

    Args:
      image_id: the ground-truth image id.
      boxes_yxyx: `[N, 4]` boxes (y0, x0, y1, x1) in pixels.
      scores: `[N]` scores.
      classes: `[N]` integer class indices.
      masks: optional `[N, H, W]` binary masks at image resolution (H, W = the gt image size).
      category_ids: `[num_classes]` category id of each class index; None if `classes` already
        holds category ids.
      valid: optional `[N]` bool; False rows (padding of fixed-size outputs) are dropped.

    Returns:
      `[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]` (+ compressed-RLE
      "segmentation" when masks are given), in input order; JSON-serialisable.
    """
    kept, xywh, cats, rles, _ = _instances_from_arrays(
        boxes_yxyx, classes, masks, category_ids, valid
    )
    scores = np.asarray(scores, np.float64)
    if scores.shape != (np.asarray(boxes_yxyx).shape[0],):
        raise ValueError(
            f"scores must have shape ({np.asarray(boxes_yxyx).shape[0]},), got {scores.shape}"
        )
    scores = scores[kept]
    results = []
    for i in range(len(kept)):
        result = {
            "image_id": int(image_id),
            "category_id": int(cats[i]),
            "bbox": xywh[i].tolist(),
            "score": float(scores[i]),
        }
        if rles is not None:
            result["segmentation"] = rles[i]
        results.append(result)
    return results


def annotations_from_arrays(
    image_id: int,
    boxes_yxyx: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray | None = None,
    category_ids: Sequence[int] | np.ndarray | None = None,
    *,
    valid: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One image's ground-truth instances as annotation dicts (without ids; see `make_lvis_gt`).

    Args are as for `detections_to_results` (no scores). `area` is the mask's pixel count when
    masks are given (as in COCO/LVIS), else the box area.

    Returns:
      `[{"image_id", "category_id", "bbox": [x, y, w, h], "area"}]` (+ RLE "segmentation").
    """
    _, xywh, cats, rles, areas = _instances_from_arrays(
        boxes_yxyx, classes, masks, category_ids, valid
    )
    anns = []
    for i in range(xywh.shape[0]):
        ann = {
            "image_id": int(image_id),
            "category_id": int(cats[i]),
            "bbox": xywh[i].tolist(),
            "area": float(areas[i]) if areas is not None else float(xywh[i, 2] * xywh[i, 3]),
        }
        if rles is not None:
            ann["segmentation"] = rles[i]
        anns.append(ann)
    return anns


def _segmentation_area(seg: Any, height: int, width: int) -> float:
    if isinstance(seg, list):  # polygons: one object may have several parts
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return float(mask_utils.area(rle))


def make_lvis_gt(
    images: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Assembles (and validates) an LVIS v1 ground-truth dict.

    Args:
      images: dicts with "id", "height", "width"; "neg_category_ids" defaults to every category
        with no annotation in the image (right for exhaustively labelled data such as the shapes
        world, where an absent category is verified absent) and "not_exhaustive_category_ids" to
        [].
      categories: dicts with "id" and "frequency" ("r", "c" or "f"); "name" defaults to the id.
      annotations: dicts with "image_id", "category_id", "bbox" [x, y, w, h] and optionally
        "segmentation" (polygons or RLE); "id" defaults to 1, 2, ... in order (all or none must
        have one) and "area" to the segmentation's pixel area, else the box area.

    Returns:
      {"images", "categories", "annotations"} ready for `evaluate_lvis` / `evaluate_coco`.
    """
    _require_keys(images, ("id", "height", "width"), "images")
    _require_keys(categories, ("id", "frequency"), "categories")
    _require_keys(annotations, ("image_id", "category_id", "bbox"), "annotations")
    with_id = sum("id" in ann for ann in annotations)
    if with_id not in (0, len(annotations)):
        raise ValueError("annotations must either all have an 'id' or none of them")
    sizes = {img["id"]: (img["height"], img["width"]) for img in images}

    anns = []
    for i, ann in enumerate(annotations):
        ann = dict(ann)
        if not with_id:
            ann["id"] = i + 1
        if "area" not in ann:
            if ann["image_id"] not in sizes:
                raise ValueError(
                    f"annotation {ann['id']} has image_id {ann['image_id']!r}, not an image"
                )
            if "segmentation" in ann:
                ann["area"] = _segmentation_area(ann["segmentation"], *sizes[ann["image_id"]])
            else:
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        anns.append(ann)

    present: dict[Any, set[Any]] = {img["id"]: set() for img in images}
    for ann in anns:
        present.setdefault(ann["image_id"], set()).add(ann["category_id"])
    all_ids = [cat["id"] for cat in categories]
    imgs = []
    for img in images:
        img = dict(img)
        if "neg_category_ids" not in img:
            img["neg_category_ids"] = [c for c in all_ids if c not in present[img["id"]]]
        img.setdefault("not_exhaustive_category_ids", [])
        imgs.append(img)
    cats = [{"name": str(cat["id"]), **cat} for cat in categories]

    gt = {"images": imgs, "categories": cats, "annotations": anns}
    validate_ground_truth(gt, iou_type="bbox", lvis=True)
    return gt


def _to_json(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("ascii")
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_results(
    path: str | os.PathLike,
    metrics: Mapping[str, float],
    detections: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Writes `{"metrics": {...}, "detections": [...]}` (detections only if given) as JSON.

    numpy scalars/arrays and bytes RLE counts are converted. `path` may be local or a bucket
    URL; the write is all-or-nothing (a reader never sees a partial file) and parent
    directories are created.
    """
    payload: dict[str, Any] = {"metrics": dict(metrics)}
    if detections is not None:
        payload["detections"] = list(detections)
    paths.write_json(path, payload, default=_to_json)
