r"""Model FLOPs utilisation of the pretraining step, before and after the scale-out options.

  python benchmarks/mfu.py                          # ViT-B/16 at 224 px, batch 8 (a CPU-sized batch)
  python benchmarks/mfu.py --case=shapes --steps=20
  python benchmarks/mfu.py --peak_flops=275e12      # on a TPU v4 chip: MFU against its datasheet

Each row compiles the same train step with different options and times it:
  baseline   float32 compute, no rematerialisation, blocks unrolled, state not donated
  +donate    the step reuses the old state's buffers (donate_state)
  +scan      one nn.scan over the transformer blocks (scan_layers)
  +remat     blocks rematerialised, saving only matmul outputs (remat="dots")
  +bf16      bfloat16 compute, float32 parameters and optimizer state
  all        every option at once

Two FLOP counts are reported, and which is which matters:
  model FLOPs   counted analytically as in MaxText's MFU: 6 x (matmul parameters) x tokens for
                each tower (2 forward + 4 backward per multiply-add), plus 12 x layers x tokens^2
                x width for attention scores and values, plus 6 x B^2 x E for the contrastive
                logits. Rematerialisation does not change them: MFU counts useful work only.
  XLA FLOPs     the compiled step's own count (cost analysis), which includes recomputation
                (so XLA FLOP/s is "hardware FLOPs utilisation"). XLA counts the body of a loop
                once, so with scan_layers it under-counts by about the depth: read MFU there.
The reference FLOP/s is a dense float32 2048^3 matmul measured in the same run (or --peak_flops):
on this machine MFU is "fraction of what this CPU achieves on a large matmul".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rovit_jax import config_files  # noqa: E402
from rovit_jax.models.layers import transformer_size  # noqa: E402
from rovit_jax.models.vit import vit_variant  # noqa: E402
from rovit_jax.tasks import get_task  # noqa: E402
from rovit_jax.train import mesh as mesh_lib  # noqa: E402
from rovit_jax.train.mesh import tree_paths  # noqa: E402
from rovit_jax.train.trainer import Trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "vit_b16_224": ("vit_b16_224_pretrain.py", "batch=8,cpu"),
    "shapes": ("shapes_pretrain.py", ""),
}
BASELINE = dict(compute_dtype="float32", remat="none", scan_layers=False, donate_state=False)
ROWS = {
    "baseline": {},
    "+donate": dict(donate_state=True),
    "+scan": dict(scan_layers=True),
    "+remat": dict(remat="dots"),
    "+bf16": dict(compute_dtype="bfloat16"),
    "all": dict(donate_state=True, scan_layers=True, remat="dots", compute_dtype="bfloat16"),
}


def load_config(file: str, arg: str):
    """configs/<file> with get_config's `arg` (none when empty)."""
    return config_files.load_config(f"{file}:{arg}" if arg else file)


def matmul_flops_per_second(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
    """Dense [n, n] x [n, n] FLOP/s in `dtype` of the first local device (best of `repeats`)."""
    a = jax.device_put(
        jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype), jax.local_devices()[0]
    )
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def model_flops_per_step(config, abstract_params) -> float:
    """Analytic training FLOPs of one step of the two-tower model (see the module docstring)."""
    b = int(config.batch_size)
    img = vit_variant(config.model.image.variant)
    txt = transformer_size(config.model.text.variant)
    t_img = (int(config.pp.image_size) // img["patch_size"]) ** 2
    t_txt = int(config.tokenizer.max_len)
    per_token = {"img": 0, "txt": 0}
    per_example = 0
    for path, leaf in zip(tree_paths(abstract_params), jax.tree.leaves(abstract_params)):
        if not path.endswith("kernel"):
            continue
        tower = path.split("/")[0]
        if tower in per_token:
            per_token[tower] += int(np.prod(leaf.shape))
        else:  # projections act once per example, on the pooled vector
            per_example += int(np.prod(leaf.shape))
    dense = 6 * b * (per_token["img"] * t_img + per_token["txt"] * t_txt + per_example)
    attention = (
        12 * b * (img["depth"] * t_img**2 * img["width"] + txt["depth"] * t_txt**2 * txt["width"])
    )
    logits = 6 * b * b * int(config.model.embed_dim)
    return float(dense + attention + logits)


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def bench(case: str, row: str, steps: int, peak: float) -> dict:
    file, arg = CASES[case]
    config = load_config(file, arg)
    config.update(BASELINE)
    config.update(ROWS[row])
    mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 1)])
    task = get_task(config)
    task.validate(mesh)
    trainer = Trainer(config, task, mesh)
    t = time.perf_counter()
    compiled = trainer.compile_step()
    compile_s = time.perf_counter() - t
    model_flops = model_flops_per_step(config, trainer.abstract_state["params"])
    xla_flops = _xla_flops(compiled)

    state = trainer.init_state()
    rng = np.random.default_rng(0)
    shapes = task.batch_shapes()
    batch = trainer.global_batch(
        {
            "image": rng.uniform(-1, 1, shapes["image"].shape).astype(np.float32),
            "text": rng.integers(1, 200, shapes["text"].shape).astype(np.int32),
        }
    )
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    return {
        "case": case,
        "row": row,
        "options": dict(BASELINE, **ROWS[row]),
        "batch": int(config.batch_size),
        "compile_s": compile_s,
        "step_s": step_s,
        "images_per_s": config.batch_size / step_s,
        "model_gflop_per_step": model_flops / 1e9,
        "xla_gflop_per_step": xla_flops / 1e9,
        "model_gflops": model_flops / step_s / 1e9,
        "mfu": model_flops / step_s / peak,
        "hfu": xla_flops / step_s / peak,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="vit_b16_224")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {list(ROWS)}")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak_flops", type=float, default=None, help="default: measured")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    peak = args.peak_flops or matmul_flops_per_second()
    print(
        f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}; reference "
        f"{peak / 1e9:.1f} GFLOP/s ({'given' if args.peak_flops else 'measured f32 matmul'})"
    )
    print(
        f"{'row':<9} {'compile s':>9} {'step s':>8} {'img/s':>7} {'model GFLOP':>11} "
        f"{'XLA GFLOP':>10} {'GFLOP/s':>8} {'MFU':>6} {'HFU':>6}"
    )
    results = []
    for row in rows:
        r = bench(args.case, row, args.steps, peak)
        results.append(r)
        print(
            f"{row:<9} {r['compile_s']:>9.2f} {r['step_s']:>8.3f} {r['images_per_s']:>7.1f} "
            f"{r['model_gflop_per_step']:>11.2f} {r['xla_gflop_per_step']:>10.2f} "
            f"{r['model_gflops']:>8.1f} {r['mfu']:>6.1%} {r['hfu']:>6.1%}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "case": args.case, "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
