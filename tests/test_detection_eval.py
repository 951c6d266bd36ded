"""Detection evaluation against the official `lvis` package and pycocotools on generated data."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rovit_jax.evaluation import detection
from rovit_jax.evaluation.lvis_compat import import_lvis

# pycocotools and lvis 0.5.3 warn about numpy 2 / logging deprecations on every call.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]

LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# ---------------------------------------------------------------------------------------------
# Random LVIS-style ground truth and noisy detections.


def _ellipse_mask(h: int, w: int, box: np.ndarray) -> np.ndarray:
    """Bool [h, w] ellipse inscribed in box (x, y, bw, bh); at least one pixel."""
    x, y, bw, bh = box
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = x + bw / 2, y + bh / 2
    m = ((xx - cx) / max(bw / 2, 0.5)) ** 2 + ((yy - cy) / max(bh / 2, 0.5)) ** 2 <= 1.0
    if not m.any():
        m[min(int(cy), h - 1), min(int(cx), w - 1)] = True
    return m


def _polygon(rng: np.random.Generator, box: np.ndarray) -> list[float]:
    """A star-shaped polygon inside box (x, y, w, h), flattened [x0, y0, x1, y1, ...]."""
    x, y, w, h = box
    n = int(rng.integers(5, 11))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.55, 1.0, n)
    px = x + w / 2 + np.cos(angles) * radii * w / 2
    py = y + h / 2 + np.sin(angles) * radii * h / 2
    return np.stack([px, py], -1).ravel().tolist()


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = np.asfortranarray(m).ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    if len(change) == 0 or flat.size == 0:
        counts = [flat.size]
    return {"size": list(m.shape), "counts": counts}


def _compressed_rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _to_rle(seg, h: int, w: int) -> dict:
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, h, w)
    return {"size": seg["size"], "counts": seg["counts"].encode("ascii")}


def make_dataset(seed: int, num_images: int = 30, *, rare_annotated: bool = True, crowd=False):
    """Random ground truth (polygon, compressed and uncompressed RLE masks) and detections."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(rng.choice(np.arange(1, 200), 12, replace=False).tolist())
    freqs = ["r"] * 4 + ["c"] * 4 + ["f"] * 4
    rng.shuffle(freqs)
    categories = [{"id": c, "name": f"cat{c}", "frequency": f} for c, f in zip(cat_ids, freqs)]
    # One category never annotated (its AP is undefined and must be skipped, not counted as 0).
    unused = cat_ids[0]
    annotated = [c for c, f in zip(cat_ids, freqs) if c != unused and (rare_annotated or f != "r")]

    images, anns, dets = [], [], []
    for image_id in range(1, num_images + 1):
        h, w = int(rng.integers(120, 260)), int(rng.integers(120, 260))
        present: set[int] = set()
        for _ in range(int(rng.integers(1, 7))):
            bw = float(np.exp(rng.uniform(np.log(6), np.log(0.9 * w))))
            bh = float(np.clip(bw * np.exp(rng.normal(0, 0.4)), 4, 0.9 * h))
            box = np.array([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh])
            cat = int(rng.choice(annotated))
            kind = rng.integers(3)
            if kind == 0:
                seg = [_polygon(rng, box)]
            elif kind == 1:
                seg = _compressed_rle(_ellipse_mask(h, w, box))
            else:
                seg = _uncompressed_rle(_ellipse_mask(h, w, box))
            ann = {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": cat,
                "bbox": box.tolist(),
                "area": float(mask_utils.area(_to_rle(seg, h, w))),
                "segmentation": seg,
            }
            if crowd:
                ann["iscrowd"] = int(rng.random() < 0.1)
                if ann["iscrowd"]:
                    ann["segmentation"] = _uncompressed_rle(_ellipse_mask(h, w, box))
            anns.append(ann)
            present.add(cat)
        absent = [c for c in cat_ids if c not in present]
        images.append(
            {
                "id": image_id,
                "height": h,
                "width": w,
                "neg_category_ids": [c for c in absent if rng.random() < 0.5],
                "not_exhaustive_category_ids": [c for c in sorted(present) if rng.random() < 0.3],
            }
        )
    gt = {"images": images, "annotations": anns, "categories": categories}
    sizes = {img["id"]: (img["height"], img["width"]) for img in images}

    def add_det(image_id: int, cat: int, box: np.ndarray, mask: np.ndarray) -> None:
        dets.append(
            {
                "image_id": image_id,
                "category_id": cat,
                "bbox": [float(v) for v in box],
                "score": float(rng.uniform(0.01, 1.0)),
                "segmentation": _compressed_rle(mask),
            }
        )

    for ann in anns:
        h, w = sizes[ann["image_id"]]
        gt_mask = mask_utils.decode(_to_rle(ann["segmentation"], h, w)).astype(bool)
        for repeat in range(2):
            if rng.random() > (0.85 if repeat == 0 else 0.2):  # misses and duplicates
                continue
            x, y, bw, bh = ann["bbox"]
            noise = rng.normal(0, 0.08, 4)
            box = np.array([x + noise[0] * bw, y + noise[1] * bh, bw * np.exp(noise[2]), bh])
            box[3] *= np.exp(noise[3])
            dy, dx = int(round(noise[1] * bh)), int(round(noise[0] * bw))
            mask = np.roll(gt_mask, (dy, dx), axis=(0, 1))
            cat = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(cat_ids))
            add_det(ann["image_id"], cat, box, mask)
    for img in images:  # false positives of any category (kept, ignored or dropped by LVIS)
        h, w = img["height"], img["width"]
        for _ in range(int(rng.integers(0, 6))):
            bw, bh = rng.uniform(5, 0.6 * w), rng.uniform(5, 0.6 * h)
            box = np.array([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh])
            add_det(img["id"], int(rng.choice(cat_ids)), box, _ellipse_mask(h, w, box))
    rng.shuffle(dets)
    return gt, dets


def _for_iou_type(dets: list[dict], iou_type: str) -> list[dict]:
    if iou_type == "bbox":
        return [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    return copy.deepcopy(dets)


def official_lvis(gt: dict, dets: list[dict], iou_type: str, tmp_path, max_dets=300) -> dict:
    lvis = import_lvis()
    path = tmp_path / "lvis_gt.json"
    path.write_text(json.dumps(gt))
    lvis_gt = lvis.LVIS(str(path))
    results = lvis.LVISResults(lvis_gt, copy.deepcopy(dets), max_dets=max_dets)
    evaluator = lvis.LVISEval(lvis_gt, results, iou_type=iou_type)
    evaluator.run()
    return {k: float(evaluator.results[k]) for k in LVIS_KEYS}


def official_coco(gt: dict, dets: list[dict], iou_type: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(COCO_KEYS, map(float, evaluator.stats)))


def _assert_close(ours: dict, ref: dict, keys) -> None:
    assert set(ours) == set(keys)
    diffs = {k: (ours[k], ref[k]) for k in keys if abs(ours[k] - ref[k]) > 1e-6}
    assert not diffs, diffs


# ---------------------------------------------------------------------------------------------
# Agreement with the official implementations.


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(0)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_matches_official(dataset, iou_type, tmp_path):
    gt, dets = dataset
    dets = _for_iou_type(dets, iou_type)
    ours = detection.evaluate_lvis(gt, dets, iou_type=iou_type)
    ref = official_lvis(gt, dets, iou_type, tmp_path)
    # The data is not degenerate: every metric is defined and strictly between 0 and 1.
    assert all(0.05 < ref[k] < 0.99 for k in LVIS_KEYS), ref
    _assert_close(ours, ref, LVIS_KEYS)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_max_dets_per_image_matches_official(dataset, iou_type, tmp_path):
    gt, dets = dataset
    dets = _for_iou_type(dets, iou_type)
    counts = np.bincount([d["image_id"] for d in dets])
    assert (counts > 4).sum() >= 5  # the limit bites on several images
    ours = detection.evaluate_lvis(gt, dets, iou_type=iou_type, max_dets=4)
    _assert_close(ours, official_lvis(gt, dets, iou_type, tmp_path, max_dets=4), LVIS_KEYS)
    assert ours["AP"] < detection.evaluate_lvis(gt, dets, iou_type=iou_type)["AP"]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("max_dets", [300, 4])
def test_lvis_tied_scores_match_official(iou_type, max_dets, tmp_path):
    # Scores on a 0.25 grid: the order of tied detections (per-image limit, matching and
    # accumulation) must follow the official stable sorts.
    gt, dets = make_dataset(6, num_images=15)
    for det in dets:
        det["score"] = round(det["score"] * 4) / 4
    dets = _for_iou_type(dets, iou_type)
    ours = detection.evaluate_lvis(gt, dets, iou_type=iou_type, max_dets=max_dets)
    _assert_close(ours, official_lvis(gt, dets, iou_type, tmp_path, max_dets=max_dets), LVIS_KEYS)


def test_lvis_undefined_group_is_minus_one(tmp_path):
    gt, dets = make_dataset(1, num_images=12, rare_annotated=False)
    ours = detection.evaluate_lvis(gt, _for_iou_type(dets, "bbox"))
    ref = official_lvis(gt, _for_iou_type(dets, "bbox"), "bbox", tmp_path)
    assert ref["APr"] == -1.0
    _assert_close(ours, ref, LVIS_KEYS)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_matches_pycocotools(iou_type):
    gt, dets = make_dataset(2, crowd=True)
    assert any(a["iscrowd"] for a in gt["annotations"])
    dets = _for_iou_type(dets, iou_type)
    ours = detection.evaluate_coco(gt, dets, iou_type=iou_type)
    ref = official_coco(gt, dets, iou_type)
    assert all(0.05 < ref[k] < 0.99 for k in COCO_KEYS), ref
    _assert_close(ours, ref, COCO_KEYS)


def test_gt_path_and_inputs_untouched(dataset, tmp_path):
    gt, dets = dataset
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    from_dict = detection.evaluate_lvis(gt, dets, iou_type="segm")
    from_path = detection.evaluate_lvis(str(path), dets, iou_type="segm")
    detection.evaluate_coco(gt, dets, iou_type="segm")
    assert from_dict == from_path
    assert gt == gt_before and dets == dets_before


# ---------------------------------------------------------------------------------------------
# Perfect and empty detections.


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_detections_give_one(dataset, iou_type):
    gt, _ = dataset
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    rng = np.random.default_rng(3)
    dets = []
    for ann in gt["annotations"]:
        rle = _to_rle(ann["segmentation"], *sizes[ann["image_id"]])
        det = {k: ann[k] for k in ("image_id", "category_id", "bbox")}
        det["score"] = float(rng.uniform())
        if iou_type == "segm":
            det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        dets.append(det)
    lvis_metrics = detection.evaluate_lvis(gt, dets, iou_type=iou_type)
    assert lvis_metrics == {k: 1.0 for k in LVIS_KEYS}
    coco_gt = {**gt, "annotations": [{**a, "iscrowd": 0} for a in gt["annotations"]]}
    coco_metrics = detection.evaluate_coco(coco_gt, dets, iou_type=iou_type)
    # AR1/AR10 are below 1 only where an image has more than 1/10 objects of one category.
    assert all(coco_metrics[k] == 1.0 for k in COCO_KEYS if k not in ("AR1", "AR10"))


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_empty_detections_give_zero(dataset, iou_type):
    gt, _ = dataset
    lvis_metrics = detection.evaluate_lvis(gt, [], iou_type=iou_type)
    assert lvis_metrics == {k: 0.0 for k in LVIS_KEYS}  # every metric is defined for this gt
    coco_gt = {**gt, "annotations": [{**a, "iscrowd": 0} for a in gt["annotations"]]}
    assert detection.evaluate_coco(coco_gt, [], iou_type=iou_type) == {k: 0.0 for k in COCO_KEYS}


# ---------------------------------------------------------------------------------------------
# Conversions from arrays, gt assembly and the results writer.


def test_arrays_to_results_and_gt_round_trip():
    rng = np.random.default_rng(4)
    h, w, n = 48, 64, 5
    y0, x0 = rng.uniform(0, 20, n), rng.uniform(0, 30, n)
    boxes = np.stack([y0, x0, y0 + rng.uniform(2, 25, n), x0 + rng.uniform(2, 30, n)], -1)
    masks = rng.random((n, h, w)) < 0.3
    classes = np.array([0, 2, 1, 2, 0], np.int32)
    scores = rng.uniform(size=n).astype(np.float32)
    valid = np.array([True, True, False, True, True])
    category_ids = [10, 20, 30]

    results = detection.detections_to_results(
        7, boxes, scores, classes, masks, category_ids, valid=valid
    )
    kept = np.flatnonzero(valid)
    assert len(results) == len(kept)
    for r, i in zip(results, kept):
        assert r["image_id"] == 7 and r["category_id"] == category_ids[classes[i]]
        y_0, x_0, y_1, x_1 = boxes[i]
        np.testing.assert_allclose(r["bbox"], [x_0, y_0, x_1 - x_0, y_1 - y_0], rtol=1e-12)
        assert r["score"] == pytest.approx(float(scores[i]))
        rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), masks[i])
    json.dumps(results)  # JSON-ready

    anns = detection.annotations_from_arrays(7, boxes, classes, masks, category_ids, valid=valid)
    assert [a["area"] for a in anns] == [float(masks[i].sum()) for i in kept]
    gt = detection.make_lvis_gt(
        [{"id": 7, "height": h, "width": w}],
        [{"id": c, "frequency": f} for c, f in zip(category_ids, "rcf")],
        anns,
    )
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4]
    # The padding row held the only instance of class 1, so category 20 is verified absent.
    assert gt["images"][0]["neg_category_ids"] == [20]
    assert gt["images"][0]["not_exhaustive_category_ids"] == []
    for iou_type in ("bbox", "segm"):
        metrics = detection.evaluate_lvis(gt, results, iou_type=iou_type)
        assert metrics["AP"] == 1.0 and metrics["AP50"] == 1.0


def test_make_lvis_gt_defaults_and_area():
    poly = [[2.0, 2.0, 12.0, 2.0, 12.0, 8.0, 2.0, 8.0]]  # a 10 x 6 rectangle
    gt = detection.make_lvis_gt(
        [{"id": 1, "height": 20, "width": 20}, {"id": 2, "height": 20, "width": 20}],
        [{"id": 5, "frequency": "f"}, {"id": 6, "frequency": "r"}],
        [
            {"image_id": 1, "category_id": 5, "bbox": [2, 2, 10, 6], "segmentation": poly},
            {"image_id": 2, "category_id": 6, "bbox": [0, 0, 3, 4]},
        ],
    )
    assert [img["neg_category_ids"] for img in gt["images"]] == [[6], [5]]
    # pycocotools rasterises the polygon's pixel-edge rectangle to exactly 10 x 6 pixels.
    assert [a["area"] for a in gt["annotations"]] == [60.0, 12.0]


def test_write_results(tmp_path):
    path = tmp_path / "sub" / "results.json"
    metrics = {"AP": np.float64(0.25), "APr": -1.0}
    dets = [{"image_id": np.int64(3), "bbox": np.array([1.0, 2.0, 3.0, 4.0]), "score": 0.5}]
    detection.write_results(path, metrics, dets)
    data = json.loads(path.read_text())
    assert data == {
        "metrics": {"AP": 0.25, "APr": -1.0},
        "detections": [{"image_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}],
    }
    detection.write_results(path, {"AP": 0.5})
    assert json.loads(path.read_text()) == {"metrics": {"AP": 0.5}}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


# ---------------------------------------------------------------------------------------------
# Bad inputs.


def _small_gt():
    return make_dataset(5, num_images=3)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda gt: gt.pop("categories"), "'categories'"),
        (lambda gt: gt["images"][1].pop("neg_category_ids"), "'neg_category_ids'"),
        (lambda gt: gt["images"][0].pop("not_exhaustive_category_ids"), "not_exhaustive"),
        (lambda gt: gt["categories"][2].pop("frequency"), "'frequency'"),
        (lambda gt: gt["categories"][0].update(frequency="x"), "frequency 'x'"),
        (lambda gt: gt["annotations"][0].pop("area"), "'area'"),
        (lambda gt: gt["annotations"][0].update(id=0), "positive"),
        (lambda gt: gt["annotations"][1].update(iscrowd=1), "crowd"),
    ],
)
def test_bad_ground_truth(corrupt, message):
    gt, dets = _small_gt()
    corrupt(gt)
    with pytest.raises(ValueError, match=message):
        detection.evaluate_lvis(gt, _for_iou_type(dets, "bbox"))


def test_bad_detections_and_arguments():
    gt, dets = _small_gt()
    bbox_dets = _for_iou_type(dets, "bbox")
    bad = copy.deepcopy(bbox_dets)
    bad[1]["category_id"] = 9999
    with pytest.raises(ValueError, match="category_id 9999"):
        detection.evaluate_lvis(gt, bad)
    with pytest.raises(ValueError, match="category_id 9999"):
        detection.evaluate_coco(gt, bad)
    bad = copy.deepcopy(bbox_dets)
    bad[0]["image_id"] = 777
    with pytest.raises(ValueError, match="image_id 777"):
        detection.evaluate_lvis(gt, bad)
    with pytest.raises(ValueError, match="'segmentation'"):
        detection.evaluate_lvis(gt, bbox_dets, iou_type="segm")
    wrong_size = copy.deepcopy(dets)
    wrong_size[0]["segmentation"]["size"] = [1, 1]
    with pytest.raises(ValueError, match="size"):
        detection.evaluate_lvis(gt, wrong_size, iou_type="segm")
    with pytest.raises(ValueError, match="iou_type"):
        detection.evaluate_lvis(gt, bbox_dets, iou_type="keypoints")
    with pytest.raises(ValueError, match="max_dets"):
        detection.evaluate_lvis(gt, bbox_dets, max_dets=0)
    with pytest.raises(ValueError, match="boxes_yxyx"):
        detection.detections_to_results(1, np.zeros((3, 5)), np.zeros(3), np.zeros(3, int))
    with pytest.raises(ValueError, match="class index 3"):
        detection.detections_to_results(1, np.zeros((1, 4)), [0.5], [3], category_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="y1 < y0"):
        detection.detections_to_results(1, [[5.0, 0.0, 4.0, 1.0]], [0.5], [0])
