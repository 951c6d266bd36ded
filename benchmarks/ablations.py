r"""The paper's ablations in miniature, on the shapes world, from scratch, in one command.

  python benchmarks/ablations.py --out benchmarks/results/ablations          # full: <= 90 min, 2 cores
  python benchmarks/ablations.py --out /tmp/abl --mode small --seeds 0       # seconds-long smoke run

What it runs (every run a normal `rovit_jax.train.loop.run` of the project's shapes configs):
  1. pretraining with CPE {on, off} x loss {focal, sigmoid, softmax}, for each seed;
  2. detection finetuning of every pretrained backbone twice: backbone FROZEN (the paper's probe of
     pretraining quality; the backbone's backward pass is not even computed) and backbone trained
     at 0.1x the learning rate (the recipe);
  3. binary objectness instead of centerness on the backbone variant with the best mean finetuned
     detector-only AP_r (the centerness runs are those of step 2).
Then it writes, into --out: `ablations.json` (every run's metrics, the per-variant mean and
standard deviation over seeds, paired per-seed deltas with a t-test, the command line, seeds,
budgets, library versions, worker time per stage and the wall time of every invocation),
`ablations.md` (the tables) and `ablations.png` (AP_r per variant with error bars, with and
without VLM score fusion).

Seeds: seed s pretrains with seed s and finetunes that backbone with seed s, so a variant's
spread covers both stages. Runs are scheduled on `--workers` processes with one XLA thread each
(on 2 cores two small runs side by side beat one run on two threads); a finished run keeps a
`result.json` (with the budget it was made with) in its workdir, so an interrupted sweep
resumes where it stopped, and a run made under another budget is refused, not reused.

The miniature (the choices, and why they keep the paper's question meaningful):
  - Pretraining sees whole 128 px scenes resized to 64 px (an 8x8 grid of 8 px patches); CPE
    crops from the position embedding upsampled to the 32x32 grid of detection (the paper's
    14x14 -> 64x64 at 224 -> 1024 px). Detection runs at 256 px, where every object is a region of
    a larger image than pretraining ever saw; the PE is interpolated to that grid in both the CPE
    and the no-CPE variants.
  - Novel categories are the world's 8 rare shapes (a category is a silhouette; each object's
    colour is random and never named): named in pretraining captions, held out of detection
    training, evaluated with LVIS's protocol (AP_r = AP on them).
  - Boxes only (no mask head) and a narrow detector (FPN 128 channels, 2 head convs of 64,
    32 sampled RoIs and 64 anchors per image) trained 160 steps of 4 images at lr 1e-3, to afford
    3 seeds of every variant; evaluation scores 80 test images once for both the fused and the
    detector-only variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

LOSSES = ("focal", "sigmoid", "softmax")
CPE = (True, False)
MODES = ("frozen", "finetune")
OBJECTNESS = ("centerness", "binary")

# Budgets per sweep mode; everything else is configs/shapes_pretrain.py and shapes_detect.py.
BUDGETS: dict[str, dict[str, Any]] = {
    # About 86 min on 2 cores (measured: the 18 pretraining runs 57.7 worker-minutes, so ~29 min
    # on 2 workers; the 39 detection runs 56.8 min of wall time; see results/ablations).
    "full": dict(
        pretrain_steps=300,
        detect_steps=160,
        detect_warmup=20,
        detect_lr=1e-3,
        eval_images=80,
        tiny=False,
    ),
    "small": dict(
        pretrain_steps=6, detect_steps=3, detect_warmup=1, detect_lr=1e-3, eval_images=8, tiny=True
    ),
}
# Backbone learning rate as a fraction of the detector's in "finetune" mode (paper: 0.1).
FINETUNE_BACKBONE_LR = 0.1


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the sweep."""

    name: str  # also its workdir under <out>/runs/
    kind: str  # "pretrain" | "detect"
    cpe: bool
    loss: str
    seed: int
    mode: str = ""  # detect: "frozen" | "finetune"
    objectness: str = ""  # detect: "centerness" | "binary"

    @property
    def variant(self) -> str:
        return f"{'cpe' if self.cpe else 'nocpe'}-{self.loss}"

    @property
    def pretrain_name(self) -> str:
        return f"pretrain/{self.variant}/seed{self.seed}"


def pretrain_run(cpe: bool, loss: str, seed: int) -> Run:
    return Run(
        f"pretrain/{'cpe' if cpe else 'nocpe'}-{loss}/seed{seed}", "pretrain", cpe, loss, seed
    )


def detect_run(cpe: bool, loss: str, seed: int, mode: str, objectness: str = "centerness") -> Run:
    variant = f"{'cpe' if cpe else 'nocpe'}-{loss}"
    name = f"detect/{variant}/{mode}-{objectness}/seed{seed}"
    return Run(name, "detect", cpe, loss, seed, mode, objectness)


def build_config(run: Run, budget: dict[str, Any], out: str, data_dir: str | None):
    """The ml_collections config of `run` (shapes configs + the sweep's budget)."""
    from rovit_jax.config_files import load_config

    tiny = ",tiny" if budget["tiny"] else ""
    if run.kind == "pretrain":
        c = load_config(
            "shapes_pretrain:"
            f"steps={budget['pretrain_steps']},loss={run.loss},cpe={run.cpe},seed={run.seed}{tiny}"
        )
        c.total_steps = int(budget["pretrain_steps"])
        c.checkpoint_every = c.total_steps
        c.keep_checkpoints = 1
    else:
        c = load_config(
            "shapes_detect:"
            f"steps={budget['detect_steps']},objectness={run.objectness},seed={run.seed}{tiny}"
        )
        c.total_steps = int(budget["detect_steps"])
        c.checkpoint_every = c.total_steps
        c.keep_checkpoints = 1
        c.init.run_pretraining = False
        c.init.pretrain_workdir = os.path.join(out, "runs", run.pretrain_name)
        c.data.with_masks = False
        c.optim.warmup_steps = int(budget["detect_warmup"])
        c.optim.lr = float(budget["detect_lr"])
        # A cheaper detector than shapes_detect.py (2.5x faster steps on a CPU): the scenes hold
        # at most 6 objects, so 32 sampled RoIs (8 positive) and 64 anchors per image still
        # cover them, and 2 head convs instead of 4.
        c.roi.batch_per_image = min(int(c.roi.batch_per_image), 32)
        c.rpn.batch_per_image = min(int(c.rpn.batch_per_image), 64)
        c.head.num_convs = min(int(c.head.num_convs), 2)
        c.eval.num_images = int(budget["eval_images"])
        c.eval.render_images = 0
        # Fewer proposals and detections at evaluation than shapes_detect.py (1000 / 300 / 100):
        # the scenes hold at most 6 objects.
        c.infer.pre_nms_top_k = min(int(c.infer.pre_nms_top_k), 500)
        c.infer.post_nms_top_k = min(int(c.infer.post_nms_top_k), 200)
        c.infer.max_detections = min(int(c.infer.max_detections), 100)
        if run.mode == "frozen":
            c.optim.frozen = ["^backbone/"]
            c.optim.lr_mults = []
        else:
            c.optim.lr_mults = [("^backbone/", FINETUNE_BACKBONE_LR)]
    c.data.data_dir = data_dir
    c.log_every = max(1, c.total_steps // 4)
    c.async_checkpointing = False
    c.prefetch = 1
    return c


def run_budget(run: Run, budget: dict[str, Any]) -> dict[str, Any]:
    """The budget entries `run` depends on (a detection run also on its backbone's)."""
    keys = ["pretrain_steps", "tiny"]
    if run.kind == "detect":
        keys += sorted(k for k in budget if k.startswith("detect_") or k == "eval_images")
    return {k: budget[k] for k in keys}


def _worker_init(cache_dir: str) -> None:
    # One XLA thread and one device per worker process: runs go side by side on the cores.
    import jax
    import tensorflow as tf

    # The evaluation's predict functions take every weight as an argument, so all runs of a
    # stage share their compiled form through the persistent cache.
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def execute(args: tuple[Run, dict[str, Any], str, str | None]) -> dict[str, Any]:
    """Runs one training run (in a worker process) and returns its metrics; resumable."""
    run, budget, out, data_dir = args
    workdir = os.path.join(out, "runs", run.name)
    result_file = os.path.join(workdir, "result.json")
    stage_budget = run_budget(run, budget)
    if os.path.exists(result_file):
        with open(result_file) as f:
            record = json.load(f)
        if record.get("budget") != stage_budget:
            raise ValueError(
                f"{result_file}: made with budget {record.get('budget')}, this sweep's is "
                f"{stage_budget}; delete that run folder (or use another --out) to rerun it"
            )
        return record
    from rovit_jax.tasks import get_task
    from rovit_jax.train.loop import run as train

    config = build_config(run, budget, out, data_dir)
    t0 = time.time()
    result = train(config, workdir, get_task(config, workdir))
    metrics = {k: float(v) for k, v in result["eval"].items()}
    record = dict(
        run=dataclasses.asdict(run),
        budget=stage_budget,
        metrics=metrics,
        seconds=time.time() - t0,
    )
    with open(result_file + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(result_file + ".tmp", result_file)
    print(f"[ablations] {run.name}: {time.time() - t0:.0f} s", flush=True)
    return record


def run_all(
    runs: list[Run], budget, out, data_dir, workers: int, trained: list[str] | None = None
) -> list[dict[str, Any]]:
    """Every run's record, training those without one; appends their names to `trained`."""
    jobs = [(r, budget, out, data_dir) for r in runs]
    if trained is not None:
        trained += [
            r.name
            for r in runs
            if not os.path.exists(os.path.join(out, "runs", r.name, "result.json"))
        ]
    cache_dir = os.path.join(out, "jax_cache")
    if workers <= 1:
        _worker_init(cache_dir)
        return [execute(j) for j in jobs]
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(cache_dir,)) as pool:
        return pool.map(execute, jobs, chunksize=1)


# ---- summary ------------------------------------------------------------------------------------
METRICS = {
    # column -> (stage, metric key in the run's evaluation)
    "AP_r": ("detect", "fused/bbox/APr"),
    "AP_base": ("detect", "fused/bbox/AP_base"),
    "AP_r (det. only)": ("detect", "detector_only/bbox/APr"),
    "AP_base (det. only)": ("detect", "detector_only/bbox/AP_base"),
    "R@1": ("pretrain", "recall@1"),
}


# The paper's comparisons, as (mechanism, (cpe, loss) of the variant, (cpe, loss) of its baseline).
COMPARISONS = (
    ("CPE", (True, "focal"), (False, "focal")),
    ("focal loss", (True, "focal"), (True, "softmax")),
    ("focal vs sigmoid", (True, "focal"), (True, "sigmoid")),
    ("CPE + focal", (True, "focal"), (False, "softmax")),
)


def _label(variant: tuple[bool, str]) -> str:
    return f"{'CPE' if variant[0] else 'no CPE'} + {variant[1]}"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def recall_at_1(metrics: dict[str, float]) -> float:
    """Mean of image->text and text->image recall@1."""
    return 0.5 * (metrics["i2t_recall@1"] + metrics["t2i_recall@1"])


def summarise_pretraining(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pretraining variant: zero-shot retrieval recall@1 (mean/std over seeds), and the
    paired per-seed R@1 differences of each mechanism."""
    by_variant: dict[tuple[bool, str], dict[int, dict[str, float]]] = {}
    for r in records:
        run = r["run"]
        if run["kind"] == "pretrain":
            by_variant.setdefault((run["cpe"], run["loss"]), {})[run["seed"]] = r["metrics"]
    rows = []
    for (cpe, loss), per_seed in sorted(
        by_variant.items(), key=lambda kv: (not kv[0][0], LOSSES.index(kv[0][1]))
    ):
        seeds = sorted(per_seed)
        row = dict(cpe=cpe, loss=loss, seeds=seeds)
        for col, fn in (
            ("R@1", recall_at_1),
            ("i2t R@1", lambda m: m["i2t_recall@1"]),
            ("t2i R@1", lambda m: m["t2i_recall@1"]),
        ):
            vals = [100.0 * fn(per_seed[s]) for s in seeds]
            row[col] = dict(zip(("mean", "std"), mean_std(vals)), values=vals)
        rows.append(row)
    r1 = {
        (c, loss, s): 100.0 * recall_at_1(m)
        for (c, loss), d in by_variant.items()
        for s, m in d.items()
    }
    specs = [("CPE", f"{loss}: CPE vs no CPE", (True, loss), (False, loss)) for loss in LOSSES]
    specs += [(m, f"{_label(a)} vs {_label(b)}", a, b) for m, a, b in COMPARISONS[1:]]
    return dict(rows=rows, deltas=_paired(r1, specs))


def _paired(values: dict[tuple, float], specs) -> list[dict[str, Any]]:
    """Paired per-seed differences values[a + (seed,)] - values[b + (seed,)] for each spec."""
    seeds = sorted({k[-1] for k in values})
    out = []
    for mech, comparison, a, b in specs:
        diffs = [
            values[a + (s,)] - values[b + (s,)]
            for s in seeds
            if a + (s,) in values and b + (s,) in values
        ]
        if not diffs:
            continue
        mean, std = mean_std(diffs)
        out.append(
            dict(
                mechanism=mech,
                comparison=comparison,
                mean=mean,
                std=std,
                values=diffs,
                verdict=verdict(diffs),
            )
        )
    return out


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (variant, mode, objectness): mean/std over seeds of every METRICS column."""
    pre = {
        (r["run"]["cpe"], r["run"]["loss"], r["run"]["seed"]): recall_at_1(r["metrics"])
        for r in records
        if r["run"]["kind"] == "pretrain"
    }
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        run = r["run"]
        if run["kind"] == "detect":
            groups.setdefault((run["cpe"], run["loss"], run["mode"], run["objectness"]), []).append(
                r
            )
    rows = []
    for (cpe, loss, mode, obj), rs in sorted(groups.items(), key=lambda kv: _row_order(*kv[0])):
        row = dict(
            cpe=cpe,
            loss=loss,
            mode=mode,
            objectness=obj,
            seeds=sorted(r["run"]["seed"] for r in rs),
        )
        for col, (stage, key) in METRICS.items():
            if stage == "detect":
                vals = [100.0 * r["metrics"][key] for r in rs]
            else:
                vals = [100.0 * pre[(cpe, loss, r["run"]["seed"])] for r in rs]
            row[col] = dict(zip(("mean", "std"), mean_std(vals)), values=vals)
        rows.append(row)
    return dict(rows=rows)


def _row_order(cpe, loss, mode, obj):
    return (MODES.index(mode), OBJECTNESS.index(obj), not cpe, LOSSES.index(loss))


def variant_label(row: dict[str, Any]) -> str:
    label = _label((row["cpe"], row["loss"]))
    if row["objectness"] != "centerness":
        label += f", {row['objectness']} obj."
    return label


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    cols = list(METRICS)
    lines = [
        "# Ablations on the shapes world",
        "",
        f"Command: `{meta['command']}`  ",
        f"Stages: {meta['stages']}; seeds: {meta['seeds']}; budgets: {json.dumps(meta['budget'])}  ",
        f"Time: the runs took {meta['run_seconds'] / 60:.1f} worker-minutes in all "
        f"({meta['workers']} workers side by side on {meta['cpus']} CPU cores)"
        + "".join(f", {k} {v:.1f}" for k, v in meta.get("worker_minutes", {}).items())
        + "  ",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        "Invocations that wrote here (finished runs are reused, not rerun):",
        "",
    ]
    for inv in meta.get("invocations", []):
        trained = "?" if inv.get("runs_trained") is None else inv["runs_trained"]
        lines.append(
            f"- `{inv['command']}`: {trained} runs trained, {inv['wall_minutes']:.1f} min of "
            "wall time"
        )
    lines.append("")
    if summary.get("rows"):
        lines += [
            "Box AP (LVIS protocol, IoU 0.5:0.95) in %, mean ± sample std over seeds; AP_r = the 8 "
            "rare (novel) categories, held out of detection training; AP_base = the 24 base "
            "categories; R@1 = zero-shot retrieval recall@1 of the pretrained towers (mean of "
            "image->text and text->image, 500 test pairs). Columns without '(det. only)' use VLM "
            "score fusion, as the paper reports.",
        ]
    pre = summary["pretraining"]
    lines += ["", "## Pretraining: zero-shot retrieval recall@1 (%)", ""]
    lines += ["| variant | R@1 (mean of both directions) | image->text | text->image | per seed |"]
    lines.append("|---|---:|---:|---:|---|")
    for r in pre["rows"]:
        cells = [f"{r[c]['mean']:.2f} ± {r[c]['std']:.2f}" for c in ("R@1", "i2t R@1", "t2i R@1")]
        per_seed = ", ".join(f"{v:.1f}" for v in r["R@1"]["values"])
        lines.append(
            f"| {variant_label(dict(r, objectness='centerness'))} | "
            + " | ".join(cells)
            + f" | {per_seed} |"
        )
    lines += _delta_table("R@1", pre["deltas"])
    for mode in MODES:
        rows = [r for r in summary.get("rows", []) if r["mode"] == mode]
        if not rows:
            continue
        title = {
            "frozen": "Backbone frozen (probe of pretraining)",
            "finetune": f"Backbone trained at {FINETUNE_BACKBONE_LR}x learning rate",
        }[mode]
        lines += ["", f"## {title}", "", "| variant | " + " | ".join(cols) + " |"]
        lines.append("|---|" + "---:|" * len(cols))
        for r in rows:
            cells = [f"{r[c]['mean']:.2f} ± {r[c]['std']:.2f}" for c in cols]
            lines.append(f"| {variant_label(r)} | " + " | ".join(cells) + " |")
    if summary.get("deltas"):
        lines += _delta_table("AP_r (fused)", summary["deltas"])
    if summary.get("deltas_detector_only"):
        lines += _delta_table("AP_r (detector only)", summary["deltas_detector_only"])
    return "\n".join(lines) + "\n"


def _delta_table(what: str, deltas: list[dict[str, Any]]) -> list[str]:
    lines = ["", f"### Deltas of {what}: mean ± std of the paired per-seed differences", ""]
    lines += ["| mechanism | comparison | delta | per seed | distinguishable from seed noise |"]
    lines.append("|---|---|---:|---|---|")
    for d in deltas:
        per_seed = ", ".join(f"{v:+.2f}" for v in d["values"])
        lines.append(
            f"| {d['mechanism']} | {d['comparison']} | {d['mean']:+.2f} ± {d['std']:.2f} "
            f"| {per_seed} | {d['verdict']} |"
        )
    return lines


def deltas(
    records: list[dict[str, Any]], best: tuple[bool, str], column: str = "AP_r"
) -> list[dict[str, Any]]:
    """Paired per-seed differences of a METRICS detection column for each mechanism (the
    paper's comparisons, in both modes, and centerness vs binary on the `best` backbone)."""
    ap = {}
    for r in records:
        run = r["run"]
        if run["kind"] == "detect":
            key = (run["cpe"], run["loss"], run["mode"], run["objectness"], run["seed"])
            ap[key] = 100.0 * r["metrics"][METRICS[column][1]]
    specs = [
        (
            m,
            f"{mode}: {_label(a)} vs {_label(b)}",
            a + (mode, "centerness"),
            b + (mode, "centerness"),
        )
        for mode in MODES
        for m, a, b in COMPARISONS
    ]
    cpe, loss = best
    specs.append(
        (
            "centerness objectness",
            f"finetune, {_label(best)}: centerness vs binary",
            (cpe, loss, "finetune", "centerness"),
            (cpe, loss, "finetune", "binary"),
        )
    )
    return _paired(ap, specs)


def verdict(values: list[float]) -> str:
    """Paired t-test at 5% (two-sided) on the per-seed differences; 'n < 2' when untestable."""
    n = len(values)
    if n < 2:
        return "n < 2"
    mean, std = mean_std(values)
    if std == 0.0:
        return "yes" if mean != 0 else "no"
    from scipy import stats

    p = float(stats.ttest_1samp(values, 0.0).pvalue)
    return f"{'yes' if p < 0.05 else 'no'} (p = {p:.2f})"


def plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary.get("rows"):
        _plot_pretraining(summary["pretraining"]["rows"], path, plt)
        return
    rows = summary["rows"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    colours = {"frozen": "#4c72b0", "finetune": "#dd8452"}
    for ax, column, what in (
        (axes[0], "AP_r", "with VLM score fusion"),
        (axes[1], "AP_r (det. only)", "detector only"),
    ):
        for i, r in enumerate(rows):
            m, s = r[column]["mean"], r[column]["std"]
            ax.bar(i, m, yerr=s, capsize=4, color=colours[r["mode"]])
            ax.plot([i] * len(r[column]["values"]), r[column]["values"], "k.", ms=4)
        ax.set_ylabel(f"box AP_r (novel), %\n{what}")
    labels = [f"{variant_label(r)}\n{r['mode']}" for r in rows]
    axes[1].set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    axes[0].set_title("Shapes-world ablations: mean ± std over seeds (dots: seeds)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axes[0].legend(handles, ["backbone frozen", "backbone 0.1x lr"], loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_pretraining(rows: list[dict[str, Any]], path: str, plt) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(rows):
        ax.bar(
            i,
            r["R@1"]["mean"],
            yerr=r["R@1"]["std"],
            capsize=4,
            color="#4c72b0" if r["cpe"] else "#999999",
        )
        ax.plot([i] * len(r["R@1"]["values"]), r["R@1"]["values"], "k.", ms=4)
    ax.set_xticks(
        range(len(rows)),
        [variant_label(dict(r, objectness="centerness")) for r in rows],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("zero-shot retrieval R@1, %")
    ax.set_title("Shapes-world pretraining: mean ± std over seeds (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in (
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "tensorflow-cpu",
        "faster-coco-eval",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for runs/ and the result files")
    parser.add_argument("--mode", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR)")
    parser.add_argument(
        "--stop_after",
        choices=("pretrain", "all"),
        default="all",
        help="'pretrain': run and report only the pretraining stage (rerun without it to go on)",
    )
    args = parser.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",")]
    losses = [s for s in args.losses.split(",") if s]
    for loss in losses:
        if loss not in LOSSES:
            parser.error(f"--losses: unknown loss {loss!r}; choose from {LOSSES}")
    budget = dict(BUDGETS[args.mode])
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    # Every worker: one XLA thread, one device (the sweep's parallelism is across runs). Other
    # XLA flags of the caller (an optimisation level, say) are kept.
    forced = (
        "--xla_force_host_platform_device_count=1",
        "--xla_cpu_multi_thread_eigen=false",
        "intra_op_parallelism_threads=1",
    )
    names = tuple(f.split("=")[0] for f in forced)
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(names)]
    os.environ["XLA_FLAGS"] = " ".join([*forced, *kept])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.time()

    # The world and tokenizer are built once, before the workers race to build them.
    from rovit_jax.data import sources

    probe = build_config(pretrain_run(True, "focal", seeds[0]), budget, out, args.data_dir)
    sources.tokenizer_for(probe)

    variants = [(cpe, loss) for cpe in CPE for loss in losses]
    pre = [pretrain_run(cpe, loss, s) for cpe, loss in variants for s in seeds]
    trained: list[str] = []
    records = run_all(pre, budget, out, args.data_dir, args.workers, trained)
    summary: dict[str, Any] = dict(pretraining=summarise_pretraining(records))
    if args.stop_after == "pretrain":
        return _write(out, summary, records, args, argv, seeds, budget, t0, trained)
    det = [
        detect_run(cpe, loss, s, mode) for mode in MODES for cpe, loss in variants for s in seeds
    ]
    records += run_all(det, budget, out, args.data_dir, args.workers, trained)

    # The best backbone by the detector's own AP_r: fused scores also carry the frozen VLM's
    # region scores, which are near chance at this pretraining budget (README, vlm_probe).
    best_row = max(
        (r for r in summarise(records)["rows"] if r["mode"] == "finetune"),
        key=lambda r: r["AP_r (det. only)"]["mean"],
    )
    best = (best_row["cpe"], best_row["loss"])
    binary = [detect_run(*best, s, "finetune", "binary") for s in seeds]
    records += run_all(binary, budget, out, args.data_dir, args.workers, trained)

    summary.update(summarise(records))
    summary["best_backbone"] = dict(cpe=best[0], loss=best[1])
    summary["deltas"] = deltas(records, best)
    summary["deltas_detector_only"] = deltas(records, best, "AP_r (det. only)")
    return _write(out, summary, records, args, argv, seeds, budget, t0, trained)


def _previous_invocations(out: str) -> list[dict[str, Any]]:
    """The invocation history of an earlier ablations.json in `out` (older files: their one)."""
    path = os.path.join(out, "ablations.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        meta = json.load(f)["meta"]
    if "invocations" in meta:
        return list(meta["invocations"])
    return [dict(command=meta["command"], wall_minutes=meta["wall_minutes"], runs_trained=None)]


def _write(out, summary, records, args, argv, seeds, budget, t0, trained) -> dict[str, Any]:
    """Writes ablations.json / .md / .png into `out`; returns the JSON's content."""
    command = "python benchmarks/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)
    wall_minutes = (time.time() - t0) / 60.0
    by_name = {r["run"]["name"]: r for r in records}
    this = dict(
        command=command,
        wall_minutes=wall_minutes,
        runs_trained=len(trained),
        worker_minutes_trained=sum(by_name[n]["seconds"] for n in trained) / 60.0,
    )
    meta = dict(
        command=command,
        stages="pretraining only" if args.stop_after == "pretrain" else "all",
        seeds=seeds,
        budget=budget,
        finetune_backbone_lr=FINETUNE_BACKBONE_LR,
        versions=versions(),
        cpus=os.cpu_count(),
        workers=args.workers,
        wall_minutes=wall_minutes,
        run_seconds=sum(r["seconds"] for r in records),
        worker_minutes={
            kind: sum(r["seconds"] for r in records if r["run"]["kind"] == kind) / 60.0
            for kind in ("pretrain", "detect")
        },
        # Every invocation that wrote into `out`, oldest first: the sweep's measured wall time
        # survives reruns that only regenerate the tables from finished runs.
        invocations=_previous_invocations(out) + [this],
    )
    result = dict(meta=meta, summary=summary, runs=records)
    with open(os.path.join(out, "ablations.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    with open(os.path.join(out, "ablations.md"), "w") as f:
        f.write(markdown(summary, meta))
    plot(summary, os.path.join(out, "ablations.png"))
    print(markdown(summary, meta))
    return result


if __name__ == "__main__":
    main()
