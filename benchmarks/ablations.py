r"""The paper's ablations in miniature, on the shapes world, from scratch, in one command.

  python benchmarks/ablations.py --out benchmarks/results/ablations --readme README.md  # <= 2 h
  python benchmarks/ablations.py --out /tmp/abl --mode small                            # minutes

The plan is fixed before any run (PLANS, COMPARISONS below; README "Ablations in miniature"):
no variant is added, dropped or chosen after seeing results. Every run is a normal
`rovit_jax.train.loop.run` of the quick-start configs (configs/shapes_pretrain.py,
configs/shapes_detect.py), scaled only by the budget knobs of BUDGETS:
  * pretraining steps (batch, model and schedule as configs/shapes_pretrain.py);
  * detection steps and batch (every other detection setting as configs/shapes_detect.py);
  * box AP only: the mask head is not trained (`data.with_masks=False`); the questions are about
    box AP_r;
  * evaluation on the first `eval_images` test images, each scored once for both the fused and
    the detector-only variant.

Runs (full plan):
  1. pretraining of four backbones, CPE + focal, no CPE + focal, CPE + softmax, CPE + sigmoid,
     5 seeds each;
  2. detection from each backbone's final checkpoint: CPE + focal and no CPE + focal with the
     backbone FROZEN (the paper's probe of pretraining quality; no backward pass through it) and
     FINETUNED (the recipe's backbone learning rate); the softmax and sigmoid backbones
     finetuned; binary objectness instead of centerness on CPE + focal, finetuned;
  3. the pretraining-length curve: CPE + focal and no CPE + focal detectors, frozen and
     finetuned, from the checkpoint at half of the same pretraining runs (seeds 0-2; the final
     checkpoint is step 2's detectors). That checkpoint is a point along one cosine schedule,
     not a separately scheduled shorter run.
Seed s pretrains with seed s and finetunes that backbone with seed s, so comparisons are paired
by seed and a variant's spread covers both stages.

Statistics, per comparison (COMPARISONS): the paired per-seed differences, their mean, sample
std, 95% t confidence interval, a two-sided paired t-test, and the minimum detectable effect
(alpha 0.05, power 0.8, from the measured std of the differences, by the noncentral t
distribution). After the runs, a bootstrap over the evaluation images (`eval_noise`) splits
the uncertainty of each comparison into the seeds' own part, a seed-by-image part and the part
shared by all seeds (which test images were drawn; invisible in the seed-to-seed spread), and
gives the minimum detectable effect at other evaluation-set sizes (`noise_split`). A paper sign is "reproduced" when the interval excludes 0 on the paper's side,
"contradicted" when it excludes 0 on the other side, and "undecided" otherwise.

Runs go on `--workers` processes with one XLA thread each (on 2 cores two runs side by side beat
one run on two threads). A finished run keeps `result.json` (with its budget) in its workdir: an
interrupted sweep resumes where it stopped, and a run made under another budget is refused, not
reused. Outputs in --out: `ablations.json` (every run's metrics, command, seeds, budgets,
versions, times, the summary), `ablations.md`, `deltas.png`, `curve.png`; with `--readme`, the
README section between the `ablations:begin` / `ablations:end` markers is regenerated from the
JSON (`--readme_only` regenerates it from an existing JSON without running anything).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# Backbones: name -> (CPE, pretraining loss).
BACKBONES = {
    "cpe-focal": (True, "focal"),
    "nocpe-focal": (False, "focal"),
    "cpe-softmax": (True, "softmax"),
    "cpe-sigmoid": (True, "sigmoid"),
}
MODES = ("frozen", "finetune")
OBJECTNESS = ("centerness", "binary")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a sweep runs: written before the runs, never changed by their results."""

    seeds: tuple[int, ...]
    backbones: tuple[str, ...]
    # (backbone, mode, objectness) detectors from each backbone's final checkpoint.
    detectors: tuple[tuple[str, str, str], ...]
    curve_seeds: tuple[int, ...]
    curve_backbones: tuple[str, ...]
    curve_fractions: tuple[float, ...]  # of pretraining steps; 1.0 = the detectors above


_MAIN_DETECTORS = (
    ("cpe-focal", "frozen", "centerness"),
    ("nocpe-focal", "frozen", "centerness"),
    ("cpe-focal", "finetune", "centerness"),
    ("nocpe-focal", "finetune", "centerness"),
    ("cpe-softmax", "finetune", "centerness"),
    ("cpe-sigmoid", "finetune", "centerness"),
    ("cpe-focal", "finetune", "binary"),
)
PLANS = {
    "full": Plan(
        seeds=(0, 1, 2, 3, 4),
        backbones=tuple(BACKBONES),
        detectors=_MAIN_DETECTORS,
        curve_seeds=(0, 1, 2),
        curve_backbones=("cpe-focal", "nocpe-focal"),
        # One point besides the final checkpoint: a second one (1/4) would take the sweep past
        # its 2-hour budget (12 more detection runs, about 40 worker-minutes).
        curve_fractions=(0.5,),
    ),
    # The same code paths on tiny runs: two backbones, one seed, one curve point.
    "small": Plan(
        seeds=(0,),
        backbones=("cpe-focal", "nocpe-focal"),
        detectors=tuple(d for d in _MAIN_DETECTORS if d[0] in ("cpe-focal", "nocpe-focal")),
        curve_seeds=(0,),
        curve_backbones=("cpe-focal",),
        curve_fractions=(0.5,),
    ),
}

# Budget knobs per mode (module docstring); everything else is the quick-start configs.
BUDGETS: dict[str, dict[str, Any]] = {
    # Detection 1200 steps of 2 images at the quick start's learning rate (1e-3): the smallest
    # calibrated budget whose finetuned detectors clear half of the quick start's box AP on base
    # categories (run H's 38.7 / 2 = 19.4, one box head). Calibrated before this sweep, seed-0 backbones
    # of 400 pretraining steps, one run each, detector-only box AP base: 800 steps 19.3 (CPE +
    # softmax) / 17.5 (CPE + focal), 1200 steps 26.0 / 20.9. Earlier (lr 5e-4): 800 x 2 images
    # trained more per second than 400 x 4 (15.3 against 12.4 from one backbone). Side by side
    # on 2 cores, one thread per run: pretraining 146 s; a finetuned 800-step detector 225-335 s
    # and a 1200-step one about 1.26x that, with its evaluation on 200 images, depending on
    # the machine.
    "full": dict(
        pretrain_steps=400,
        detect_steps=1200,
        detect_batch=2,
        eval_images=200,
        tiny=False,
    ),
    "small": dict(pretrain_steps=8, detect_steps=3, detect_batch=2, eval_images=8, tiny=True),
}

# The quick-start pipeline's box AP on base categories, detector only (README, Results: the
# timed run of configs/shapes_detect.py); the finetuned detectors must reach half of it.
# Run I (cascade heads); 38.7 for run H (one head), when the 1200-step budget was calibrated; 36.5
# for run G2, when the committed results were made.
QUICKSTART_AP_BASE = 42.8


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One pre-registered question: variant a minus variant b, paired by seed."""

    mechanism: str
    a: tuple[str, str, str]  # (backbone, mode, objectness)
    b: tuple[str, str, str]
    metric_a: str = "fused/bbox/APr"
    metric_b: str = "fused/bbox/APr"
    paper: float | None = None  # the paper's AP_r difference (ViT-B/16, LVIS), if reported
    paper_text: str = "not reported"


COMPARISONS = (
    Comparison(
        "CPE, backbone frozen",
        ("cpe-focal", "frozen", "centerness"),
        ("nocpe-focal", "frozen", "centerness"),
        paper=6.5,
        paper_text="+6.5 (9.7 -> 16.2)",
    ),
    Comparison(
        "CPE, backbone finetuned",
        ("cpe-focal", "finetune", "centerness"),
        ("nocpe-focal", "finetune", "centerness"),
        paper=2.4,
        paper_text="+2.4",
    ),
    Comparison(
        "focal vs softmax loss",
        ("cpe-focal", "finetune", "centerness"),
        ("cpe-softmax", "finetune", "centerness"),
        paper=0.5,
        paper_text="+0.5",
    ),
    Comparison(
        "focal vs sigmoid loss",
        ("cpe-focal", "finetune", "centerness"),
        ("cpe-sigmoid", "finetune", "centerness"),
    ),
    Comparison(
        "centerness vs binary objectness",
        ("cpe-focal", "finetune", "centerness"),
        ("cpe-focal", "finetune", "binary"),
        paper=2.0,
        paper_text="about +2",
    ),
    Comparison(
        "VLM score fusion vs detector only",
        ("cpe-focal", "finetune", "centerness"),
        ("cpe-focal", "finetune", "centerness"),
        metric_b="detector_only/bbox/APr",
        paper_text="fusion is the paper's inference (no ablation number)",
    ),
)
ALPHA, POWER = 0.05, 0.8


# ---- runs ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the sweep."""

    name: str  # also its workdir under <out>/runs/
    kind: str  # "pretrain" | "detect"
    backbone: str
    seed: int
    mode: str = ""  # detect: "frozen" | "finetune"
    objectness: str = ""  # detect: "centerness" | "binary"
    pretrain_step: int = 0  # detect: the pretraining checkpoint it starts from

    @property
    def pretrain_name(self) -> str:
        return f"pretrain/{self.backbone}/seed{self.seed}"


def pretrain_run(backbone: str, seed: int) -> Run:
    return Run(f"pretrain/{backbone}/seed{seed}", "pretrain", backbone, seed)


def detect_run(backbone: str, seed: int, mode: str, objectness: str, pretrain_step: int) -> Run:
    name = f"detect/{backbone}/pre{pretrain_step}/{mode}-{objectness}/seed{seed}"
    return Run(name, "detect", backbone, seed, mode, objectness, pretrain_step)


def curve_steps(plan: Plan, budget: dict[str, Any]) -> list[int]:
    """The pretraining checkpoints of the curve, the final one last."""
    total = int(budget["pretrain_steps"])
    return sorted({max(1, round(f * total)) for f in plan.curve_fractions} | {total})


def plan_runs(plan: Plan, budget: dict[str, Any]) -> tuple[list[Run], list[Run]]:
    """(pretraining runs, detection runs) of `plan`, in the order they are trained: the main
    comparisons' detectors first, then the curve's."""
    final = int(budget["pretrain_steps"])
    pre = [pretrain_run(b, s) for b in plan.backbones for s in plan.seeds]
    det = [
        detect_run(b, s, mode, obj, final) for b, mode, obj in plan.detectors for s in plan.seeds
    ]
    for step in curve_steps(plan, budget)[:-1]:
        det += [
            detect_run(b, s, mode, "centerness", step)
            for b in plan.curve_backbones
            for mode in MODES
            for s in plan.curve_seeds
        ]
    return pre, det


def build_config(run: Run, budget: dict[str, Any], out: str, data_dir: str | None, plan: Plan):
    """The config of `run`: the quick-start config with the sweep's budget knobs."""
    from rovit_jax.config_files import load_config

    tiny = ",tiny" if budget["tiny"] else ""
    cpe, loss = BACKBONES[run.backbone]
    if run.kind == "pretrain":
        c = load_config(f"shapes_pretrain:loss={loss},cpe={cpe},seed={run.seed}{tiny}")
        c.total_steps = int(budget["pretrain_steps"])
        # Keep every checkpoint the curve starts from.
        steps = curve_steps(plan, budget)
        c.checkpoint_every = math.gcd(*steps)
        c.keep_checkpoints = c.total_steps // c.checkpoint_every
    else:
        c = load_config(f"shapes_detect:objectness={run.objectness},seed={run.seed}{tiny}")
        c.total_steps = int(budget["detect_steps"])
        c.batch_size = int(budget["detect_batch"])
        c.checkpoint_every = c.total_steps
        c.keep_checkpoints = 1
        c.init.run_pretraining = False
        c.init.pretrain_workdir = os.path.join(out, "runs", run.pretrain_name)
        c.init.pretrain_step = run.pretrain_step
        c.data.with_masks = False
        c.eval.num_images = int(budget["eval_images"])
        c.eval.render_images = 0
        if run.mode == "frozen":
            c.optim.frozen = ["^backbone/"]
            c.optim.lr_mults = []
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


def execute(args: tuple[Run, dict[str, Any], str, str | None, Plan]) -> dict[str, Any]:
    """Runs one training run (in a worker process) and returns its record; resumable."""
    run, budget, out, data_dir, plan = args
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

    config = build_config(run, budget, out, data_dir, plan)
    t0 = time.time()
    result = train(config, workdir, get_task(config, workdir))
    record = dict(
        run=dataclasses.asdict(run),
        budget=stage_budget,
        metrics={k: float(v) for k, v in result["eval"].items()},
        seconds=time.time() - t0,
    )
    with open(result_file + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(result_file + ".tmp", result_file)
    print(f"[ablations] {run.name}: {time.time() - t0:.0f} s", flush=True)
    return record


def check_finished(runs: list[Run], budget: dict[str, Any], out: str) -> None:
    """Refuses, before anything trains, a finished run made under another budget."""
    for run in runs:
        path = os.path.join(out, "runs", run.name, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                made = json.load(f).get("budget")
            if made != run_budget(run, budget):
                raise SystemExit(
                    f"{path}: made with budget {made}, this sweep's is "
                    f"{run_budget(run, budget)}; delete that run folder (or use another --out)"
                )


def run_all(runs, budget, out, data_dir, plan, workers: int, trained: list[str], on_record):
    """Trains the runs without a record (appending their names to `trained`); calls
    `on_record(record)` for every run as it finishes (finished ones first)."""
    todo = []
    for r in runs:
        if os.path.exists(os.path.join(out, "runs", r.name, "result.json")):
            on_record(execute((r, budget, out, data_dir, plan)))
        else:
            todo.append((r, budget, out, data_dir, plan))
    trained += [job[0].name for job in todo]
    cache_dir = os.path.join(out, "jax_cache")
    if workers <= 1:
        _worker_init(cache_dir)
        for job in todo:
            on_record(execute(job))
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(cache_dir,)) as pool:
        for record in pool.imap_unordered(execute, todo, chunksize=1):
            on_record(record)


# ---- statistics ----------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def minimum_detectable_effect(std: float, n: int, alpha: float = ALPHA, power: float = POWER):
    """The smallest true mean difference a two-sided paired t-test at `alpha` detects with
    probability `power`, for differences of standard deviation `std` over `n` pairs (exact, by
    the noncentral t distribution); None for n < 2."""
    if n < 2:
        return None
    return _mde_in_std(n, alpha, power) * std


@functools.lru_cache(maxsize=None)
def _mde_in_std(n: int, alpha: float, power: float) -> float:
    from scipy import integrate, optimize, stats

    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def reach(effect_in_sd: float) -> float:
        # P(|T| > crit) for T = (Z + nc) / sqrt(V / df), V ~ chi2(df): the noncentral t's two
        # tails, integrated over V (scipy's nct is unstable for large noncentrality at df 1).
        nc = effect_in_sd * math.sqrt(n)

        def given(v: float) -> float:
            c = crit * math.sqrt(v / df)
            return (stats.norm.sf(c - nc) + stats.norm.cdf(-c - nc)) * stats.chi2.pdf(v, df)

        return integrate.quad(given, 0.0, math.inf)[0]

    high = 1.0  # effect in standard deviations; doubled until the power is reached
    while reach(high) < power:
        high *= 2.0
    return float(optimize.brentq(lambda e: reach(e) - power, 1e-6, high))


def paired_stats(diffs: list[float]) -> dict[str, Any]:
    """Mean, sample std, 95% t interval, two-sided t-test p and MDE of paired differences."""
    n = len(diffs)
    mean, std = mean_std(diffs)
    out: dict[str, Any] = dict(n=n, mean=mean, std=std, values=list(diffs))
    if n < 2:
        return dict(out, ci95=None, p=None, mde=None)
    from scipy import stats

    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    if std == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    return dict(out, ci95=[mean - half, mean + half], p=p, mde=minimum_detectable_effect(std, n))


def verdict(stat: dict[str, Any], paper: float | None) -> str:
    """Whether the interval decides the paper's sign (module docstring)."""
    if stat["ci95"] is None:
        return "undecided (one seed)"
    low, high = stat["ci95"]
    if paper is None:
        if low > 0 or high < 0:
            return "positive" if low > 0 else "negative"
        return "undecided"
    if (low > 0 and paper > 0) or (high < 0 and paper < 0):
        return "reproduced"
    if low > 0 or high < 0:
        return "contradicted"
    return "undecided"


# ---- how much of the spread is which test images were drawn ----------------------------------
BOOTSTRAP_DRAWS = 40  # resamples of the evaluation images per detector
NOISE_IMAGES = (200, 500, 1000)  # evaluation-set sizes the minimum detectable effect is given for


def bootstrap_ap_r(gt: dict[str, Any], detections: list[dict], draws: np.ndarray) -> np.ndarray:
    """AP_r (LVIS protocol) of `detections` on each bootstrap draw of the evaluation images.

    Args:
      gt: LVIS ground truth of the evaluated images.
      detections: LVIS results on them.
      draws: int [num_draws, num_images] indices into gt["images"]; an image drawn twice counts
        twice (its copies get ids of their own).

    Returns:
      float [num_draws], in %. Only the rare categories' annotations and detections are kept:
      AP_r is a mean over those categories, each evaluated on its own.
    """
    from rovit_jax.evaluation.detection import evaluate_lvis

    rare = {c["id"] for c in gt["categories"] if c["frequency"] == "r"}
    images = gt["images"]
    anns: dict[Any, list] = {im["id"]: [] for im in images}
    for a in gt["annotations"]:
        if a["category_id"] in rare:
            anns[a["image_id"]].append(a)
    dets: dict[Any, list] = {im["id"]: [] for im in images}
    for d in detections:
        if d["category_id"] in rare and d["image_id"] in dets:
            dets[d["image_id"]].append({k: d[k] for k in ("category_id", "bbox", "score")})
    out = []
    for draw in draws:
        imgs, a_out, d_out = [], [], []
        for k, i in enumerate(draw):
            src = images[int(i)]
            imgs.append(dict(src, id=k))
            a_out += [
                dict(a, image_id=k, id=len(a_out) + j + 1) for j, a in enumerate(anns[src["id"]])
            ]
            d_out += [dict(d, image_id=k) for d in dets[src["id"]]]
        drawn = dict(gt, images=imgs, annotations=a_out)
        out.append(100.0 * evaluate_lvis(drawn, d_out)["APr"] if d_out else 0.0)
    return np.asarray(out)


def noise_split(diffs: list[float], boot_diffs: np.ndarray, eval_images: int) -> dict[str, Any]:
    """Splits the uncertainty of a comparison's mean difference by its sources.

    Every detector is evaluated on the same `eval_images` test images, so a per-seed difference
    is d_s = mu + a_s + e + g_s: a_s the seeds' own effect, e the effect of which images were
    drawn (shared by all seeds), g_s the seed-by-image interaction. The seed-to-seed spread of
    `diffs` (what the paired t-test sees) holds var(a) + var(g); var(e) does not show in it, yet
    another draw of test images would move every difference together. The bootstrap separates
    them (`boot_diffs`: float [seeds, draws], each seed's difference on the same resamples):
    each row's variance is var(e) + var(g), the variance of the rows' mean var(e) + var(g)/n.

    The minimum detectable effect at m test images uses the standard error of the mean over
    new seeds and new images, sqrt((var(a) + var(g) M/m) / n + var(e) M/m) (M = eval_images),
    as sqrt(n) times it in the noncentral-t formula; with infinitely many images only var(a)
    is left. At m = M with var(e) = 0 it is the t-test's own MDE.
    """
    _, std = mean_std(diffs)
    boot = np.asarray(boot_diffs, np.float64)
    n = len(diffs)
    within = float(np.mean(np.var(boot, axis=1, ddof=1)))  # var(e) + var(g)
    of_mean = float(np.var(boot.mean(axis=0), ddof=1))  # var(e) + var(g) / n
    var_g = max((within - of_mean) * n / (n - 1), 0.0)
    var_e = max(of_mean - var_g / n, 0.0)
    var_a = max(std**2 - var_g, 0.0)

    def mde_at(scale: float) -> float:  # scale = M / m
        return minimum_detectable_effect(math.sqrt(var_a + var_g * scale + n * var_e * scale), n)

    mde = {str(m): mde_at(eval_images / m) for m in NOISE_IMAGES}
    mde["infinite"] = mde_at(0.0)
    return dict(
        std=std,
        image_std=math.sqrt(var_e),
        interaction_std=math.sqrt(var_g),
        seed_std=math.sqrt(var_a),
        mde=mde,
    )


def eval_noise(
    out: str,
    records: list[dict[str, Any]],
    plan: Plan,
    budget: dict[str, Any],
    data_dir: str | None,
) -> dict[str, Any]:
    """Per comparison, the part of its seed-to-seed spread that comes from which evaluation
    images were drawn, and the minimum detectable effect at other evaluation-set sizes.

    Each final-checkpoint detector's AP_r is recomputed on BOOTSTRAP_DRAWS resamples of its
    evaluation images, the same resamples for every detector, so a comparison's per-seed
    difference has a bootstrap spread (`eval_std`, root mean square over seeds). The rest of
    the measured spread is the seeds' own (`seed_std`). With n evaluation images the
    differences would spread by sqrt(seed_std^2 + eval_std^2 * eval_images / n).
    """
    from rovit_jax.data import sources
    from rovit_jax.detection.settings import detection_settings

    config = build_config(
        detect_run("cpe-focal", 0, "finetune", "centerness", int(budget["pretrain_steps"])),
        budget,
        out,
        data_dir,
        plan,
    )
    n = int(budget["eval_images"])
    gt = sources.detection_data(detection_settings(config), need_train=False).ground_truth(n)
    num_images = len(gt["images"])
    rng = np.random.default_rng(0)
    draws = rng.integers(0, num_images, size=(BOOTSTRAP_DRAWS, num_images))
    final = int(budget["pretrain_steps"])
    cache: dict[tuple[str, str], np.ndarray] = {}

    def boot(run_name: str, variant: str) -> np.ndarray:
        if (run_name, variant) not in cache:
            path = os.path.join(out, "runs", run_name, f"detections_{variant}.json")
            with open(path) as f:
                cache[(run_name, variant)] = bootstrap_ap_r(gt, json.load(f)["detections"], draws)
        return cache[(run_name, variant)]

    metrics = {r["run"]["name"]: r["metrics"] for r in records}
    result = []
    for c in COMPARISONS:
        pairs = []
        for seed in sorted({r["run"]["seed"] for r in records}):
            a = detect_run(c.a[0], seed, c.a[1], c.a[2], final).name
            b = detect_run(c.b[0], seed, c.b[1], c.b[2], final).name
            if a in metrics and b in metrics:
                pairs.append((a, b))
        if len(pairs) < 2:
            continue
        va = "fused" if c.metric_a.startswith("fused") else "detector_only"
        vb = "fused" if c.metric_b.startswith("fused") else "detector_only"
        diffs = [100.0 * (metrics[a][c.metric_a] - metrics[b][c.metric_b]) for a, b in pairs]
        boot_diffs = np.stack([boot(a, va) - boot(b, vb) for a, b in pairs])
        result.append(dict(mechanism=c.mechanism, **noise_split(diffs, boot_diffs, n)))
    return dict(draws=BOOTSTRAP_DRAWS, eval_images=n, comparisons=result)


# ---- summary -------------------------------------------------------------------------------------
COLUMNS = {
    # column -> metric key of a detection run's evaluation (in %)
    "AP_r fused": "fused/bbox/APr",
    "AP_r det. only": "detector_only/bbox/APr",
    "AP_base fused": "fused/bbox/AP_base",
    "AP_base det. only": "detector_only/bbox/AP_base",
    "AP fused": "fused/bbox/AP",
}


def _detectors(records: list[dict[str, Any]]) -> dict[tuple, dict[int, dict[str, float]]]:
    """{(backbone, pretrain_step, mode, objectness): {seed: metrics}} of the detection runs."""
    out: dict[tuple, dict[int, dict[str, float]]] = {}
    for r in records:
        run = r["run"]
        if run["kind"] == "detect":
            key = (run["backbone"], run["pretrain_step"], run["mode"], run["objectness"])
            out.setdefault(key, {})[run["seed"]] = r["metrics"]
    return out


def recall_at_1(metrics: dict[str, float]) -> float:
    """Mean of image->text and text->image recall@1, in %."""
    return 50.0 * (metrics["i2t_recall@1"] + metrics["t2i_recall@1"])


def summarise(records: list[dict[str, Any]], plan: Plan, budget: dict[str, Any]) -> dict[str, Any]:
    """Tables of the sweep: retrieval per backbone, detection per variant, the comparisons and
    the pretraining-length curve, all re-derivable from `records`."""
    final = int(budget["pretrain_steps"])
    pre: dict[str, dict[int, float]] = {}
    for r in records:
        if r["run"]["kind"] == "pretrain":
            pre.setdefault(r["run"]["backbone"], {})[r["run"]["seed"]] = recall_at_1(r["metrics"])
    retrieval = []
    for b in plan.backbones:
        vals = [pre[b][s] for s in sorted(pre.get(b, {}))]
        if vals:
            m, s = mean_std(vals)
            retrieval.append(dict(backbone=b, mean=m, std=s, values=vals))

    dets = _detectors(records)
    variants = []
    for b, mode, obj in plan.detectors:
        per_seed = dets.get((b, final, mode, obj), {})
        if not per_seed:
            continue
        row: dict[str, Any] = dict(backbone=b, mode=mode, objectness=obj, seeds=sorted(per_seed))
        for col, key in COLUMNS.items():
            vals = [100.0 * per_seed[s][key] for s in sorted(per_seed)]
            m, s = mean_std(vals)
            row[col] = dict(mean=m, std=s, values=vals)
        variants.append(row)

    comparisons = []
    for c in COMPARISONS:
        a = dets.get((c.a[0], final, c.a[1], c.a[2]), {})
        b = dets.get((c.b[0], final, c.b[1], c.b[2]), {})
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue  # not in this mode's plan
        diffs = [100.0 * (a[s][c.metric_a] - b[s][c.metric_b]) for s in seeds]
        stat = paired_stats(diffs)
        comparisons.append(
            dict(
                dataclasses.asdict(c),
                seeds=seeds,
                **stat,
                verdict=verdict(stat, c.paper),
            )
        )

    curve = []
    for b in plan.curve_backbones:
        for mode in MODES:
            for step in curve_steps(plan, budget):
                per_seed = dets.get((b, step, mode, "centerness"), {})
                seeds = [s for s in plan.curve_seeds if s in per_seed]
                if not seeds:
                    continue
                point: dict[str, Any] = dict(backbone=b, mode=mode, pretrain_step=step, seeds=seeds)
                for col in ("AP_r fused", "AP_r det. only", "AP_base det. only"):
                    vals = [100.0 * per_seed[s][COLUMNS[col]] for s in seeds]
                    m, s = mean_std(vals)
                    point[col] = dict(mean=m, std=s, values=vals)
                curve.append(point)
    finetuned = [r["AP_base det. only"]["mean"] for r in variants if r["mode"] == "finetune"]
    quality = dict(
        finetuned_ap_base_mean=sum(finetuned) / len(finetuned) if finetuned else None,
        quickstart_ap_base=QUICKSTART_AP_BASE,
    )
    return dict(
        retrieval=retrieval,
        variants=variants,
        comparisons=comparisons,
        curve=curve,
        quality=quality,
    )


# ---- reports -------------------------------------------------------------------------------------
def _pm(cell: dict[str, Any]) -> str:
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def _ci(c: dict[str, Any]) -> str:
    return "—" if c["ci95"] is None else f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def variant_label(backbone: str, mode: str = "", objectness: str = "centerness") -> str:
    cpe, loss = BACKBONES[backbone]
    label = f"{'CPE' if cpe else 'no CPE'} + {loss}"
    if mode:
        label += f", {mode}"
    if objectness != "centerness":
        label += f", {objectness} objectness"
    return label


def tables(result: dict[str, Any]) -> list[str]:
    """The markdown tables of a sweep's JSON (shared by ablations.md and the README)."""
    summary, meta = result["summary"], result["meta"]
    lines = ["| mechanism | comparison (a − b) | Δ AP_r | 95% CI | p | MDE | paper | verdict |"]
    lines.append("|---|---|---:|---|---:|---:|---|---|")
    for c in summary["comparisons"]:
        what = f"{variant_label(*c['a'])} − {variant_label(*c['b'])}"
        if c["metric_a"] != c["metric_b"]:
            what = f"{variant_label(*c['a'])}: fused − detector only"
        lines.append(
            f"| {c['mechanism']} | {what} | {c['mean']:+.1f} ± {c['std']:.1f} | {_ci(c)} | "
            f"{_num(c['p'], '.3f')} | {_num(c['mde'], '.1f')} | {c['paper_text']} | "
            f"{c['verdict']} |"
        )
    lines += ["", "| detector | " + " | ".join(COLUMNS) + " |"]
    lines.append("|---|" + "---:|" * len(COLUMNS))
    for r in summary["variants"]:
        cells = " | ".join(_pm(r[col]) for col in COLUMNS)
        lines.append(f"| {variant_label(r['backbone'], r['mode'], r['objectness'])} | {cells} |")
    lines += ["", "| backbone | retrieval R@1 (%) |", "|---|---:|"]
    for r in summary["retrieval"]:
        lines.append(f"| {variant_label(r['backbone'])} | {_pm(r)} |")
    if summary["curve"]:
        lines += [
            "",
            "| pretraining steps | detector | AP_r fused | AP_r det. only | AP_base det. only |",
        ]
        lines.append("|---:|---|---:|---:|---:|")
        for p in summary["curve"]:
            cells = " | ".join(
                _pm(p[c]) for c in ("AP_r fused", "AP_r det. only", "AP_base det. only")
            )
            lines.append(
                f"| {p['pretrain_step']} | {variant_label(p['backbone'], p['mode'])} | {cells} |"
            )
    noise = result.get("eval_noise")
    if noise:
        # In NOISE_IMAGES order (the JSON sorts keys as text), then "infinite".
        sizes = [str(m) for m in NOISE_IMAGES] + ["infinite"] if noise["comparisons"] else []
        lines += [
            "",
            f"| mechanism | std of Δ over seeds | which {noise['eval_images']} images were drawn "
            "(shared, std) | seed × image "
            "(std) | seeds' own (std) | " + " | ".join(f"MDE at {k} images" for k in sizes) + " |",
        ]
        lines.append("|---|---:|---:|---:|---:|" + "---:|" * len(sizes))
        for c in noise["comparisons"]:
            cells = " | ".join(_num(c["mde"][k], ".1f") for k in sizes)
            lines.append(
                f"| {c['mechanism']} | {c['std']:.1f} | {c['image_std']:.1f} | "
                f"{c['interaction_std']:.1f} | {c['seed_std']:.1f} | {cells} |"
            )
    q = summary["quality"]
    lines += [
        "",
        f"Finetuned detectors' box AP on base categories (detector only), averaged over "
        f"variants: {_num(q['finetuned_ap_base_mean'], '.1f')}; the quick-start pipeline's: "
        f"{q['quickstart_ap_base']:.1f}.",
        f"Runs finished: {meta['runs_finished']} of the {meta['runs_planned']} planned.",
        f"Seeds {meta['seeds']} (curve: {meta['curve_seeds']}); budget {json.dumps(meta['budget'], sort_keys=True)}; "
        f"wall time {meta['sweep_wall_minutes']:.1f} min over {len(meta['invocations'])} "
        f"invocation(s), {meta['run_seconds'] / 60:.1f} worker-minutes of runs.",
    ]
    return lines


README_BEGIN = "<!-- ablations:begin (generated by benchmarks/ablations.py from ablations.json) -->"
README_END = "<!-- ablations:end -->"


def readme_section(result: dict[str, Any]) -> str:
    """The README's generated block (between the markers, markers included)."""
    return "\n".join([README_BEGIN, *tables(result), README_END])


def update_readme(path: str, result: dict[str, Any]) -> None:
    """Replaces the generated block of README `path` (which must hold both markers)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no '{README_BEGIN}' ... '{README_END}' block to replace")
    text = text[:start] + readme_section(result) + text[end + len(README_END) :]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Ablations on the shapes world",
        "",
        f"Command: `{meta['command']}`  ",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        "Invocations that wrote here (finished runs are reused, not rerun):",
        "",
    ]
    for inv in meta["invocations"]:
        lines.append(
            f"- `{inv['command']}`: {inv['runs_trained']} runs trained, "
            f"{inv['wall_minutes']:.1f} min of wall time"
        )
    lines += ["", "Box AP in % (LVIS protocol); Δ = paired per-seed difference, mean ± std.", ""]
    return "\n".join(lines + tables(result)) + "\n"


def plot(result: dict[str, Any], out: str) -> None:
    """deltas.png (each comparison's mean and 95% CI, the paper's figure) and curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    comps = summary["comparisons"]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(comps) + 1.5))
    for i, c in enumerate(comps):
        y = len(comps) - 1 - i
        if c["ci95"] is not None:
            ax.plot(c["ci95"], [y, y], color="#4c72b0", lw=2)
        ax.plot(c["values"], [y] * len(c["values"]), "k.", ms=4, alpha=0.6)
        ax.plot([c["mean"]], [y], "o", color="#4c72b0")
        if c["paper"] is not None:
            ax.plot([c["paper"]], [y], "x", color="#dd8452", ms=9, mew=2)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(comps)), [c["mechanism"] for c in reversed(comps)], fontsize=8)
    ax.set_xlabel("Δ box AP_r (points): mean, 95% CI, seeds (dots); paper (x)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "deltas.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, MODES):
        for b, colour in (("cpe-focal", "#4c72b0"), ("nocpe-focal", "#999999")):
            pts = [p for p in summary["curve"] if p["backbone"] == b and p["mode"] == mode]
            if pts:
                x = [p["pretrain_step"] for p in pts]
                m = [p["AP_r fused"]["mean"] for p in pts]
                s = [p["AP_r fused"]["std"] for p in pts]
                ax.errorbar(
                    x, m, yerr=s, marker="o", capsize=3, color=colour, label=variant_label(b)
                )
        ax.set_title(f"backbone {mode}")
        ax.set_xlabel("pretraining steps")
    axes[0].set_ylabel("box AP_r fused (%), mean ± std")
    if axes[0].get_legend_handles_labels()[0]:  # a partial sweep may have no curve point yet
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=110)
    plt.close(fig)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "faster-coco-eval"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# ---- driver --------------------------------------------------------------------------------------
def _previous_invocations(out: str) -> list[dict[str, Any]]:
    path = os.path.join(out, "ablations.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(json.load(f)["meta"].get("invocations", []))


def write(out: str, records, plan: Plan, budget, mode: str, this, previous) -> dict[str, Any]:
    """Writes ablations.json / .md / deltas.png / curve.png into `out`; returns the JSON.

    `this`: this invocation (command, wall minutes, runs trained so far); `previous`: the
    invocations recorded before it.
    """
    invocations = list(previous) + [this]
    records = sorted(records, key=lambda r: r["run"]["name"])
    meta = dict(
        command=this["command"],
        mode=mode,
        seeds=list(plan.seeds),
        curve_seeds=list(plan.curve_seeds),
        plan=dataclasses.asdict(plan),
        comparisons=[dataclasses.asdict(c) for c in COMPARISONS],
        budget=budget,
        versions=versions(),
        cpus=os.cpu_count(),
        # Every invocation that trained runs into `out`, oldest first: the sweep's wall time is
        # their sum, and survives reruns that only regenerate the tables.
        invocations=invocations,
        sweep_wall_minutes=sum(i["wall_minutes"] for i in invocations if i["runs_trained"]),
        runs_planned=sum(len(x) for x in plan_runs(plan, budget)),
        runs_finished=len(records),
        run_seconds=sum(r["seconds"] for r in records),
    )
    result = dict(meta=meta, summary=summarise(records, plan, budget), runs=records)
    save(out, result)
    return result


def save(out: str, result: dict[str, Any]) -> None:
    """ablations.json (replaced atomically), ablations.md and the plots."""
    tmp = os.path.join(out, "ablations.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out, "ablations.json"))
    with open(os.path.join(out, "ablations.md"), "w") as f:
        f.write(markdown(result))
    plot(result, out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for runs/ and the result files")
    parser.add_argument("--mode", choices=sorted(PLANS), default="full")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR)")
    parser.add_argument("--readme", default=None, help="README whose generated block to update")
    parser.add_argument(
        "--readme_only",
        action="store_true",
        help="regenerate --readme from --out's ablations.json; run nothing",
    )
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if args.readme_only:
        if not args.readme:
            parser.error("--readme_only needs --readme")
        with open(os.path.join(out, "ablations.json")) as f:
            result = json.load(f)
        update_readme(args.readme, result)
        return result

    plan, budget = PLANS[args.mode], dict(BUDGETS[args.mode])
    os.makedirs(out, exist_ok=True)
    pre, det = plan_runs(plan, budget)
    check_finished(pre + det, budget, out)
    # Every worker: one XLA thread, one device (the sweep's parallelism is across runs). Other
    # XLA flags of the caller are kept.
    forced = (
        "--xla_force_host_platform_device_count=1",
        "--xla_cpu_multi_thread_eigen=false",
        "intra_op_parallelism_threads=1",
    )
    names = tuple(f.split("=")[0] for f in forced)
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(names)]
    os.environ["XLA_FLAGS"] = " ".join([*forced, *kept])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = "python benchmarks/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()

    # The world and tokenizer are built once, before the workers race to build them.
    from rovit_jax.data import sources

    sources.tokenizer_for(build_config(pre[0], budget, out, args.data_dir, plan))
    previous = _previous_invocations(out)
    trained: list[str] = []
    records: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {}

    def on_record(record: dict[str, Any]) -> None:
        # The files are rewritten after every finished run, so an interrupted sweep's results
        # so far are always on disk.
        records[record["run"]["name"]] = record
        done = [n for n in trained if n in records]
        this = dict(
            command=command,
            wall_minutes=(time.time() - t0) / 60.0,
            runs_trained=len(done),
            worker_minutes_trained=sum(records[n]["seconds"] for n in done) / 60.0,
        )
        result.update(write(out, records.values(), plan, budget, args.mode, this, previous))

    run_all(pre, budget, out, args.data_dir, plan, args.workers, trained, on_record)
    run_all(det, budget, out, args.data_dir, plan, args.workers, trained, on_record)
    result["eval_noise"] = eval_noise(out, list(records.values()), plan, budget, args.data_dir)
    save(out, result)
    print(markdown(result))
    if args.readme:
        with open(os.path.join(out, "ablations.json")) as f:
            update_readme(args.readme, json.load(f))  # rendered from the file, as the test reads it
    return result


if __name__ == "__main__":
    main()
