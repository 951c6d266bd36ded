"""Open-vocabulary detection evaluation: base + novel vocabulary, with and without VLM fusion."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from rovit_jax.data import detection_input
from rovit_jax.detection.postprocess import paste_masks, to_original_coordinates
from rovit_jax.evaluation import detection as det_eval
from rovit_jax.runs import vlm_tower_params

VARIANTS = ("fused", "detector_only")
_RENDER_POOL = 64  # evaluation images considered for detections.png


def _restrict(gt: dict[str, Any], dets: list[dict], keep_ids: set[int], protocol: str):
    """Ground truth and detections limited to categories `keep_ids` (AP on base / novel)."""
    images = gt["images"]
    if protocol == "lvis":
        images = [
            dict(
                im,
                neg_category_ids=[c for c in im["neg_category_ids"] if c in keep_ids],
                not_exhaustive_category_ids=[
                    c for c in im.get("not_exhaustive_category_ids", []) if c in keep_ids
                ],
            )
            for im in images
        ]
    sub = dict(gt)
    sub.update(
        images=images,
        categories=[c for c in gt["categories"] if c["id"] in keep_ids],
        annotations=[a for a in gt["annotations"] if a["category_id"] in keep_ids],
    )
    return sub, [d for d in dets if d["category_id"] in keep_ids]


def evaluate(task, trainer, params) -> dict[str, float]:
    """Runs the detector on the evaluation data and returns LVIS- or COCO-style metrics.

    Keys: `{variant}/{bbox|segm}/{AP, AP50, APr, APc, APf, AP_base, ...}` (LVIS protocol) or
    `{...}/{AP, AP50, ..., AP_base, AP_novel, AP50_novel}` (COCO protocol) for variant in
    ("fused", "detector_only"); segm only for datasets with masks. Writes
    `detections_<variant>.json` and a rendered PNG.
    """
    data = task.data
    source = data.eval
    table = task.table
    vocab = task.full_vocabulary
    settings = task.settings["eval"]
    num = len(source) if not settings.num_images else min(len(source), settings.num_images)
    subset = _Subset(source, num)
    gt = data.ground_truth(num)
    category_ids = list(data.eval_ids)
    novel = set(task.settings["data"].novel_frequencies)
    base_ids = {eid for eid, (_, _, f) in zip(category_ids, table) if f not in novel}
    novel_ids = set(category_ids) - base_ids
    vlm_params = vlm_tower_params(task.pretrained.params)
    text = [jax.numpy.asarray(vocab[k]) for k in ("embeddings", "valid", "is_novel")]
    metrics: dict[str, float] = {}
    # Fused detections of the first images, from which the rendered examples are picked:
    # (image_id, index, boxes, scores, classes).
    candidates: list[tuple[int, int, Any, Any, Any]] = []
    # One pass: both variants share the backbone, proposals and heads.
    predict = task.predict_fn(trainer, with_masks=data.with_masks)
    dets: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for batch in detection_input.eval_detection_batches(
        subset,
        batch_size=settings.batch_size,
        image_size=task.rcnn.image_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        pixels=task.pixels,
    ):
        images = trainer.global_batch({"image": batch["image"]})["image"]
        outs = jax.device_get(predict(params, vlm_params, images, *text))
        # Every host holds the whole (replicated) output; keep this host's rows.
        start = jax.process_index() * len(batch["image"])
        for j in range(len(batch["image"])):
            if not batch["mask"][j]:
                continue
            h, w, scale = batch["image_info"][j][:3]
            h, w = int(h), int(w)
            row = start + j
            for variant in VARIANTS:
                out = outs[variant]
                keep = out["valid"][row]
                boxes = to_original_coordinates(out["boxes"][row], scale, h, w)
                masks = None
                if data.with_masks:
                    masks = paste_masks(out["masks"][row][keep], boxes[keep], h, w)
                dets[variant] += det_eval.detections_to_results(
                    int(batch["image_id"][j]),
                    boxes[keep],
                    out["scores"][row][keep],
                    out["classes"][row][keep],
                    masks=masks,
                    category_ids=category_ids,
                )
                if variant == "fused" and len(candidates) < _RENDER_POOL:
                    candidates.append(
                        (
                            int(batch["image_id"][j]),
                            int(batch["index"][j]),
                            boxes[keep],
                            out["scores"][row][keep],
                            out["classes"][row][keep],
                        )
                    )
    for variant in VARIANTS:
        found = dets[variant]
        if jax.process_count() > 1:
            from rovit_jax.train.distributed import all_gather_json

            found = [d for part in all_gather_json(found) for d in part]
        iou_types = ("bbox", "segm") if data.with_masks else ("bbox",)
        for iou_type in iou_types:
            metrics.update(
                _metrics(
                    variant,
                    iou_type,
                    gt,
                    found,
                    data.protocol,
                    base_ids,
                    novel_ids,
                    task.rcnn.infer.max_detections,
                )
            )
        if jax.process_index() == 0 and task.workdir:
            det_eval.write_results(
                os.path.join(task.workdir, f"detections_{variant}.json"),
                {k: v for k, v in metrics.items() if k.startswith(variant)},
                found,
            )
    if jax.process_index() == 0 and task.workdir and candidates and settings.render_images:
        _render(task, source, gt, candidates, novel_ids, category_ids)
    return metrics


def _metrics(
    variant: str,
    iou_type: str,
    gt: dict[str, Any],
    dets: list[dict],
    protocol: str,
    base_ids: set[int],
    novel_ids: set[int],
    max_dets: int,
) -> dict[str, float]:
    """`{variant}/{iou_type}/{name}` metrics; AP_base (and AP_novel, AP50_novel for COCO)."""
    names = det_eval.LVIS_METRICS if protocol == "lvis" else det_eval.COCO_METRICS

    def run(g, d) -> dict[str, float]:
        if not d:
            return {k: 0.0 for k in names}
        if protocol == "lvis":
            return det_eval.evaluate_lvis(g, d, iou_type=iou_type, max_dets=max_dets)
        return det_eval.evaluate_coco(g, d, iou_type=iou_type)  # COCO's fixed 100 per image

    m = dict(run(gt, dets))
    if base_ids:
        m["AP_base"] = run(*_restrict(gt, dets, base_ids, protocol))["AP"]
    if protocol == "coco" and novel_ids:
        novel = run(*_restrict(gt, dets, novel_ids, protocol))
        m["AP_novel"], m["AP50_novel"] = novel["AP"], novel["AP50"]
    return {f"{variant}/{iou_type}/{k}": float(v) for k, v in m.items()}


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
    """A markdown table of the headline numbers for both variants (LVIS or COCO protocol)."""
    if any(k.endswith("/APr") for k in metrics):
        cols = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "APr"), ("bbox", "AP_base")]
        cols += [("segm", "AP"), ("segm", "APr"), ("segm", "AP_base")]
    else:
        cols = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP50_novel"), ("bbox", "AP_base")]
        cols += [("segm", "AP"), ("segm", "AP50_novel")]
    cols = [c for c in cols if any(k.startswith(f"{v}/{c[0]}/") for v in VARIANTS for k in metrics)]
    head = "| variant | " + " | ".join(f"{t} {k}" for t, k in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for variant in VARIANTS:
        vals = [metrics.get(f"{variant}/{t}/{k}", float("nan")) for t, k in cols]
        lines.append(f"| {variant} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |")
    return "\n".join(lines)


def _render(task, source, gt, candidates, novel_ids: set[int], category_ids: list[int]) -> None:
    """detections.png: `eval.render_images` held-out images with fused detections.

    Images with a novel-category object and several objects come first, so the picture shows
    open-vocabulary detection at work; novel category names carry a "*".
    """
    from rovit_jax.detection.render import render_detection_grid

    objects: dict[int, list[int]] = {}
    for a in gt["annotations"]:
        objects.setdefault(int(a["image_id"]), []).append(int(a["category_id"]))

    def rank(c):
        cats = objects.get(c[0], [])
        return (-int(any(k in novel_ids for k in cats)), -min(len(cats), 4), c[0])

    chosen = sorted(candidates, key=rank)[: task.settings["eval"].render_images]
    names = [
        name + ("*" if eid in novel_ids else "")
        for eid, (_, name, _) in zip(category_ids, task.table)
    ]
    panels = [(source[index]["image"], b, s, c) for _, index, b, s, c in chosen]
    path = os.path.join(task.workdir, "detections.png")
    render_detection_grid(panels, names, path, min_score=task.settings["eval"].render_min_score)
    logging.info("rendered detections of %d images to %s", len(panels), path)
