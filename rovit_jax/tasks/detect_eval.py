"""Open-vocabulary detection evaluation: base + novel vocabulary, with and without VLM fusion."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from rovit_jax.data import detection_input
from rovit_jax.detection.postprocess import paste_masks, to_original_coordinates
from rovit_jax.evaluation import detection as det_eval

VARIANTS = ("fused", "detector_only")


def _ground_truth(source, indices, table) -> dict[str, Any]:
    """LVIS-style ground truth of the evaluation images (exhaustive: absent = negative)."""
    images, annotations = [], []
    for i in indices:
        ex = source[int(i)]
        h, w = ex["image"].shape[:2]
        images.append({"id": int(ex["image_id"]), "height": h, "width": w})
        boxes = np.asarray(ex["boxes"], np.float32) * np.array([h, w, h, w], np.float32)
        annotations += det_eval.annotations_from_arrays(
            int(ex["image_id"]),
            boxes,
            np.asarray(ex["labels"]) + 1,
            masks=np.asarray(ex["masks"]) > 0 if ex.get("masks") is not None else None,
        )
    categories = [{"id": cid + 1, "name": name, "frequency": f} for cid, name, f in table]
    return det_eval.make_lvis_gt(images, categories, annotations)


def _restrict(gt: dict[str, Any], dets: list[dict], keep_ids: set[int]):
    """Ground truth and detections limited to categories `keep_ids` (for AP on base classes)."""
    sub = {
        "images": [
            dict(
                im,
                neg_category_ids=[c for c in im["neg_category_ids"] if c in keep_ids],
                not_exhaustive_category_ids=[],
            )
            for im in gt["images"]
        ],
        "categories": [c for c in gt["categories"] if c["id"] in keep_ids],
        "annotations": [a for a in gt["annotations"] if a["category_id"] in keep_ids],
    }
    return sub, [d for d in dets if d["category_id"] in keep_ids]


def evaluate(task, trainer, params) -> dict[str, float]:
    """Runs the detector on the evaluation split and returns LVIS-style metrics.

    Keys: `{variant}/{bbox|segm}/{AP, AP50, APr, APc, APf, AP_base, ...}` for variant in
    ("fused", "detector_only"). Writes `detections_<variant>.json` and a rendered PNG.
    """
    config = task.config
    builder, table, _ = task._data
    source = detection_input.ShapesDetectionSource(builder, config.data.eval_split)
    vocab = task.full_vocabulary
    num = len(source) if not config.eval.num_images else min(len(source), config.eval.num_images)
    subset = _Subset(source, num)
    gt = _ground_truth(source, range(num), table)
    category_ids = [cid + 1 for cid, _, _ in table]
    base_ids = {cid + 1 for cid, _, f in table if f not in set(config.data.novel_frequencies)}
    vlm_params = {k: v for k, v in task.pretrained[1].items() if k != "txt"}
    text = [jax.numpy.asarray(vocab[k]) for k in ("embeddings", "valid", "is_novel")]
    metrics: dict[str, float] = {}
    rendered = None
    for variant in VARIANTS:
        predict = task._predict_cache.setdefault(
            variant, task.predict_fn(trainer, fusion=variant == "fused")
        )
        dets: list[dict] = []
        for batch in detection_input.eval_detection_batches(
            subset,
            batch_size=int(config.eval.batch_size),
            image_size=int(config.det.image_size),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            images = trainer.global_batch({"image": batch["image"]})["image"]
            out = jax.device_get(predict(params, vlm_params, images, *text))
            # Every host holds the whole (replicated) output; keep this host's rows.
            start = jax.process_index() * len(batch["image"])
            for j in range(len(batch["image"])):
                if not batch["mask"][j]:
                    continue
                h, w, scale = batch["image_info"][j][:3]
                h, w = int(h), int(w)
                row = start + j
                keep = out["valid"][row]
                boxes = to_original_coordinates(out["boxes"][row], scale, h, w)
                masks = paste_masks(out["masks"][row][keep], boxes[keep], h, w)
                dets += det_eval.detections_to_results(
                    int(batch["image_id"][j]),
                    boxes[keep],
                    out["scores"][row][keep],
                    out["classes"][row][keep],
                    masks=masks,
                    category_ids=category_ids,
                )
                if rendered is None and variant == "fused":
                    rendered = (
                        int(batch["index"][j]),
                        boxes[keep],
                        out["scores"][row][keep],
                        out["classes"][row][keep],
                    )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            dets = [d for part in multihost_utils.process_allgather(dets) for d in part]
        for iou_type in ("bbox", "segm"):
            if not dets:
                m = {k: 0.0 for k in det_eval.LVIS_METRICS}
                base = 0.0
            else:
                m = det_eval.evaluate_lvis(
                    gt, dets, iou_type=iou_type, max_dets=int(config.infer.max_detections)
                )
                base = det_eval.evaluate_lvis(
                    *_restrict(gt, dets, base_ids),
                    iou_type=iou_type,
                    max_dets=int(config.infer.max_detections),
                )["AP"]
            for k, v in m.items():
                metrics[f"{variant}/{iou_type}/{k}"] = float(v)
            metrics[f"{variant}/{iou_type}/AP_base"] = float(base)
        if jax.process_index() == 0 and task.workdir:
            det_eval.write_results(
                os.path.join(task.workdir, f"detections_{variant}.json"),
                {k: v for k, v in metrics.items() if k.startswith(variant)},
                dets,
            )
    if jax.process_index() == 0 and task.workdir and rendered is not None:
        from rovit_jax.detection.render import render_detections

        index, boxes, scores, classes = rendered
        names = [name for _, name, _ in table]
        path = os.path.join(task.workdir, "detections.png")
        render_detections(source[index]["image"], boxes, scores, classes, names, path)
        logging.info("rendered detections to %s", path)
    return metrics


class _Subset:
    """The first `n` examples of a source."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def format_table(metrics: dict[str, float]) -> str:
    """A markdown table of the headline numbers for both variants."""
    cols = [
        ("bbox", "AP"),
        ("bbox", "AP50"),
        ("bbox", "APr"),
        ("bbox", "AP_base"),
        ("segm", "AP"),
        ("segm", "APr"),
        ("segm", "AP_base"),
    ]
    head = "| variant | " + " | ".join(f"{t} {k}" for t, k in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for variant in VARIANTS:
        vals = [metrics.get(f"{variant}/{t}/{k}", float("nan")) for t, k in cols]
        lines.append(f"| {variant} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |")
    return "\n".join(lines)
