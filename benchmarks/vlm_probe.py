r"""What a pretrained shapes-world model knows about its categories, for whole images and regions.

  python benchmarks/vlm_probe.py --pretrain_workdir=/tmp/rovit_detect/pretrain

Zero-shot classifies, with the run's own text tower and the detection config's prompt ensemble,
(1) single-object test images at the pretraining resolution and (2) every ground-truth object
region of the test images through the detection task's own VLM branch (`--detect_config`, by
default configs/shapes_detect.py: the frozen tower at the detection resolution with its
window-attention layout, RoIAlign on the last feature map, mean pooling, projection). Reports
top-1 accuracy over all categories, split into base and novel (rare) categories, next to chance,
and how similar the text embeddings of two different category names are. A category is a
surface, "<pattern> <colour>", on a random silhouette; the table also gives how often the
predicted name has the right colour and the right pattern.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain_workdir", required=True)
    parser.add_argument("--num_images", type=int, default=500, help="test images to probe")
    parser.add_argument(
        "--detect_config",
        default=os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_detect.py"),
        help="detection config (path.py[:arg]) whose VLM branch is probed (det.image_size, "
        "infer.vlm_*, text.templates)",
    )
    parser.add_argument(
        "--window_size", type=int, default=None, help="override infer.vlm_window_size"
    )
    parser.add_argument(
        "--global_blocks",
        type=int,
        nargs="*",
        default=None,
        help="override infer.vlm_global_blocks (no value: window attention in every block)",
    )
    parser.add_argument(
        "--no_windows", action="store_true", help="infer.vlm_window_attention=False (all global)"
    )
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    from rovit_jax.config_files import load_config
    from rovit_jax.data import image_text, shapes_world, sources
    from rovit_jax.data.detection_transforms import resize_and_pad
    from rovit_jax.data.shapes_detection import example_from_shapes_record
    from rovit_jax.pretrain_settings import pretrain_settings
    from rovit_jax.runs import load_pretrained_towers
    from rovit_jax.tasks.detect import DetectTask

    towers = load_pretrained_towers(args.pretrain_workdir)
    pcfg = towers.config
    pretrained = pretrain_settings(pcfg)
    if pretrained["data"].name != "shapes_world":
        raise SystemExit("the probe needs a shapes-world pretraining run")
    dcfg = load_config(args.detect_config)
    dcfg.init.run_pretraining = False
    dcfg.init.pretrain_workdir = args.pretrain_workdir
    if args.window_size is not None:
        dcfg.infer.vlm_window_size = args.window_size
    if args.global_blocks is not None:
        dcfg.infer.vlm_global_blocks = tuple(args.global_blocks)
    if args.no_windows:
        dcfg.infer.vlm_window_attention = False
    # The detection task's own VLM branch: the frozen tower as detection runs it, RoIAlign of
    # the boxes on its last map, mean, projection.
    task = DetectTask(dcfg, check_files=False, pretrained=towers)
    params = task.pretrained.params
    model = task.two_tower
    cats = shapes_world.CATEGORIES
    text, _ = task.vocabulary([c.name for c in cats])
    text = np.asarray(text)[: len(cats)]
    novel = np.array([c.frequency == "r" for c in cats])
    detect_size = task.settings["det"].image_size
    embed_image = jax.jit(lambda x: model.apply({"params": params}, x, None)[0][0])
    embed_regions = jax.jit(lambda x, b: task.frozen_vlm.region_embeddings(params, x, b))

    data = pretrained["data"]
    builder = sources.shapes_builder(pretrained["data.world"], data.data_dir)
    source = builder.as_data_source(data.eval_split)
    size = pretrained["pp"].image_size
    whole: list[tuple[int, int]] = []  # (true, predicted) for single-object images
    region: list[tuple[int, int]] = []
    for i in range(min(args.num_images, len(source))):
        ex = example_from_shapes_record(source[i])
        if len(ex["labels"]) == 1:
            small = image_text.resize_image(ex["image"], size).astype(np.float32) / 127.5 - 1
            z = embed_image(jnp.asarray(small)[None])
            whole.append((int(ex["labels"][0]), int(np.argmax(np.asarray(z[0]) @ text.T))))
        big = resize_and_pad(ex, output_size=detect_size)
        image = big["image"].astype(np.float32) / 127.5 - 1
        boxes = jnp.asarray(big["boxes"] * detect_size, jnp.float32)[None]
        emb = np.asarray(embed_regions(jnp.asarray(image)[None], boxes))[0]
        pred = np.argmax(emb @ text.T, axis=-1)
        region += [(int(t), int(p)) for t, p in zip(big["labels"], pred)]

    step = towers.step
    print(
        f"pretraining run at step {step}; {len(whole)} single-object images, "
        f"{len(region)} object regions"
    )
    print("| probe | categories | n | top-1 | right colour | right pattern |")
    print("|---|---|---|---|---|---|")
    results = {}
    for name, pairs in (("whole image", whole), ("region (VLM branch)", region)):
        pairs_np = np.asarray(pairs)
        for group, sel in (("base", ~novel[pairs_np[:, 0]]), ("novel", novel[pairs_np[:, 0]])):
            t, p = pairs_np[sel, 0], pairs_np[sel, 1]
            if not len(t):
                continue
            top1 = float(np.mean(t == p))
            colour = float(np.mean([cats[a].colour == cats[b].colour for a, b in zip(t, p)]))
            pattern = float(np.mean([cats[a].pattern == cats[b].pattern for a, b in zip(t, p)]))
            results[f"{name}/{group}"] = dict(
                n=int(len(t)), top1=top1, colour=colour, pattern=pattern
            )
            print(f"| {name} | {group} | {len(t)} | {top1:.3f} | {colour:.3f} | {pattern:.3f} |")
    print(f"chance: top-1 {1 / len(cats):.3f}")
    sim = text @ text.T
    off = ~np.eye(len(cats), dtype=bool)
    print(
        f"text cosine between different category names: mean {sim[off].mean():.3f}, "
        f"max {sim[off].max():.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(step=int(step), results=results, chance=1 / len(cats)), f, indent=1)


if __name__ == "__main__":
    main()
