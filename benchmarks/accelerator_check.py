r"""How fast the recommended configs run on the device in hand: one command, any JAX backend.

  python benchmarks/accelerator_check.py                          # B/16 and L/16; GPU or TPU host
  python benchmarks/accelerator_check.py --peak_flops=989e12      # + MFU against a datasheet peak
  python benchmarks/accelerator_check.py --variants=B/16          # on a CPU: the B/16 case only
  python benchmarks/accelerator_check.py --small                  # tiny shapes: a smoke run (CI)

It prints a table per section and writes every figure to --json (default
accelerator_check.json in the current directory):

  device       JAX's backend, device kind and count, memory per device (the backend's
               `bytes_limit`; on a CPU the host's RAM divided among its JAX devices).
  matmul       dense [n, n] x [n, n] FLOP/s of one device in bfloat16 and float32 (best of 10;
               n = 8192 on accelerators, 2048 on CPUs, 256 with --small).
  pretrain     the train step of configs/vit_b16_224_pretrain.py at 224 px for each of
               --variants, with the recommended options: bfloat16 compute (float32 parameters
               and optimizer state), blocks rematerialised saving matmul outputs (remat=dots),
               one scanned block (scan_layers), donated state, attention="auto" (cuDNN's fused
               kernel on GPUs), parameters and batch split over every device (layout=fsdp).
               --small: configs/shapes_pretrain.py:tiny with the same options.
  detect       the train step of configs/lvis_detect.py at 1024 px, B/16 backbone, bfloat16,
               one image per device (fresh towers and 1203 zero class embeddings: no data).
               --small: configs/shapes_detect.py:tiny.
  input        images/s of the host's input pipelines at those sizes, with one worker process
               per host core (--input_workers): pretraining batches of generated web shards at
               224 px, detection batches of a generated COCO-format set at 1024 px.

Batch sizes. Each pretraining case takes the largest per-device batch, a power of two up to
--max_batch_per_device (default 256 on accelerators, 8 on CPUs, 2 with --small), whose compiled
step fits in --memory_fraction of the device memory by XLA's memory analysis (arguments +
outputs - aliased + temp, the estimate `python -m rovit_jax.plan` reports); halving from the
cap, each try costs one compile. The detection case keeps one image per device and turns on full
rematerialisation only if the step does not fit without it.

Figures of each step: compile time, median step time over --steps timed steps (after one
warm-up), images/s, model FLOPs per step (pretraining: the analytic count of
benchmarks/mfu.py, 6 x matmul parameters x tokens plus attention and logits; detection: the
matmuls and convolutions of the step's jaxpr, from benchmarks/detect_step.py), MFU = model
FLOPs / step time / (devices x peak) against the measured matmul rate of the step's compute
dtype and, with --peak_flops (per device, the chip's datasheet dense figure for that dtype),
against it; memory per device: the compiled estimate and, where the backend reports it (GPU,
TPU), the measured peak so far in the process (`peak_bytes_in_use`; cases run smallest first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rovit_jax.config_files import load_config  # noqa: E402
from rovit_jax.tasks.detect import DetectTask  # noqa: E402
from rovit_jax.tasks.pretrain import PretrainTask  # noqa: E402
from rovit_jax.train import distributed  # noqa: E402
from rovit_jax.train import mesh as mesh_lib  # noqa: E402
from rovit_jax.train.trainer import Trainer  # noqa: E402

# The other benchmarks sit next to this file (benchmarks/ is not a package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import detect_step  # noqa: E402
import input_pipeline  # noqa: E402
import mfu  # noqa: E402

GIB = 2**30
# The recommended options of the pretraining step (module docstring).
PRETRAIN_OPTIONS = "layout=fsdp,remat=dots,scan=True,dtype=bfloat16"


# ---- the device -----------------------------------------------------------------------------
def device_info() -> dict[str, Any]:
    """Backend, device kind and count, and the memory of one device in bytes."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        memory, source = int(stats["bytes_limit"]), "bytes_limit"
    else:  # CPU: the simulated devices share the host's RAM
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory, source = ram // jax.local_device_count(), "host RAM / devices"
    return dict(
        backend=jax.default_backend(),
        kind=device.device_kind,
        devices=jax.device_count(),
        hosts=jax.process_count(),
        memory_bytes=memory,
        memory_source=source,
        host_cores=os.cpu_count(),
        jax=jax.__version__,
    )


def measured_peak_bytes() -> int | None:
    """The backend's peak bytes in use on the first device so far (None where not reported)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


# ---- train steps ------------------------------------------------------------------------------
def compiled_bytes(compiled) -> int:
    """Per-device memory of a compiled step: arguments + outputs - aliased + temp."""
    m = compiled.memory_analysis()
    if m is None:
        return -1
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def _compile(config, task) -> tuple[Trainer, Any, float]:
    mesh = mesh_lib.make_mesh(config.mesh)
    task.validate(mesh)
    trainer = Trainer(config, task, mesh)
    t = time.perf_counter()
    compiled = trainer.compile_step()
    return trainer, compiled, time.perf_counter() - t


def fit_batch(
    build, per_device_sizes: list[int], budget_bytes: float
) -> tuple[int, tuple, list[dict]]:
    """The first of `per_device_sizes` (largest first) whose compiled step fits `budget_bytes`.

    `build(per_device)` -> (config, task, trainer, compiled, compile_s). Returns (per_device,
    that build's result, every try as {per_device, bytes, fits}); the last size is taken even
    when it does not fit (the row then says so).
    """
    tries = []
    for i, per_device in enumerate(per_device_sizes):
        built = build(per_device)
        need = compiled_bytes(built[3])
        fits = 0 <= need <= budget_bytes
        tries.append(dict(per_device=per_device, bytes=need, fits=fits))
        if fits or i == len(per_device_sizes) - 1:
            return per_device, built, tries
    raise ValueError("per_device_sizes is empty")


def host_slice(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a global batch (`Trainer.global_batch` takes each host's slice)."""
    n, i = jax.process_count(), jax.process_index()
    return {k: np.split(v, n)[i] for k, v in batch.items()}


def time_steps(compiled, state, batch, steps: int) -> list[float]:
    """Per-step seconds of `steps` steps after one warm-up step (the state is threaded)."""
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return times


def _row(name, config, trainer, compiled, compile_s, times, model_flops, peaks, tries) -> dict:
    devices = jax.device_count()
    step_s = statistics.median(times)
    dtype = str(config.compute_dtype)
    row = dict(
        case=name,
        global_batch=int(config.batch_size),
        per_device_batch=int(config.batch_size) // mesh_lib.num_batch_shards(trainer.mesh),
        compute_dtype=dtype,
        remat=str(config.remat),
        scan_layers=bool(config.get("scan_layers", False)),
        attention=str(config.attention),
        compile_s=compile_s,
        step_s=step_s,
        step_s_range=(min(times), max(times)),
        images_per_s=int(config.batch_size) / step_s,
        model_tflop_per_step=model_flops / 1e12,
        estimate_gib=compiled_bytes(compiled) / GIB,
        measured_peak_gib=None,
        batch_tries=tries,
    )
    peak = measured_peak_bytes()
    if peak is not None:
        row["measured_peak_gib"] = peak / GIB
    for label, per_device in peaks.items():
        rate = per_device.get(dtype)
        row[f"mfu_{label}"] = model_flops / step_s / (devices * rate) if rate else None
    return row


def pretrain_case(variant: str, args, peaks: dict, budget: float) -> dict:
    def build(per_device: int):
        batch = per_device * jax.device_count()
        if args.small:
            config = load_config("shapes_pretrain.py:tiny")
            for key, value in dict(
                remat="dots", scan_layers=True, compute_dtype="bfloat16", batch_size=batch
            ).items():
                config[key] = value
            config.mesh = (("data", 1), ("fsdp", -1))
        else:
            config = load_config(
                f"vit_b16_224_pretrain.py:variant={variant},batch={batch},{PRETRAIN_OPTIONS}"
            )
        config.donate_state = True
        config.attention = "auto"
        task = PretrainTask(config, check_files=False)  # the recipe's data is not needed here
        return (config, task, *_compile(config, task))

    sizes = [args.max_batch_per_device // 2**i for i in range(16)]
    sizes = [s for s in sizes if s >= 1]
    _, (config, task, trainer, compiled, compile_s), tries = fit_batch(build, sizes, budget)
    state = trainer.init_state()
    shapes = task.batch_shapes()
    rng = np.random.default_rng(0)
    rows = {
        "image": rng.uniform(-1, 1, shapes["image"].shape).astype(np.float32),
        "text": rng.integers(1, 200, shapes["text"].shape).astype(np.int32),
    }
    batch = trainer.global_batch(host_slice(rows))
    model_flops = mfu.model_flops_per_step(config, trainer.abstract_state["params"])
    times = time_steps(compiled, state, batch, args.steps)
    name = f"pretrain {config.model.image.variant} {int(config.pp.image_size)} px"
    return _row(name, config, trainer, compiled, compile_s, times, model_flops, peaks, tries)


def detect_case(args, peaks: dict, budget: float) -> dict:
    devices = jax.device_count()

    def build(remat: str):
        if args.small:
            config = load_config("shapes_detect.py:tiny")
            config.batch_size = devices
            config.mesh = (("data", 1), ("fsdp", -1))
            pretrain_config, classes = config.pretrain, 34
        else:
            config = load_config(
                f"lvis_detect.py:variant=B/16,batch={devices},layout=fsdp,dtype=bfloat16"
            )
            pretrain_config, classes = load_config("vit_b16_224_pretrain.py:batch=8"), 1203
        config.compute_dtype = "bfloat16"
        config.remat = remat
        config.eval.batch_size = devices
        config.attention = "auto"
        # Fresh towers and zero class embeddings (no tokenizer, data or pretraining run): the
        # step's cost does not depend on their values.
        task = DetectTask.for_planning(config, pretrain_config, classes)
        return (config, task, *_compile(config, task))

    _, (config, task, trainer, compiled, compile_s), tries = fit_batch(
        lambda i: build(("none", "full")[i]), [0, 1], budget
    )
    for t, remat in zip(tries, ("none", "full")):
        t.update(per_device=1, remat=remat)
    state = trainer.init_state()
    batch = detect_step.synthetic_batch(task, np.random.default_rng(0))
    batch = trainer.global_batch(host_slice(batch))
    model_flops = detect_step.dot_flops(jax.make_jaxpr(trainer.train_step)(state, batch).jaxpr)
    times = time_steps(compiled, state, batch, args.steps)
    name = f"detect {config.pretrain.model.image.variant} {int(config.det.image_size)} px"
    return _row(name, config, trainer, compiled, compile_s, times, model_flops, peaks, tries)


# ---- input pipeline -------------------------------------------------------------------------
def input_rates(args) -> list[dict]:
    """Images/s of the pretraining and detection batchers on generated data (see docstring)."""
    from rovit_jax.data.coco import CocoDetectionSource
    from rovit_jax.data.detection_input import DetectionBatches
    from rovit_jax.data.image_text import PretrainBatches
    from rovit_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from rovit_jax.data.vocabularies import COCO80
    from rovit_jax.data.web_shards import WebShardsImageTextSource

    small = args.small
    workers = args.input_workers
    pre_px, det_px = (64, 128) if small else (224, 1024)
    batch = 8 if small else 32
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards, captions = input_pipeline.make_web_shards(
            os.path.join(tmp, "web"), 32 if small else 256, 64 if small else 256
        )
        spm = train_sentencepiece(captions, os.path.join(tmp, "spm", "captions"), vocab_size=128)
        ann, images = input_pipeline.make_coco_dataset(
            os.path.join(tmp, "coco"), 8 if small else 64, (160, 120) if small else (640, 480)
        )
        web = WebShardsImageTextSource(shards)
        pipelines = {
            f"pretraining web shards, {pre_px} px": lambda p: PretrainBatches(
                web,
                SentencePieceTokenizer(spm, max_len=16),
                global_batch=batch,
                image_size=pre_px,
                seed=0,
                crop_scale=(0.9, 1.0),
                flip=True,
                worker_processes=p,
            ),
            f"detection LSJ 0.1-2.0 +masks, {det_px} px": lambda p: DetectionBatches(
                CocoDetectionSource(ann, images),
                global_batch=batch,
                image_size=det_px,
                max_instances=100,
                seed=0,
                category_map={cid: i for i, cid in enumerate(COCO80.ids())},
                scale_range=(0.1, 2.0),
                flip=True,
                mask_stride=4,
                worker_processes=p,
            ),
        }
        num_batches = 2 if small else 8
        for name, make in pipelines.items():
            batches = make(workers)
            rate = input_pipeline.images_per_second(
                batches.batch, batch, num_batches, use_prefetch=False
            )
            del batches  # stops its worker processes
            rows.append(dict(pipeline=name, workers=workers, batch=batch, images_per_s=rate))
    return rows


# ---- report ---------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    """`value` in `spec` (">9.1%"), or "n/a" right-aligned to the same width."""
    if value is None:
        return format("n/a", ">" + re.match(r"[<>^]?(\d*)", spec).group(1))
    return format(value, spec)


def print_report(report: dict) -> None:
    d = report["device"]
    print(
        f"\ndevice: {d['devices']} x {d['kind']} ({d['backend']}, {d['hosts']} host(s)), "
        f"{d['memory_bytes'] / GIB:.1f} GiB per device ({d['memory_source']}); "
        f"jax {d['jax']}; {d['host_cores']} host cores"
    )
    m = report["matmul"]
    print(
        f"matmul (one device, n={m['n']}): bfloat16 {m['bfloat16'] / 1e12:.3f} TFLOP/s, "
        f"float32 {m['float32'] / 1e12:.3f} TFLOP/s"
        + (
            f"; datasheet peak given: {report['peak_flops'] / 1e12:.1f} TFLOP/s"
            if report["peak_flops"]
            else ""
        )
    )
    print(
        f"\n{'case':<26} {'batch':>6} {'/dev':>5} {'remat':>5} {'compile s':>9} {'step s':>8} "
        f"{'img/s':>9} {'TFLOP/step':>10} {'MFU meas.':>9} {'MFU sheet':>9} {'est GiB':>8} "
        f"{'peak GiB':>8}"
    )
    for r in report["steps"]:
        print(
            f"{r['case']:<26} {r['global_batch']:>6} {r['per_device_batch']:>5} {r['remat']:>5} "
            f"{r['compile_s']:>9.1f} {r['step_s']:>8.3f} {r['images_per_s']:>9.3g} "
            f"{r['model_tflop_per_step']:>10.3f} {_fmt(r['mfu_measured'], '>9.1%')} "
            f"{_fmt(r.get('mfu_datasheet'), '>9.1%')} {r['estimate_gib']:>8.2f} "
            f"{_fmt(r['measured_peak_gib'], '>8.2f')}"
        )
    print(f"\n{'input pipeline':<44} {'workers':>7} {'batch':>5} {'img/s':>9}")
    for r in report["input"]:
        print(f"{r['pipeline']:<44} {r['workers']:>7} {r['batch']:>5} {r['images_per_s']:>9.1f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke run (CI)")
    parser.add_argument("--variants", default="B/16,L/16", help="pretraining image towers")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; small 2)")
    parser.add_argument("--peak_flops", type=float, default=None, help="datasheet FLOP/s/device")
    parser.add_argument("--max_batch_per_device", type=int, default=None)
    parser.add_argument("--memory_fraction", type=float, default=0.9)
    parser.add_argument("--input_workers", type=int, default=None, help="default: host cores")
    parser.add_argument("--skip", default="", help="sections to leave out: detect,input")
    parser.add_argument("--json", default="accelerator_check.json")
    args = parser.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    if args.steps is None:
        args.steps = 2 if args.small else 10
    if args.max_batch_per_device is None:
        args.max_batch_per_device = 2 if args.small else (8 if on_cpu else 256)
    if args.input_workers is None:
        args.input_workers = 1 if args.small else max(1, os.cpu_count() or 1)
    skip = {s for s in args.skip.split(",") if s}
    if not 0 < args.memory_fraction <= 1 or args.steps < 1 or args.max_batch_per_device < 1:
        parser.error("need 0 < --memory_fraction <= 1, --steps >= 1, --max_batch_per_device >= 1")
    if skip - {"detect", "input"}:
        parser.error(f"--skip: unknown sections {sorted(skip - {'detect', 'input'})}")

    # On a pod slice or a SLURM job every host runs this command; they join one runtime (see
    # rovit_jax.train.distributed) and process 0 reports.
    distributed.initialize()
    try:  # the input pipeline may load TensorFlow: keep it off the accelerators' memory
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except ImportError:
        pass
    device = device_info()
    budget = args.memory_fraction * device["memory_bytes"]
    n = 256 if args.small else (2048 if on_cpu else 8192)
    matmul = {"n": n}
    for name in ("bfloat16", "float32"):
        matmul[name] = mfu.matmul_flops_per_second(n, dtype=getattr(jnp, name))
    peaks = {"measured": {k: matmul[k] for k in ("bfloat16", "float32")}}
    if args.peak_flops:
        peaks["datasheet"] = {"bfloat16": args.peak_flops, "float32": args.peak_flops}
    print(f"device and matmul measured; budget {budget / GIB:.1f} GiB per device", flush=True)

    variants = ["tiny"] if args.small else [v for v in args.variants.split(",") if v]
    steps = []
    for variant in variants:  # smallest first: the measured peak is the process's so far
        steps.append(pretrain_case(variant, args, peaks, budget))
        print(f"  timed {steps[-1]['case']}", flush=True)
    if "detect" not in skip:
        steps.append(detect_case(args, peaks, budget))
        print(f"  timed {steps[-1]['case']}", flush=True)
    rows = [] if "input" in skip else input_rates(args)
    report = dict(
        command=" ".join(
            [os.path.basename(__file__), *(argv if argv is not None else sys.argv[1:])]
        ),
        device=device,
        matmul=matmul,
        peak_flops=args.peak_flops,
        memory_fraction=args.memory_fraction,
        steps=steps,
        input=rows,
    )
    if jax.process_index() != 0:
        return report
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
