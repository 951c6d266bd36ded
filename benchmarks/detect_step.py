r"""Detection benchmark: train-step time and inference images/s.

  python benchmarks/detect_step.py                    # shapes config and ViT-B/16 at 1024 px
  python benchmarks/detect_step.py --only=shapes

Towers and vocabulary are randomly initialised (speed does not depend on their values), so no
pretraining run or dataset is needed. The LVIS-style evaluation timing (faster-coco-eval against
the official `lvis` package on 2,000 generated images) is `benchmarks/detection_eval.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from rovit_jax.detection import rcnn  # noqa: E402
from rovit_jax.tasks.detect import DetectTask  # noqa: E402
from rovit_jax.tasks.pretrain import build_model  # noqa: E402
from rovit_jax.train import mesh as mesh_lib  # noqa: E402
from rovit_jax.train.trainer import Trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(file: str, arg: str | None):
    spec = importlib.util.spec_from_file_location(file[:-3], os.path.join(REPO, "configs", file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def cases() -> dict[str, tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]]:
    shapes = _load("shapes_detect.py", None)
    lvis = _load("lvis_detect.py", "variant=B/16,batch=1")
    lvis.eval.batch_size = 1
    return {
        "shapes": (shapes, shapes.pretrain),
        "vit_b16_1024": (lvis, _load("vit_b16_224_pretrain.py", "batch=8")),
    }


def random_task(config, pretrain_config, num_classes: int) -> DetectTask:
    """A DetectTask with random towers and a random vocabulary (no data, no pretraining run)."""
    task = DetectTask(config, "", check_files=False)  # recipe configs name data files not here
    pcfg = ml_collections.ConfigDict(pretrain_config.to_dict())
    tt = build_model(pcfg)
    s, length = pcfg.pp.image_size, pcfg.tokenizer.max_len
    params = jax.jit(tt.init)(
        jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, length), jnp.int32)
    )["params"]
    task.__dict__["pretrained"] = (pcfg, params)
    e = pcfg.model.embed_dim
    emb = np.random.default_rng(0).normal(size=(num_classes, e)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    vocab = dict(embeddings=emb, valid=np.ones(num_classes, bool))
    task.__dict__["base_vocabulary"] = dict(vocab, category_map={})
    task.__dict__["full_vocabulary"] = dict(vocab, is_novel=np.zeros(num_classes, bool))
    return task


def synthetic_batch(config, rng) -> dict[str, np.ndarray]:
    shapes = DetectTask.batch_shapes(type("T", (), {"config": config})())
    out = {}
    for k, sds in shapes.items():
        out[k] = np.zeros(sds.shape, sds.dtype)
    b, m = shapes["boxes"].shape[:2]
    s = config.det.image_size
    y0 = rng.uniform(0, 0.6 * s, (b, m, 2))
    out["boxes"] = np.concatenate([y0, y0 + rng.uniform(0.05 * s, 0.4 * s, (b, m, 2))], -1)
    out["boxes"] = out["boxes"].astype(np.float32)
    out["valid"][:, : min(m, 8)] = True
    out["classes"] = np.where(out["valid"], rng.integers(0, 16, (b, m)), -1).astype(np.int32)
    out["image"] = rng.uniform(-1, 1, out["image"].shape).astype(np.float32)
    return out


def _time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name, config, pretrain_config, steps: int) -> dict:
    task = random_task(config, pretrain_config, 1203 if name != "shapes" else 34)
    mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 1)])
    task.validate(mesh)
    trainer = Trainer(config, task, mesh)
    t = time.perf_counter()
    compiled = trainer.lower().compile()
    compile_s = time.perf_counter() - t
    state = trainer.init_state()
    batch = trainer.global_batch(synthetic_batch(config, np.random.default_rng(0)))
    state, m = compiled(state, batch)
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    step_s = _time(step, steps)
    vocab = task.full_vocabulary
    images = batch["image"][: config.eval.batch_size]
    predict = jax.jit(
        lambda p, im: rcnn.detect(
            task.model,
            p,
            im,
            jnp.asarray(vocab["embeddings"]),
            jnp.asarray(vocab["valid"]),
            jnp.asarray(vocab["is_novel"]),
            task.rcnn,
            vlm_region_embeddings_fn=lambda x, bx: task.vlm_region_embeddings(
                task.pretrained[1], x, bx
            ),
            vlm_logit_scale=jnp.exp(task.pretrained[1]["t"]),
        )
    )
    params = holder["state"]["params"]
    jax.block_until_ready(predict(params, images))
    infer_s = _time(lambda: predict(params, images), steps)
    return dict(
        case=name,
        batch=config.batch_size,
        px=config.det.image_size,
        compile_s=compile_s,
        step_s=step_s,
        train_img_s=config.batch_size / step_s,
        infer_img_s=images.shape[0] / infer_s,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["shapes", "vit_b16_1024"], default=None)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    all_cases = cases()
    print(f"devices: {jax.devices()}")
    print(
        f"{'case':<14} {'batch':>5} {'px':>5} {'compile s':>9} {'step s':>8} {'train img/s':>11} "
        f"{'infer img/s':>11}"
    )
    for name in [args.only] if args.only else list(all_cases):
        r = bench(name, *all_cases[name], args.steps)
        print(
            f"{r['case']:<14} {r['batch']:>5} {r['px']:>5} {r['compile_s']:>9.1f} "
            f"{r['step_s']:>8.3f} {r['train_img_s']:>11.2f} {r['infer_img_s']:>11.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
