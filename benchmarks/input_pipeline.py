r"""Input-pipeline benchmark: host images/s of the batchers vs the images/s the trainers consume.

  python benchmarks/input_pipeline.py                  # 64 COCO-format images, 4 x 64 web pairs
  python benchmarks/input_pipeline.py --quick          # tiny sizes: a smoke run (well under 1 min)

In a temporary directory it generates

  (a) a COCO-format detection dataset: --num-images JPEG images of about 640x480 (each side
      varies by up to 32 px), each with 5-10 filled random polygons annotated as instances
      (polygon segmentation, bbox, area, COCO 2017 category ids), read with CocoDetectionSource
      (masks decoded with pycocotools) and batched by DetectionBatches with large-scale jitter:
      at 1024 px with the detection defaults (the paper's setting: scale 0.1-2.0, up to 100
      instances) and at the shapes config's canvas (256 px, scale 0.5-1.5, 16 instances);
  (b) img2dataset-style TFRecord shards: 4 shards holding 256 JPEG images of 256x256 with
      captions ("jpg", "txt", "key", "width", "height"), read with WebShardsImageTextSource and
      batched by PretrainBatches (decode, resize, tokenize with a SentencePiece model trained on
      the captions) at 224 px (the paper's pretraining size) and at the shapes config's 64 px.

Each pipeline is timed on ONE thread, the calling one (decoding, augmentation and tokenization
are plain Python / PIL / numpy per example), over whole batches after one warm-up batch; the
figure is therefore a per-core rate. It is timed again through `train.prefetch.prefetch`, the
training loop's helper: one background producer thread (prefetch takes no worker count, so it
hides host time behind the device step but adds no parallelism).

Then the same batchers with rows built by 1 and by 2 worker processes (`data.worker_processes`)
at the paper's sizes (detection 1024 px, pretraining 224 px), every timed batch checked equal to
the in-process batcher's; on a 2-core host the parent shares the cores with the two workers.

Next to it: what the shapes trainers consume. One train step of configs/shapes_pretrain.py and
one of configs/shapes_detect.py (random weights, synthetic batch: the timing code of
benchmarks/pretrain_step.py and benchmarks/detect_step.py) give batch / step time, the images/s
a trainer needs; "pipeline/needs" >= 1 means one host thread keeps that trainer fed.
--quick uses the configs' `tiny` variants and tiny datasets.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from rovit_jax.data.coco import CocoDetectionSource  # noqa: E402
from rovit_jax.data.detection_input import DetectionBatches  # noqa: E402
from rovit_jax.data.image_text import PretrainBatches  # noqa: E402
from rovit_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: E402
from rovit_jax.data.vocabularies import COCO80  # noqa: E402
from rovit_jax.data.web_shards import WebShardsImageTextSource  # noqa: E402
from rovit_jax.detect_config import detect_defaults  # noqa: E402
from rovit_jax.pretrain_config import pretrain_defaults  # noqa: E402
from rovit_jax.train import mesh as mesh_lib  # noqa: E402
from rovit_jax.train.prefetch import prefetch  # noqa: E402
from rovit_jax.train.trainer import Trainer  # noqa: E402

# The step benchmarks sit next to this file (benchmarks/ is not a package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import detect_step  # noqa: E402
import pretrain_step  # noqa: E402

NUM_SHARDS = 4
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
OBJECTS = ("circle", "square", "star", "cup", "dog", "car", "chair", "bottle", "tree", "kite")

# ----------------------------------------------------------------------------------------------
# Generated data.


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: smooth colour blobs plus pixel noise, so JPEG sizes are photo-like."""
    coarse = (rng.random((max(height // 40, 2), max(width // 40, 2), 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.int16)
    noisy = smooth + rng.normal(0.0, 10.0, smooth.shape).astype(np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _polygon(rng: np.random.Generator, height: int, width: int) -> list[float]:
    """A random star-shaped polygon inside the image: [x0, y0, x1, y1, ...] in pixels."""
    radius = rng.uniform(0.04, 0.25) * min(height, width)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    n = int(rng.integers(5, 13))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.5, 1.0, n)
    xs = np.clip(cx + radii * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + radii * np.sin(angles), 0, height - 1)
    return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


def make_coco_dataset(
    root: str, num_images: int, size: tuple[int, int], seed: int = 0
) -> tuple[str, str]:
    """Writes `num_images` JPEGs (about size = (width, height)) and an instances JSON.

    Returns (annotation JSON path, image folder).
    """
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir)
    category_ids = COCO80.ids()
    jitter = max(size[1] // 15, 1)  # "about" the nominal size: each side varies a little
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width = int(size[0] + rng.integers(-jitter, jitter + 1))
        height = int(size[1] + rng.integers(-jitter, jitter + 1))
        canvas = Image.fromarray(_texture(rng, height, width))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(5, 11))):
            poly = _polygon(rng, height, width)
            draw.polygon(poly, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
            area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
            x0, y0 = float(xs.min()), float(ys.min())
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(category_ids)),
                    "segmentation": [poly],
                    "bbox": [x0, y0, float(xs.max()) - x0, float(ys.max()) - y0],
                    "area": area,
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id:012d}.jpg"
        with open(os.path.join(image_dir, file_name), "wb") as f:
            f.write(_jpeg(canvas))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    categories = [{"id": c.id, "name": c.name, "supercategory": ""} for c in COCO80]
    path = os.path.join(root, "instances_bench.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path, image_dir


def _caption(rng: np.random.Generator) -> str:
    k = int(rng.integers(1, 4))
    parts = [f"a {rng.choice(COLOURS)} {rng.choice(OBJECTS)}" for _ in range(k)]
    return "a photo of " + " and ".join(parts) + "."


def make_web_shards(root: str, num_images: int, size: int, seed: int = 1) -> tuple[str, list[str]]:
    """Writes NUM_SHARDS img2dataset-style TFRecord shards; returns (folder, all captions)."""
    import tensorflow as tf  # heavy; only the shard writer needs it

    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "shards")
    os.makedirs(folder)
    per_shard = -(-num_images // NUM_SHARDS)

    def raw(value: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def integer(value: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    captions = []
    for shard in range(NUM_SHARDS):
        path = os.path.join(folder, f"{shard:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(shard * per_shard, min((shard + 1) * per_shard, num_images)):
                caption = _caption(rng)
                captions.append(caption)
                feature = {
                    "jpg": raw(_jpeg(Image.fromarray(_texture(rng, size, size)))),
                    "txt": raw(caption.encode()),
                    "key": raw(f"{shard:05d}{i:04d}".encode()),
                    "width": integer(size),
                    "height": integer(size),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
    return folder, captions


# ----------------------------------------------------------------------------------------------
# Timing.


def images_per_second(
    make_batch: Callable[[int], dict], batch_size: int, num_batches: int, *, use_prefetch: bool
) -> float:
    """Images/s over steps 1..num_batches, after step 0 as a warm-up.

    Without prefetch every batch is built on this thread; with it, by prefetch's one producer
    thread while this thread only waits (so the figure includes the hand-over cost).
    """
    make_batch(0)
    t = time.perf_counter()
    if use_prefetch:
        for _ in prefetch(make_batch, 1, num_batches + 1):
            pass
    else:
        for step in range(1, num_batches + 1):
            make_batch(step)
    return num_batches * batch_size / (time.perf_counter() - t)


def process_scaling(
    name: str,
    make_batches: Callable[[int], Any],
    batch_size: int,
    num_batches: int,
    rounds: int,
) -> dict:
    """Images/s of `make_batches(p)` (a batcher with `worker_processes=p`) for p = 1 and 2, over
    steps 1..num_batches after step 0 (which also starts the processes).

    The two are timed in alternation, `rounds` times each, each time with a fresh batcher (its
    processes shut down, work built ahead included, before the next is timed), so that a slow
    patch of the host weighs on both; the row holds each one's median and range.
    Raises AssertionError unless every timed batch equals the in-process batcher's.
    """
    reference = make_batches(0)
    expected = [reference.batch(step) for step in range(1, num_batches + 1)]
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for processes in (1, 2):
            batches = make_batches(processes)
            batches.batch(0)
            t = time.perf_counter()
            got = [batches.batch(step) for step in range(1, num_batches + 1)]
            rates[processes].append(num_batches * batch_size / (time.perf_counter() - t))
            for a, b in zip(expected, got):
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
            del batches, got  # shuts its processes down
    print(f"  timed {name} on 1 and 2 worker processes, {rounds} rounds", flush=True)
    row: dict[Any, Any] = dict(pipeline=name, batch=batch_size, images=num_batches * batch_size)
    for processes, values in rates.items():
        row[processes] = float(np.median(values))
        row[f"{processes} range"] = (min(values), max(values))
    return row


def _timed_batches(num_examples: int, batch_size: int, minimum: int) -> int:
    """One epoch's worth of batches after the warm-up one (at least `minimum`)."""
    return max(minimum, math.ceil(num_examples / batch_size) - 1)


def pretrain_need(quick: bool, steps: int) -> dict:
    """Train-step rate of configs/shapes_pretrain.py via benchmarks/pretrain_step.bench."""
    name = "shapes_tiny" if quick else "shapes"
    # bench() looks its configurations up by name; the tiny variant is not one of its cases.
    pretrain_step.CASES.setdefault("shapes_tiny", ("shapes_pretrain.py", "tiny"))
    r = pretrain_step.bench(name, steps, float("nan"))  # peak only feeds a ratio not shown here
    return dict(
        config="shapes_pretrain" + (":tiny" if quick else ""),
        variant=r["variant"],
        batch=r["batch"],
        px=r["image_size"],
        step_s=r["step_s"],
        img_s=r["images_per_s"],
    )


def detect_need(config, steps: int, name: str) -> dict:
    """Train-step rate of a detection config, with benchmarks/detect_step's random task/batch.

    Only the train step is compiled (detect_step.bench also compiles inference).
    """
    task = detect_step.random_task(config, config.pretrain, 34)
    mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 1)])
    task.validate(mesh)
    trainer = Trainer(config, task, mesh)
    compiled = trainer.compile_step()
    holder = {"state": trainer.init_state()}
    batch = trainer.global_batch(detect_step.synthetic_batch(task, np.random.default_rng(0)))

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    jax.block_until_ready(step())  # warm-up
    step_s = float(np.median(detect_step._time(step, steps)))  # per-step times -> median
    return dict(
        config=name,
        variant=config.pretrain.model.image.variant,
        batch=int(config.batch_size),
        px=int(config.det.image_size),
        step_s=step_s,
        img_s=int(config.batch_size) / step_s,
    )


# ----------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=None, help="detection images (64)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="timed train steps (3; quick 2)")
    args = parser.parse_args()
    quick = args.quick
    num_images = args.num_images if args.num_images is not None else (8 if quick else 64)
    steps = args.steps if args.steps is not None else (2 if quick else 3)
    if num_images < 1 or steps < 1:
        parser.error(f"--num-images and --steps must be >= 1, got {num_images} and {steps}")
    image_wh = (160, 120) if quick else (640, 480)
    web_images, web_px = (32, 64) if quick else (256, 256)
    minimum = 1 if quick else 2
    suffix = ":tiny" if quick else ""  # the shapes configs' tiny variants with --quick

    det_cfg = detect_step._load("shapes_detect.py", "tiny" if quick else None)
    pre_cfg = det_cfg.pretrain  # the shapes pretraining config (tiny with --quick)
    det_defaults, pre_defaults = detect_defaults(), pretrain_defaults()
    det_batch, pre_batch = int(det_cfg.batch_size), int(pre_cfg.batch_size)

    cores = os.cpu_count()
    print(
        f"host: {cores} CPU cores, jax devices {jax.devices()}; pipelines on 1 thread "
        "(batches built on the calling thread); 'prefetch' = train.prefetch, 1 producer "
        "thread (it takes no worker count)",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ann, image_dir = make_coco_dataset(os.path.join(tmp, "coco"), num_images, image_wh)
        shards, captions = make_web_shards(os.path.join(tmp, "web"), web_images, web_px)
        spm = train_sentencepiece(captions, os.path.join(tmp, "spm", "captions"), vocab_size=128)
        print(
            f"generated {num_images} detection images (~{image_wh[0]}x{image_wh[1]}) and "
            f"{web_images} web pairs ({web_px}x{web_px}) in {time.perf_counter() - t:.1f} s",
            flush=True,
        )

        source = CocoDetectionSource(ann, image_dir)
        category_map = {cid: i for i, cid in enumerate(COCO80.ids())}
        det_settings = [
            ("defaults", det_defaults.det),
            ("shapes_detect" + suffix, det_cfg.det),
        ]

        def det_batches(det, **kw):
            return DetectionBatches(
                source,
                global_batch=det_batch,
                image_size=int(det.image_size),
                max_instances=int(det.max_instances),
                seed=0,
                category_map=category_map,
                scale_range=tuple(det.scale_range),
                flip=bool(det.flip),
                mask_stride=int(det.mask_stride),
                **kw,
            )

        for origin, det in det_settings:
            batches = det_batches(det)
            n = _timed_batches(num_images, det_batch, minimum)
            lo, hi = det.scale_range
            rows.append(
                dict(
                    pipeline=f"detection LSJ {lo:g}-{hi:g} +masks ({origin})",
                    kind="detect",
                    px=int(det.image_size),
                    batch=det_batch,
                    images=n * det_batch,
                    direct=images_per_second(batches.batch, det_batch, n, use_prefetch=False),
                    prefetched=images_per_second(batches.batch, det_batch, n, use_prefetch=True),
                )
            )
            print(f"  timed {rows[-1]['pipeline']} at {rows[-1]['px']} px", flush=True)

        web = WebShardsImageTextSource(shards)
        pre_settings = [("defaults", pre_defaults), ("shapes_pretrain" + suffix, pre_cfg)]

        def pre_batches(cfg, **kw):
            pp = cfg.pp
            return PretrainBatches(
                web,
                SentencePieceTokenizer(spm, max_len=int(cfg.tokenizer.max_len)),
                global_batch=pre_batch,
                image_size=int(pp.image_size),
                seed=0,
                crop_scale=None if pp.crop_scale is None else tuple(pp.crop_scale),
                flip=bool(pp.flip),
                **kw,
            )

        for origin, cfg in pre_settings:
            pp = cfg.pp
            batches = pre_batches(cfg)
            n = _timed_batches(len(web), pre_batch, minimum)
            rows.append(
                dict(
                    pipeline=f"pretraining web shards, resize ({origin})",
                    kind="pretrain",
                    px=int(pp.image_size),
                    batch=pre_batch,
                    images=n * pre_batch,
                    direct=images_per_second(batches.batch, pre_batch, n, use_prefetch=False),
                    prefetched=images_per_second(batches.batch, pre_batch, n, use_prefetch=True),
                )
            )
            print(f"  timed {rows[-1]['pipeline']} at {rows[-1]['px']} px", flush=True)

        # Worker processes (`data.worker_processes`), at the paper's sizes (--quick: the tiny
        # configs' sizes; a smoke run of the machinery, not a measurement).
        det_px = det_cfg.det if quick else det_defaults.det
        pre_px = pre_cfg if quick else pre_defaults
        scaling = [
            (
                f"detection LSJ +masks, {int(det_px.image_size)} px",
                lambda p: det_batches(det_px, worker_processes=p),
                det_batch,
                _timed_batches(num_images, det_batch, minimum) * (1 if quick else 2),
            ),
            (
                f"pretraining web shards, {int(pre_px.pp.image_size)} px",
                lambda p: pre_batches(pre_px, worker_processes=p),
                pre_batch,
                # Several epochs of the small shard set: an epoch takes a fraction of a second.
                _timed_batches(len(web), pre_batch, minimum) * (1 if quick else 8),
            ),
        ]
        process_rows = [process_scaling(*s, rounds=1 if quick else 3) for s in scaling]

    print("\ninput pipelines (images/s on this host):")
    print(f"{'pipeline':<52} {'px':>5} {'batch':>5} {'timed':>5} {'1 thread':>9} {'prefetch':>9}")
    for r in rows:
        print(
            f"{r['pipeline']:<52} {r['px']:>5} {r['batch']:>5} {r['images']:>5} "
            f"{r['direct']:>9.1f} {r['prefetched']:>9.1f}"
        )

    print(
        "\nworker processes (data.worker_processes; images/s, median [range] of alternating "
        "rounds; batches equal to in-process):"
    )
    print(
        f"{'pipeline':<34} {'batch':>5} {'timed':>5} {'1 process':>20} {'2 processes':>20} "
        f"{'ratio':>6}"
    )
    for r in process_rows:
        cells = [f"{r[p]:.1f} [{r[f'{p} range'][0]:.1f}-{r[f'{p} range'][1]:.1f}]" for p in (1, 2)]
        print(
            f"{r['pipeline']:<34} {r['batch']:>5} {r['images']:>5} {cells[0]:>20} {cells[1]:>20} "
            f"{r[2] / r[1]:>5.2f}x",
            flush=True,
        )

    needs = [
        ("pretrain", pretrain_need(quick, steps)),
        ("detect", detect_need(det_cfg, steps, "shapes_detect" + suffix)),
    ]
    print("\ntrainer consumption vs pipeline (same px; train step with random weights):")
    print(
        f"{'config':<22} {'variant':<8} {'batch':>5} {'px':>5} {'step s':>8} "
        f"{'needs img/s':>11} {'pipeline img/s':>14} {'pipeline/needs':>14}"
    )
    for kind, need in needs:
        match = [r for r in rows if r["kind"] == kind and r["px"] == need["px"]]
        have = match[-1]["direct"] if match else float("nan")
        print(
            f"{need['config']:<22} {need['variant']:<8} {need['batch']:>5} {need['px']:>5} "
            f"{need['step_s']:>8.3f} {need['img_s']:>11.1f} {have:>14.1f} "
            f"{have / need['img_s']:>13.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
