r"""Pretraining step benchmark: compile time, step time, images/s and achieved FLOP/s.

  python benchmarks/pretrain_step.py                 # shapes config and ViT-B/16 at 224 px
  python benchmarks/pretrain_step.py --only=shapes --steps=20
  python benchmarks/pretrain_step.py --attention=einsum,xla   # a row per attention kernel

Achieved FLOP/s uses the FLOPs of the compiled train step from XLA's cost analysis, divided by
the measured step time, and is reported as a fraction of this machine's dense float32 matmul
FLOP/s, measured in the same run (a 2048^3 matmul). On an accelerator pass --peak_flops to
compare against the chip's datasheet figure instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rovit_jax import config_files  # noqa: E402
from rovit_jax.tasks import get_task  # noqa: E402
from rovit_jax.train import mesh as mesh_lib  # noqa: E402
from rovit_jax.train.trainer import Trainer  # noqa: E402

# The benchmarks sit side by side (benchmarks/ is not a package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mfu import matmul_flops_per_second  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "shapes": ("shapes_pretrain.py", ""),
    "vit_b16_224": ("vit_b16_224_pretrain.py", "batch=8,cpu"),
}


def load_config(file: str, arg: str):
    """configs/<file> with get_config's `arg` (none when empty)."""
    return config_files.load_config(f"{file}:{arg}" if arg else file)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def bench(name: str, steps: int, peak: float, attention: str | None = None) -> dict:
    file, arg = CASES[name]
    config = load_config(file, arg)
    if attention is not None:
        config.attention = attention
    mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 1)])
    task = get_task(config)
    task.validate(mesh)
    trainer = Trainer(config, task, mesh)

    t = time.perf_counter()
    compiled = trainer.compile_step()
    compile_s = time.perf_counter() - t
    flops = _flops(compiled)

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
        "case": name,
        "variant": config.model.image.variant,
        "attention": config.attention,
        "batch": config.batch_size,
        "image_size": config.pp.image_size,
        "compile_s": compile_s,
        "step_s": step_s,
        "images_per_s": config.batch_size / step_s,
        "step_gflop": flops / 1e9,
        "achieved_gflops": flops / step_s / 1e9,
        "fraction_of_peak": flops / step_s / peak,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(CASES), default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--peak_flops",
        type=float,
        default=None,
        help="peak FLOP/s to compare against (default: measured matmul FLOP/s)",
    )
    parser.add_argument(
        "--attention",
        default="",
        help="comma-separated attention kernels, a row each (default: the config's)",
    )
    args = parser.parse_args()
    kernels = [k for k in args.attention.split(",") if k] or [None]
    peak = args.peak_flops or matmul_flops_per_second()
    print(
        f"devices: {jax.devices()}  reference FLOP/s: {peak / 1e9:.1f} GFLOP/s "
        f"({'given' if args.peak_flops else 'measured dense f32 matmul'})"
    )
    print(
        f"{'case':<12} {'variant':<6} {'attention':<9} {'batch':>5} {'px':>4} {'compile s':>9} {'step s':>8} "
        f"{'img/s':>8} {'GFLOP/step':>10} {'GFLOP/s':>8} {'of peak':>7}"
    )
    for name, kernel in [(n, k) for n in ([args.only] if args.only else CASES) for k in kernels]:
        r = bench(name, args.steps, peak, kernel)
        print(
            f"{r['case']:<12} {r['variant']:<6} {r['attention']:<9} {r['batch']:>5} {r['image_size']:>4} "
            f"{r['compile_s']:>9.2f} {r['step_s']:>8.3f} {r['images_per_s']:>8.1f} "
            f"{r['step_gflop']:>10.2f} {r['achieved_gflops']:>8.1f} {r['fraction_of_peak']:>7.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
