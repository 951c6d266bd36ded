r"""What a pretrained shapes-world model knows about its categories, for whole images and regions.

  python benchmarks/vlm_probe.py --pretrain_workdir=/tmp/rovit_detect/pretrain

Zero-shot classifies, with the run's own text tower and prompt ensemble, (1) single-object test
images at the pretraining resolution and (2) every ground-truth object region of the test images
the way detection's VLM branch scores them (RoIAlign on the last feature map at the detection
resolution, with window attention in all blocks but the last, mean pooling, projection). Reports top-1 accuracy over all categories, split into base
and novel (rare) categories, next to chance, and how similar the text embeddings of two different
category names are. A category is a surface, "<pattern> <colour>", on a random silhouette; the
table also gives how often the predicted name has the right colour and the right pattern.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain_workdir", required=True)
    parser.add_argument("--num_images", type=int, default=500, help="test images to probe")
    parser.add_argument("--detect_size", type=int, default=256, help="detection resolution")
    parser.add_argument("--templates", default="vild")
    parser.add_argument(
        "--window_size",
        type=int,
        default=8,
        help="window attention of the region branch, as configs/shapes_detect.py's det.window_size"
        " (0: global attention in every block)",
    )
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    from rovit_jax.classifier import make_text_embedder
    from rovit_jax.data import image_text, shapes_world, sources
    from rovit_jax.data.detection_input import example_from_shapes_record, resize_and_pad
    from rovit_jax.detection.text_classifier import PROMPT_ENSEMBLES, build_text_classifier
    from rovit_jax.ops.roi_align import batched_roi_align
    from rovit_jax.tasks.pretrain import build_model
    from rovit_jax.models.layers import unscan_params
    from rovit_jax.models.vit import ViT
    from rovit_jax.train.checkpoint import load_params

    with open(os.path.join(args.pretrain_workdir, "config.json")) as f:
        pcfg = ml_collections.ConfigDict(json.load(f))
    if pcfg.data.name != "shapes_world":
        raise SystemExit("the probe needs a shapes-world pretraining run")
    params, step = load_params(args.pretrain_workdir)
    model = build_model(pcfg)
    embed = make_text_embedder(pcfg, params, sources.tokenizer_for(pcfg))
    cats = shapes_world.CATEGORIES
    text, _ = build_text_classifier(
        [c.name for c in cats],
        embed,
        templates=PROMPT_ENSEMBLES[args.templates],
        pad_to_bucket=False,
    )
    novel = np.array([c.frequency == "r" for c in cats])

    def grid_and_embed(images):
        (zimg, _), aux = model.apply({"params": params}, images, None)
        return zimg, aux["img/patch_grid"]

    run = jax.jit(grid_and_embed)
    if args.window_size:
        # As detection's VLM branch (infer.vlm_window_attention): window attention in every block
        # but the last.
        tower = dict(model.image, pool_type="gap", scan_layers=False)
        tower.update(window_size=args.window_size, global_blocks=(int(tower["depth"]) - 1,))
        windowed = ViT(**tower)
        unused = ("cls", "cls_pos_embedding", "MAPHead_0")
        img_params = {k: v for k, v in unscan_params(params["img"]).items() if k not in unused}
        region_grid = jax.jit(lambda x: windowed.apply({"params": img_params}, x)[1]["patch_grid"])
    else:
        region_grid = jax.jit(lambda x: grid_and_embed(x)[1])
    source = sources.shapes_builder(pcfg.data).as_data_source(pcfg.data.eval_split)
    size = int(pcfg.pp.image_size)
    whole: list[tuple[int, int]] = []  # (true, predicted) for single-object images
    region: list[tuple[int, int]] = []
    for i in range(min(args.num_images, len(source))):
        ex = example_from_shapes_record(source[i])
        if len(ex["labels"]) == 1:
            small = image_text.resize_image(ex["image"], size).astype(np.float32) / 127.5 - 1
            z, _ = run(jnp.asarray(small)[None])
            whole.append((int(ex["labels"][0]), int(np.argmax(np.asarray(z[0]) @ text.T))))
        big = resize_and_pad(ex, output_size=args.detect_size)
        image = big["image"].astype(np.float32) / 127.5 - 1
        grid = region_grid(jnp.asarray(image)[None])
        boxes = jnp.asarray(big["boxes"] * args.detect_size, jnp.float32)[None]
        pooled = batched_roi_align(
            grid,
            boxes,
            output_size=7,
            spatial_scale=grid.shape[1] / args.detect_size,
            sampling_ratio=2,
        ).mean(axis=(2, 3))
        emb = np.asarray(pooled @ params["img_proj"]["kernel"])[0]
        pred = np.argmax(emb @ text.T, axis=-1)
        region += [(int(t), int(p)) for t, p in zip(big["labels"], pred)]

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
