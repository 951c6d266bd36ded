r"""Detection benchmark: train-step time, achieved FLOP/s and inference images/s.

  python benchmarks/detect_step.py                    # shapes config and ViT-B/16 at 1024 px
  python benchmarks/detect_step.py --only=shapes
  python benchmarks/detect_step.py --only=shapes --profile   # + where the step's time goes

Towers and vocabulary are randomly initialised (speed does not depend on their values), so no
pretraining run or dataset is needed. The LVIS-style evaluation timing (faster-coco-eval against
the official `lvis` package on 2,000 generated images) is `benchmarks/detection_eval.py`.

FLOPs of the train step are counted two ways: "XLA" is the compiled step's own count (cost
analysis; it includes element-wise work and counts a loop body once), "dot" counts only the
matmuls and convolutions of the step's jaxpr (2 x multiply-adds, from the shapes: forward,
backward and optimizer; RoIAlign's interpolation matmuls excluded, see `dot_flops`): the
model's arithmetic, to compare with a dense-matmul peak. Achieved FLOP/s is "dot" FLOPs / best
step time, reported as a fraction of this machine's dense float32 matmul FLOP/s measured in the
same run (a jitted 2048^3 matmul, best of 10 runs before the steps and of one run after each
timed step, so both see the same load), or of --peak_flops.

--profile traces a few steps with the JAX profiler and splits the summed time of XLA's ops by
where they come from (backbone, pyramid, heads, RoIAlign, NMS, matching...), from the op names
that module scopes and `jax.named_scope` leave in the compiled step. Ops of both XLA threads are
summed, so read the shares, not absolute times.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jax_core  # noqa: E402

from rovit_jax.config_files import load_config  # noqa: E402
from rovit_jax.detection import rcnn  # noqa: E402
from rovit_jax.tasks.detect import DetectTask  # noqa: E402
from rovit_jax.tasks.pretrain import build_model  # noqa: E402
from rovit_jax.train import mesh as mesh_lib  # noqa: E402
from rovit_jax.train.trainer import Trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(file: str, arg: str | None):
    return load_config(f"{file}:{arg}" if arg else file)


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
    pcfg = ml_collections.ConfigDict(pretrain_config.to_dict())
    tt = build_model(pcfg)
    s, length = pcfg.pp.image_size, pcfg.tokenizer.max_len
    params = jax.jit(tt.init)(
        jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, length), jnp.int32)
    )["params"]
    e = pcfg.model.embed_dim
    emb = np.random.default_rng(0).normal(size=(num_classes, e)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    vocab = dict(embeddings=emb, valid=np.ones(num_classes, bool))
    return DetectTask(
        config,
        "",
        check_files=False,  # recipe configs name data files not here
        pretrained=(pcfg, params),
        base_vocabulary=dict(vocab, category_map={}),
        full_vocabulary=dict(vocab, is_novel=np.zeros(num_classes, bool)),
    )


def synthetic_batch(task: DetectTask, rng) -> dict[str, np.ndarray]:
    """A training batch of `task`'s shapes: random images, up to 8 random boxes per image."""
    shapes = task.batch_shapes()
    out = {}
    for k, sds in shapes.items():
        out[k] = np.zeros(sds.shape, sds.dtype)
    b, m = shapes["boxes"].shape[:2]
    s = task.rcnn.image_size
    y0 = rng.uniform(0, 0.6 * s, (b, m, 2))
    out["boxes"] = np.concatenate([y0, y0 + rng.uniform(0.05 * s, 0.4 * s, (b, m, 2))], -1)
    out["boxes"] = out["boxes"].astype(np.float32)
    out["valid"][:, : min(m, 8)] = True
    out["classes"] = np.where(out["valid"], rng.integers(0, 16, (b, m)), -1).astype(np.int32)
    out["image"] = rng.uniform(-1, 1, out["image"].shape).astype(np.float32)
    return out


class MatmulReference:
    """Dense float32 [n, n] x [n, n] FLOP/s of the default device, best of all `sample()` calls.

    Sampled between the timed steps too, so that on a shared machine the reference and the step
    see the same load.
    """

    def __init__(self, n: int = 2048):
        self.n = n
        self.a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
        self.f = jax.jit(lambda x: x @ x)
        self.f(self.a).block_until_ready()
        self.times: list[float] = []

    def sample(self, repeats: int = 1) -> None:
        for _ in range(repeats):
            t = time.perf_counter()
            self.f(self.a).block_until_ready()
            self.times.append(time.perf_counter() - t)

    @property
    def flops_per_second(self) -> float:
        return 2 * self.n**3 / min(self.times)


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float((cost or {}).get("flops", float("nan")))


def _sub_jaxprs(value):
    if isinstance(value, jax_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def dot_flops(jaxpr, skip_scopes: tuple[str, ...] = ("roi_align",)) -> float:
    """2 x multiply-adds of every dot_general and convolution in a jaxpr (recursively).

    A scan body counts `length` times, a cond its most expensive branch, a while body once.
    Equations under a `jax.named_scope` in `skip_scopes` are not counted: RoIAlign's matmul
    form (ops/roi_align.py) interpolates with matmuls, which are not the model's arithmetic.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        stack = str(eqn.source_info.name_stack)
        if any(re.search(rf"(^|[(/]){s}($|[)/])", stack) for s in skip_scopes):
            continue
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
            per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
        else:
            subs = [dot_flops(j, skip_scopes) for v in eqn.params.values() for j in _sub_jaxprs(v)]
            if name == "cond":
                total += max(subs, default=0.0)
            else:
                total += sum(subs) * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


# --profile: (category, regular expression on the op name), first match wins.
PROFILE_CATEGORIES = (
    ("backbone attention", r"backbone/.*MultiHeadDotProductAttention"),
    ("backbone (rest)", r"backbone/"),
    ("pyramid (FPN)", r"/fpn/"),
    ("RPN head", r"rpn_outputs|/rpn/"),
    ("RoIAlign", r"roi_align"),
    ("box head + classifier", r"box_outputs|class_logits|box_head/"),
    ("mask head", r"mask_outputs|mask_head/"),
    ("NMS", r"[(/]nms[)/]"),
    ("matching + sampling", r"match_boxes|sample_balanced"),
    ("optimizer + guards", r"^jit\(_train_step\)/(?!.*(jvp|transpose)\()"),
)


def _op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> op_name metadata.

    An instruction without one (e.g. a convolution's weight gradient) takes its fused ops' last
    op_name, else that of its operands, last operand first (the incoming gradient).
    """
    computation_ops: dict[str, list[str]] = collections.defaultdict(list)
    own, calls, operands, current = {}, {}, {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)", line)
        if not m:
            continue
        name, rest = m.groups()
        op = re.search(r'op_name="([^"]*)"', rest)
        call = re.search(r"calls=%([\w.\-]+)", rest)
        if op:
            computation_ops[current].append(op.group(1))
            own[name] = op.group(1)
        if call:
            calls[name] = call.group(1)
        args = re.search(r"\((.*?)\)", rest.split(" ", 1)[-1])
        operands[name] = re.findall(r"%([\w.\-]+)", args.group(1)) if args else []

    def find(name: str, depth: int) -> str | None:
        if name in own:
            return own[name]
        ops = computation_ops.get(calls.get(name, ""))
        if ops:
            return ops[-1]
        if depth > 0:
            for operand in reversed(operands.get(name, [])):
                found = find(operand, depth - 1)
                if found:
                    return found
        return None

    names = {n: find(n, 3) for n in operands}
    return {n: v for n, v in names.items() if v}


def profile_step(compiled, run_step, steps: int = 3) -> list[tuple[str, float]]:
    """[(category, share of summed op time)] of `steps` traced calls of `run_step`."""
    names = _op_names(compiled.as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(run_step())
        (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("name") not in names:
            continue
        op = names[e["name"]]
        category = next((c for c, pat in PROFILE_CATEGORIES if re.search(pat, op)), "other")
        totals[category] += e.get("dur", 0)
    total = sum(totals.values()) or 1
    return [(c, v / total) for c, v in totals.most_common()]


def _time(fn, steps: int, reference: MatmulReference | None = None) -> list[float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
        if reference is not None:
            reference.sample()
    return times


def bench(
    name, config, pretrain_config, steps: int, reference: MatmulReference, profile: bool = False
) -> dict:
    task = random_task(config, pretrain_config, 1203 if name != "shapes" else 34)
    mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 1)])
    task.validate(mesh)
    trainer = Trainer(config, task, mesh)
    t = time.perf_counter()
    compiled = trainer.compile_step()
    compile_s = time.perf_counter() - t
    state = trainer.init_state()
    batch = trainer.global_batch(synthetic_batch(task, np.random.default_rng(0)))
    xla_flops = _xla_flops(compiled)
    step_jaxpr = jax.make_jaxpr(trainer.train_step)(state, batch)
    model_flops = dot_flops(step_jaxpr.jaxpr)
    state, m = compiled(state, batch)
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    step_times = _time(step, steps, reference)
    shares = profile_step(compiled, step) if profile else []
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
            vlm_region_embeddings_fn=lambda x, bx: task.frozen_vlm.region_embeddings(
                task.pretrained.params, x, bx
            ),
            vlm_logit_scale=jnp.exp(task.pretrained.params["t"]),
        )
    )
    params = holder["state"]["params"]
    jax.block_until_ready(predict(params, images))
    infer_s = statistics.median(_time(lambda: predict(params, images), steps))
    return dict(
        case=name,
        batch=config.batch_size,
        px=config.det.image_size,
        compile_s=compile_s,
        step_s=statistics.median(step_times),
        best_step_s=min(step_times),
        train_img_s=config.batch_size / statistics.median(step_times),
        infer_img_s=images.shape[0] / infer_s,
        xla_gflop=xla_flops / 1e9,
        dot_gflop=model_flops / 1e9,
        gflop_s=model_flops / min(step_times) / 1e9,
        profile=shares,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["shapes", "vit_b16_1024"], default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak_flops", type=float, default=None, help="default: measured")
    parser.add_argument("--profile", action="store_true", help="split the step's time by part")
    args = parser.parse_args()
    all_cases = cases()
    print(f"devices: {jax.devices()}")
    reference = MatmulReference()
    reference.sample(10)
    print(
        f"{'case':<14} {'batch':>5} {'px':>5} {'compile s':>9} {'step s':>8} {'best s':>7} "
        f"{'train img/s':>11} {'infer img/s':>11} {'XLA GFLOP':>9} {'dot GFLOP':>9} "
        f"{'GFLOP/s':>8} {'matmul GFLOP/s':>14} {'of matmul':>9}"
    )
    for name in [args.only] if args.only else list(all_cases):
        r = bench(name, *all_cases[name], args.steps, reference, args.profile)
        peak = args.peak_flops or reference.flops_per_second
        print(
            f"{r['case']:<14} {r['batch']:>5} {r['px']:>5} {r['compile_s']:>9.1f} "
            f"{r['step_s']:>8.3f} {r['best_step_s']:>7.3f} {r['train_img_s']:>11.2f} "
            f"{r['infer_img_s']:>11.2f} {r['xla_gflop']:>9.2f} {r['dot_gflop']:>9.2f} "
            f"{r['gflop_s']:>8.1f} {peak / 1e9:>14.1f} {r['gflop_s'] * 1e9 / peak:>9.1%}",
            flush=True,
        )
        for category, share in r["profile"]:
            print(f"    {category:<24} {share:>6.1%} of op time", flush=True)
    print(
        "step s: median; GFLOP/s: dot GFLOP / best step; matmul GFLOP/s: "
        + ("--peak_flops" if args.peak_flops else "best f32 2048^3 matmul, sampled between steps")
    )


if __name__ == "__main__":
    main()
