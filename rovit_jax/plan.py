r"""Memory and FLOPs plan of a config's train step, compiled ahead of time for a device mesh.

Before launching on a TPU pod slice or a GPU cluster: does this config fit? The train step is
lowered and compiled for the config's mesh (`mesh`, `sharding_rules`, `logical_axis_rules`: see
rovit_jax.train.layouts) on `--devices` simulated host devices, so XLA's SPMD partitioner produces
the per-device program a real run would execute, and its memory and cost analyses are printed:

  python -m rovit_jax.plan --devices=256 \
      --config=configs/vit_b16_224_pretrain.py:variant=L/16,batch=16384,layout=fsdp,remat=full \
      --config.compute_dtype=bfloat16 --json=plan.json

  python -m rovit_jax.plan --devices=256 \
      --config=configs/lvis_detect.py:variant=L/16,layout=fsdp,remat=full \
      --config.eval.batch_size=256

No dataset, tokenizer file or checkpoint is read: pretraining skips its data checks and a
detection config is planned from its pretraining config (`config.pretrain`, or
`--pretrain_config`) with zero text embeddings for the training vocabulary (see
`DetectTask.for_planning`). Any config field can be overridden as with rovit_jax.main
(`--config.remat=full`).

The figures, all per device:
  parameters, optimizer state  the bytes of each leaf's shard under the state's shardings
                   (computed from the shapes and `state_shardings`, not by the compiler)
  arguments        buffers passed into the step: the train state's shards and the batch shard
  outputs          buffers the step returns: the new state's shards and the metrics
  aliased          outputs written into donated argument buffers (the state is donated, so the
                   new state reuses the old one's memory); counted once, not twice
  temp             everything else the step allocates: activations kept for the backward pass,
                   gathered parameters (FSDP), gradients before the update and workspace
  generated code   the compiled program itself (reported, not in the total)
  peak estimate    arguments + outputs - aliased + temp
  FLOPs            per step per device, from XLA's cost analysis of the compiled program
                   (includes rematerialised recomputation); and the analytic model FLOPs
                   6 x parameters x tokens of the transformer matmuls, for the whole global batch
The verdict compares the peak estimate with `--device_memory_gib` (default 32).

Caveats. With `--devices` the program is compiled by the XLA CPU compiler: accelerator
compilers fuse, lay out and schedule differently (and reserve memory of their own), so treat
the figures as estimates, not guarantees. `--devices` also tells the CPU compiler to schedule
for memory (`--xla_cpu_enable_concurrency_optimized_scheduler=false`, as accelerator compilers
do); its default schedule for thread parallelism keeps more buffers alive and hides what remat
saves. Even so, its schedule keeps more per-layer activations alive than full remat needs, so
temp memory tends to be overestimated. XLA's cost analysis counts the body of a loop once, so
with `scan_layers` the FLOPs per device count one block per tower instead of all of them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rovit_jax import paths  # noqa: E402

GIB = 2**30
# The CPU compiler's default schedule favours thread parallelism over memory (see the docstring).
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


# ---- devices ------------------------------------------------------------------------------------
def use_host_devices(num_devices: int | None) -> None:
    """Prepares XLA for planning: `num_devices` simulated CPU devices and a memory-minded schedule.

    Must run before JAX initialises its backends (it sets XLA_FLAGS and JAX_PLATFORMS). With
    `num_devices=None` nothing changes: the plan uses the devices JAX finds (e.g. real
    accelerators), with their compiler's own settings.

    Raises:
      ValueError: `num_devices` < 1.
      RuntimeError: JAX is already initialised with another device count or platform.
    """
    if num_devices is not None and int(num_devices) < 1:
        raise ValueError(f"--devices must be >= 1, got {num_devices}")
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            import jax

            have, platform = jax.device_count(), jax.default_backend()
            if num_devices is not None and (have != int(num_devices) or platform != "cpu"):
                raise RuntimeError(
                    f"--devices={num_devices}: JAX is already initialised with {have} {platform} "
                    "device(s); the simulated device count can only be set before JAX starts "
                    "(run `python -m rovit_jax.plan` in a fresh process)"
                )
            return
    if num_devices is None:
        return
    keep = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith((MEMORY_SCHEDULER_FLAG.split("=")[0], _DEVICE_COUNT_FLAG))
    ]
    keep += [MEMORY_SCHEDULER_FLAG, f"{_DEVICE_COUNT_FLAG}={int(num_devices)}"]
    os.environ["XLA_FLAGS"] = " ".join(keep)
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported but not initialised: the option is read at start-up
        import jax

        jax.config.update("jax_platforms", "cpu")


# ---- the report ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """Per-device memory and FLOPs of one compiled train step (bytes, FLOPs, seconds)."""

    task: str
    mesh: dict[str, int]
    platform: str
    global_batch: int
    per_device_batch: int
    compute_dtype: str
    remat: str
    scan_layers: bool
    param_count: int
    param_count_by_group: dict[str, int]
    param_bytes: int  # whole model, float32 as stored
    param_bytes_per_device: int
    opt_bytes: int
    opt_bytes_per_device: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    flops_per_device: float  # XLA cost analysis, one step
    model_flops: float  # analytic, one step of the global batch
    model_flops_formula: str
    lower_seconds: float  # tracing and lowering to StableHLO
    compile_seconds: float  # XLA: SPMD partitioning, optimisation, code generation
    device_memory_gib: float
    versions: dict[str, str]

    @property
    def num_devices(self) -> int:
        n = 1
        for size in self.mesh.values():
            n *= size
        return n

    @property
    def peak_bytes(self) -> int:
        """arguments + outputs - aliased + temp: the step's live memory on one device."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def fits(self, device_memory_gib: float | None = None) -> bool:
        budget = self.device_memory_gib if device_memory_gib is None else device_memory_gib
        return self.peak_bytes <= budget * GIB

    def verdict(self, device_memory_gib: float | None = None) -> str:
        budget = self.device_memory_gib if device_memory_gib is None else device_memory_gib
        peak = f"peak estimate {gib(self.peak_bytes)}"
        if self.fits(budget):
            return f"fits in {budget:g} GiB per device ({peak}, {self.peak_bytes / (budget * GIB):.0%})"
        return f"does NOT fit in {budget:g} GiB per device ({peak})"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            num_devices=self.num_devices,
            peak_bytes=self.peak_bytes,
            fits=self.fits(),
            verdict=self.verdict(),
        )
        return out

    def format(self) -> str:
        """The human-readable report (sizes in GiB with 2 decimals)."""
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        groups = ", ".join(f"{k} {_count(v)}" for k, v in self.param_count_by_group.items())
        model_per_device = self.model_flops / self.num_devices
        share = model_per_device / self.flops_per_device if self.flops_per_device else float("nan")
        lines = [
            f"task               {self.task}",
            f"mesh               {mesh} ({self.num_devices} {self.platform} devices)",
            f"batch              {self.global_batch} global, {self.per_device_batch} per device",
            f"compute            {self.compute_dtype}, remat={self.remat}, "
            f"scan_layers={self.scan_layers}",
            f"parameters         {_count(self.param_count)} ({groups}), "
            f"{gib(self.param_bytes)} float32",
            "per device:",
            f"  parameters       {gib(self.param_bytes_per_device)}   (shards of the state)",
            f"  optimizer state  {gib(self.opt_bytes_per_device)}   (shards of the state)",
            f"  arguments        {gib(self.argument_bytes)}   (state + batch shard)",
            f"  outputs          {gib(self.output_bytes)}   (new state + metrics)",
            f"  aliased          {gib(self.alias_bytes)}   (outputs in donated buffers)",
            f"  temp             {gib(self.temp_bytes)}   (activations and workspace)",
            f"  generated code   {gib(self.generated_code_bytes)}",
            f"  peak estimate    {gib(self.peak_bytes)}   (arguments + outputs - aliased + temp)",
            f"FLOPs per step     {_flops(self.flops_per_device)} per device (XLA cost analysis), "
            f"{_flops(self.flops_per_device * self.num_devices)} on all devices",
            f"model FLOPs        {_flops(self.model_flops)} per step = {self.model_flops_formula}"
            f"; {_flops(model_per_device)} per device = {share:.0%} of XLA's count",
            f"compile time       {self.compile_seconds:.1f} s (+ {self.lower_seconds:.1f} s lowering)",
            f"verdict            {self.verdict()}",
        ]
        return "\n".join(lines)


def gib(num_bytes: float) -> str:
    """GiB with 2 decimals; below 1 GiB the MiB too, so small shards do not read as zero."""
    text = f"{num_bytes / GIB:.2f} GiB"
    return text if num_bytes >= GIB else f"{text} ({num_bytes / 2**20:.1f} MiB)"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x / 1e6:.2f} MFLOP"


# ---- analytic sizes -----------------------------------------------------------------------------
def shard_bytes(abstract_tree: Any, shardings: Any) -> tuple[int, int]:
    """(total bytes, bytes of one device's shards) of a tree of arrays and their shardings.

    Each leaf contributes its full size to the total and the size of `sharding.shard_shape`
    (the block one device holds) to the per-device figure. Replicated leaves count fully on
    every device.
    """
    import jax
    import numpy as np

    total = per_device = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        itemsize = np.dtype(leaf.dtype).itemsize
        total += int(np.prod(leaf.shape, dtype=np.int64)) * itemsize
        per_device += int(np.prod(sharding.shard_shape(leaf.shape), dtype=np.int64)) * itemsize
    return total, per_device


def _group(task: str, path: str) -> str:
    top = path.split("/", 1)[0]
    if task == "pretrain":
        return {"img": "image", "img_proj": "image", "txt": "text", "txt_proj": "text"}.get(
            top, "other"
        )
    return "backbone" if top == "backbone" else "heads"


def param_counts(task: str, params: Any) -> tuple[int, dict[str, int]]:
    """Total parameter count and counts per tower (pretraining) or backbone / heads (detection)."""
    import jax

    from rovit_jax.train.mesh import tree_paths

    order = ("image", "text", "other") if task == "pretrain" else ("backbone", "heads")
    groups = dict.fromkeys(order, 0)
    for path, leaf in zip(tree_paths(params), jax.tree.leaves(params)):
        key = _group(task, path)
        groups[key] = groups.get(key, 0) + int(leaf.size)
    return sum(groups.values()), groups


def matmul_params(params: Any, tower: str) -> int:
    """Weights applied to every token of `tower`: kernels of its transformer blocks and patch
    embedding (embedding tables, position embeddings, norms, biases and heads excluded)."""
    import jax

    from rovit_jax.train.mesh import tree_paths

    rx = re.compile(rf"^{tower}/(Transformer/encoderblock[^/]*/.*kernel|embedding/kernel)$")
    return sum(
        int(leaf.size)
        for path, leaf in zip(tree_paths(params), jax.tree.leaves(params))
        if rx.match(path)
    )


def model_flops(config: Any, params: Any, pretrain_config: Any = None) -> tuple[float, str]:
    """Analytic training FLOPs of one global step: 6 x matmul parameters x tokens (forward 2,
    backward 4), attention scores (QK^T, AV) not included. Returns (FLOPs, formula)."""
    from rovit_jax.config_sections import resolved_sections
    from rovit_jax.detection.settings import DetSettings
    from rovit_jax.models.vit import vit_variant
    from rovit_jax.pretrain_settings import pretrain_settings

    b = int(config.batch_size)
    if config.task == "pretrain":
        pretrained = pretrain_settings(config)
        image = pretrained["model.image"]
        patch = vit_variant(image.variant)["patch_size"]
        img_tokens = (pretrained["pp"].image_size // patch) ** 2
        if image.pool_type == "tok":
            img_tokens += 1
        txt_tokens = pretrained["tokenizer"].max_len
        n_img, n_txt = matmul_params(params, "img"), matmul_params(params, "txt")
        flops = 6.0 * b * (img_tokens * n_img + txt_tokens * n_txt)
        formula = (
            f"6 x {b} x ({img_tokens} image tokens x {_count(n_img)} + {txt_tokens} text tokens "
            f"x {_count(n_txt)} matmul params)"
        )
        return flops, formula
    patch = vit_variant(pretrain_settings(pretrain_config)["model.image"].variant)["patch_size"]
    tokens = (resolved_sections((DetSettings,), config)["det"].image_size // patch) ** 2
    n = matmul_params(params, "backbone")
    formula = f"6 x {b} x {tokens} tokens x {_count(n)} backbone matmul params (heads excluded)"
    return 6.0 * b * tokens * n, formula


# ---- the planning task --------------------------------------------------------------------------
def default_num_classes(config: Any) -> int:
    """Size of the training vocabulary: the dataset's categories outside its novel groups."""
    from rovit_jax.config_sections import resolved_sections
    from rovit_jax.data.settings import DetectionDataSettings

    data = resolved_sections((DetectionDataSettings,), config)["data"]
    name, novel = data.name, set(data.novel_frequencies)
    if name == "shapes_world":
        from rovit_jax.data.shapes_world import CATEGORIES

        return sum(c.frequency not in novel for c in CATEGORIES)
    from rovit_jax.data import vocabularies

    vocab = {"tfds_coco": "coco"}.get(name, name)
    if vocab not in vocabularies.VOCABULARY_NAMES:
        raise ValueError(
            f"config key `data.name` = {name!r}: no built-in vocabulary; pass --num_classes"
        )
    return len(vocabularies.vocabulary(vocab).base_ids(tuple(novel)))


def planning_task(config: Any, pretrain_config: Any = None, num_classes: int | None = None):
    """The config's task, built to be compiled only: no data, tokenizer or checkpoint is read."""
    if config.task == "pretrain":
        from rovit_jax.tasks.pretrain import PretrainTask

        return PretrainTask(config, check_files=False)
    if config.task == "detect":
        from rovit_jax.tasks.detect import DetectTask

        pcfg = pretrain_config if pretrain_config is not None else config.get("pretrain")
        if not pcfg:
            raise ValueError(
                "config key `pretrain` is empty: pass the backbone's pretraining config, e.g. "
                "--pretrain_config=configs/vit_b16_224_pretrain.py:variant=L/16"
            )
        n = default_num_classes(config) if num_classes is None else int(num_classes)
        return DetectTask.for_planning(config, pcfg, n)
    raise ValueError(f"config key `task` = {config.task!r}: choose 'pretrain' or 'detect'")


def plan(
    config: Any,
    *,
    device_memory_gib: float = 32.0,
    pretrain_config: Any = None,
    num_classes: int | None = None,
    devices: Any = None,
) -> Plan:
    """Compiles the config's train step for its mesh and measures it (see the module docstring).

    Uses JAX's devices as they are: for simulated devices with the memory-minded CPU schedule,
    call `use_host_devices` before JAX starts (the command line does).

    Args:
      config: a pretraining or detection config (its `mesh` must fit the devices).
      device_memory_gib: memory per device for the verdict.
      pretrain_config: detection only: the backbone's pretraining config (default
        `config.pretrain`).
      num_classes: detection only: training vocabulary size (default: the dataset's base
        categories, e.g. 866 for LVIS v1).
      devices: devices of the mesh (default: all of JAX's devices).
    """
    import flax
    import jax

    from rovit_jax.train import mesh as mesh_lib
    from rovit_jax.train.trainer import Trainer

    mesh = mesh_lib.make_mesh([tuple(a) for a in config.mesh], devices)
    task = planning_task(config, pretrain_config, num_classes)
    task.validate(mesh)
    trainer = Trainer(config, task, mesh)
    state, shardings = trainer.abstract_state, trainer.state_shardings
    param_bytes, param_bytes_dev = shard_bytes(state["params"], shardings["params"])
    opt_bytes, opt_bytes_dev = shard_bytes(state["opt_state"], shardings["opt_state"])
    count, groups = param_counts(config.task, state["params"])
    pcfg = task.pretrained.config if config.task == "detect" else None
    flops_model, formula = model_flops(config, state["params"], pcfg)

    start = time.perf_counter()
    lowered = trainer.lower()
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    if memory is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return Plan(
        task=str(config.task),
        mesh={str(k): int(v) for k, v in mesh.shape.items()},
        platform=jax.default_backend(),
        global_batch=int(config.batch_size),
        per_device_batch=int(config.batch_size) // mesh_lib.num_batch_shards(mesh),
        compute_dtype=str(config.compute_dtype),
        remat=str(config.remat),
        scan_layers=bool(config.get("scan_layers", False)),
        param_count=count,
        param_count_by_group=groups,
        param_bytes=param_bytes,
        param_bytes_per_device=param_bytes_dev,
        opt_bytes=opt_bytes,
        opt_bytes_per_device=opt_bytes_dev,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        generated_code_bytes=int(memory.generated_code_size_in_bytes),
        flops_per_device=float((cost or {}).get("flops", float("nan"))),
        model_flops=flops_model,
        model_flops_formula=formula,
        lower_seconds=lower_seconds,
        compile_seconds=compile_seconds,
        device_memory_gib=float(device_memory_gib),
        versions={"jax": jax.__version__, "flax": flax.__version__},
    )


# ---- command line -------------------------------------------------------------------------------
def define_flags() -> None:
    """The command's flags (defined only when run as a program, so importing this defines none)."""
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (get_config(arg)).", lock_config=False
    )
    config_flags.DEFINE_config_file(
        "pretrain_config",
        None,
        "Detection only: the backbone's pretraining config (default: the config's `pretrain`).",
        lock_config=False,
    )
    flags.DEFINE_integer(
        "devices", None, "Simulate this many host CPU devices (default: the devices JAX finds)."
    )
    flags.DEFINE_float(
        "device_memory_gib", 32.0, "Memory per device the verdict is judged against."
    )
    flags.DEFINE_string("json", None, "Also write the plan to this JSON file.")
    flags.DEFINE_integer(
        "num_classes",
        None,
        "Detection only: training vocabulary size (default: the dataset's base categories).",
    )


def main(argv):
    del argv
    fl = flags.FLAGS
    if fl.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/shapes_pretrain.py:tiny")
    use_host_devices(fl.devices)
    import jax

    if fl.devices is not None and jax.device_count() != fl.devices:
        raise RuntimeError(
            f"--devices={fl.devices}, but JAX sees {jax.device_count()} device(s): XLA_FLAGS "
            f"must set {_DEVICE_COUNT_FLAG} before JAX starts"
        )
    result = plan(
        fl.config,
        device_memory_gib=fl.device_memory_gib,
        pretrain_config=fl.pretrain_config,
        num_classes=fl.num_classes,
    )
    command = "python -m rovit_jax.plan " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    print(f"[rovit_jax.plan] {command}\n{versions}\n{result.format()}", flush=True)
    if fl.json:
        paths.write_json(fl.json, dict(result.to_dict(), command=command), indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
