"""The ablation sweep (benchmarks/ablations.py): its statistics on constructed records with known
answers, and its small mode end to end in a subprocess (the plan's runs, the tables re-derived
from the per-run records, frozen and curve detectors starting from the right checkpoints,
resuming, the README block generated from the JSON)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from rovit_jax.train.checkpoint import load_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _driver():
    spec = importlib.util.spec_from_file_location(
        "ablations_driver", os.path.join(REPO, "benchmarks", "ablations.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ab = _driver()


# ---- statistics on constructed records -----------------------------------------------------------
def test_paired_statistics_match_scipy():
    from scipy import stats

    a = np.array([31.0, 27.5, 35.2, 29.9, 33.1])
    b = np.array([28.2, 27.9, 30.1, 26.0, 31.5])
    got = ab.paired_stats(list(a - b))
    assert got["mean"] == pytest.approx(np.mean(a - b))
    assert got["std"] == pytest.approx(np.std(a - b, ddof=1))
    assert got["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    low, high = stats.t.interval(0.95, 4, loc=np.mean(a - b), scale=stats.sem(a - b))
    assert got["ci95"] == pytest.approx([low, high])
    one = ab.paired_stats([1.5])
    assert one["ci95"] is None and one["p"] is None and one["mde"] is None


def test_a_planted_effect_is_found_and_no_effect_mostly_is_not():
    rng = np.random.default_rng(0)
    planted = ab.paired_stats(list(3.0 + rng.normal(0, 1, 5)))
    assert planted["p"] < 0.05 and planted["ci95"][0] > 0
    assert ab.verdict(planted, paper=2.4) == "reproduced"
    assert ab.verdict(planted, paper=-1.0) == "contradicted"
    assert ab.verdict(planted, paper=None) == "positive"
    # No effect: a paired t-test at 5% rejects about 5% of the time.
    null = [ab.paired_stats(list(rng.normal(0, 1, 5)))["p"] for _ in range(400)]
    assert np.mean(np.array(null) > 0.05) > 0.9
    undecided = ab.paired_stats([0.5, -0.4, 0.2, -0.1, 0.3])
    assert ab.verdict(undecided, paper=2.4) == "undecided"


def test_minimum_detectable_effect_has_the_stated_power():
    """At the MDE, a simulated paired t-test at 5% rejects in about 80% of repetitions."""
    from scipy import stats

    n, std = 5, 2.0
    mde = ab.minimum_detectable_effect(std, n)
    # Larger than the z-approximation's (1.96 + 0.84) * std / sqrt(n): the t test pays for
    # estimating the std from 5 values.
    assert mde > 2.80 * std / np.sqrt(n)
    rng = np.random.default_rng(1)
    diffs = mde + rng.normal(0, std, (4000, n))
    p = stats.ttest_1samp(diffs, 0.0, axis=1).pvalue
    assert 0.77 < np.mean(p < 0.05) < 0.83
    assert ab.minimum_detectable_effect(std, 20) < mde  # more seeds detect smaller effects


def _lvis_case(rng, num_images: int = 12):
    """A small LVIS ground truth (one rare, one common, one frequent category) and noisy
    detections of every object plus a few false positives."""
    from rovit_jax.evaluation.detection import make_lvis_gt

    cats = [dict(id=1, frequency="r"), dict(id=2, frequency="c"), dict(id=3, frequency="f")]
    images = [dict(id=i + 1, height=100, width=100) for i in range(num_images)]
    anns, dets = [], []
    for im in images:
        for _ in range(rng.integers(1, 4)):
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(15, 40, 2)
            cat = int(rng.integers(1, 4))
            anns.append(dict(image_id=im["id"], category_id=cat, bbox=[x, y, w, h]))
            jitter = rng.normal(0, 4, 4)
            dets.append(
                dict(
                    image_id=im["id"],
                    category_id=cat,
                    bbox=[x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                    score=float(rng.uniform(0.3, 1.0)),
                )
            )
        dets.append(dict(image_id=im["id"], category_id=1, bbox=[5.0, 5.0, 20.0, 20.0], score=0.5))
    return make_lvis_gt(images, cats, anns), dets


def test_bootstrap_ap_r_redraws_the_evaluation_images():
    from rovit_jax.evaluation.detection import evaluate_lvis

    rng = np.random.default_rng(3)
    gt, dets = _lvis_case(rng)
    n = len(gt["images"])
    same = ab.bootstrap_ap_r(gt, dets, np.arange(n)[None])
    assert same[0] == pytest.approx(100 * evaluate_lvis(gt, dets)["APr"])
    # An image drawn twice: its copies count as two images, which leaves AP unchanged; and
    # alone, it scores as that image evaluated on its own.
    rare_images = {a["image_id"] for a in gt["annotations"] if a["category_id"] == 1}
    i = next(k for k, im in enumerate(gt["images"]) if im["id"] in rare_images)
    image_id = gt["images"][i]["id"]
    one = dict(gt, images=[gt["images"][i]])
    one["annotations"] = [a for a in gt["annotations"] if a["image_id"] == image_id]
    alone = 100 * evaluate_lvis(one, [d for d in dets if d["image_id"] == image_id])["APr"]
    twice = ab.bootstrap_ap_r(gt, dets, np.array([[i, i], [i, i]]))
    assert ab.bootstrap_ap_r(gt, dets, np.array([[i]]))[0] == pytest.approx(alone)
    assert twice == pytest.approx([alone, alone])
    perfect = [dict(a, score=1.0) for a in gt["annotations"]]
    draws = rng.integers(0, n, (5, n))
    assert np.all(ab.bootstrap_ap_r(gt, perfect, draws) == pytest.approx(100.0))


def test_noise_split_recovers_planted_variance_components():
    # d[s, b] = a_s + e_b + g_sb with known variances: e shared by the seeds, g not.
    rng = np.random.default_rng(0)
    n, draws = 5, 40000
    a = np.array([1.0, 3.0, 2.0, 4.0, 0.0])
    e = rng.normal(0, 2.0, draws)
    g = rng.normal(0, 1.0, (n, draws))
    diffs = list(a + g[:, 0])  # the measured set: one draw's shared effect is common to all
    split = ab.noise_split(diffs, a[:, None] + e[None, :] + g, eval_images=200)
    assert split["image_std"] == pytest.approx(2.0, rel=0.05)
    assert split["interaction_std"] == pytest.approx(1.0, rel=0.05)
    std = np.std(diffs, ddof=1)
    assert split["seed_std"] == pytest.approx(np.sqrt(max(std**2 - 1.0, 0)), rel=0.1)
    # More images shrink the MDE; with infinitely many only the seeds' own part is left.
    mde = split["mde"]
    assert mde["200"] > mde["500"] > mde["1000"] > mde["infinite"]
    assert mde["infinite"] == pytest.approx(ab.minimum_detectable_effect(split["seed_std"], n))


def test_noise_split_without_image_effects_is_the_t_tests_mde():
    diffs = [1.0, 3.0, 2.0, 4.0, 0.0]
    flat = np.repeat(np.asarray(diffs)[:, None], 7, axis=1)  # no bootstrap variation at all
    split = ab.noise_split(diffs, flat, eval_images=200)
    assert split["image_std"] == split["interaction_std"] == 0.0
    assert split["seed_std"] == pytest.approx(np.std(diffs, ddof=1))
    expected = ab.minimum_detectable_effect(np.std(diffs, ddof=1), 5)
    assert all(v == pytest.approx(expected) for v in split["mde"].values())


def _constructed_records(plan, budget, effect_of_cpe: float):
    """Records of `plan` with AP_r = 20 + effect_of_cpe (CPE backbones) + seed noise."""
    rng = np.random.default_rng(2)
    pre, det = ab.plan_runs(plan, budget)
    records = []
    for run in pre:
        recall = {"i2t_recall@1": rng.uniform(), "t2i_recall@1": rng.uniform()}
        records.append({"run": vars(run), "metrics": recall, "seconds": 1.0})
    for run in det:
        cpe, _ = ab.BACKBONES[run.backbone]
        ap = (20.0 + effect_of_cpe * cpe + rng.normal(0, 0.5)) / 100
        metrics = {key: ap for key in ab.COLUMNS.values()}
        metrics["detector_only/bbox/APr"] = ap - 0.05
        records.append({"run": vars(run), "metrics": metrics, "seconds": 1.0})
    return records


def test_summary_on_constructed_records():
    plan, budget = ab.PLANS["full"], ab.BUDGETS["full"]
    records = _constructed_records(plan, budget, effect_of_cpe=4.0)
    summary = ab.summarise(records, plan, budget)
    comps = {c["mechanism"]: c for c in summary["comparisons"]}
    assert list(comps) == [c.mechanism for c in ab.COMPARISONS]  # the plan, in its order
    frozen = comps["CPE, backbone frozen"]
    by_name = {r["run"]["name"]: r["metrics"] for r in records}
    final = budget["pretrain_steps"]
    want = [
        100
        * (
            by_name[f"detect/cpe-focal/pre{final}/frozen-centerness/seed{s}"]["fused/bbox/APr"]
            - by_name[f"detect/nocpe-focal/pre{final}/frozen-centerness/seed{s}"]["fused/bbox/APr"]
        )
        for s in plan.seeds
    ]
    assert frozen["values"] == pytest.approx(want) and frozen["verdict"] == "reproduced"
    assert comps["focal vs softmax loss"]["verdict"] == "undecided"  # both CPE: no effect
    assert comps["VLM score fusion vs detector only"]["mean"] == pytest.approx(5.0)
    # The curve: every planned point, 3 seeds each.
    steps = ab.curve_steps(plan, budget)
    assert steps == [200, 400]
    assert len(summary["curve"]) == 2 * 2 * 2
    assert all(p["seeds"] == [0, 1, 2] for p in summary["curve"])
    finetuned = [r for r in summary["variants"] if r["mode"] == "finetune"]
    assert summary["quality"]["finetuned_ap_base_mean"] == pytest.approx(
        np.mean([r["AP_base det. only"]["mean"] for r in finetuned])
    )


def test_plan_has_five_seeds_and_every_mechanism():
    plan = ab.PLANS["full"]
    pre, det = ab.plan_runs(plan, ab.BUDGETS["full"])
    assert len(plan.seeds) >= 5 and len(plan.curve_seeds) >= 3
    assert len(pre) == 4 * 5 and len(det) == 7 * 5 + 2 * 2 * 1 * 3
    planned = {d for d in plan.detectors}
    for c in ab.COMPARISONS:
        assert c.a in planned and c.b in planned


# ---- the small mode, end to end -----------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    data_dir = tmp_path_factory.mktemp("tfds_ablations")
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "ablations.py"),
        f"--out={out}",
        "--mode=small",
        "--workers=1",
        f"--data_dir={data_dir}",
    ]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "ablations.json") as f:
        return out, json.load(f), cmd, env


def test_sweep_runs_the_plan_once_and_rederives_its_tables(sweep):
    out, result, _, _ = sweep
    plan, budget = ab.PLANS["small"], ab.BUDGETS["small"]
    pre, det = ab.plan_runs(plan, budget)
    assert sorted(r["run"]["name"] for r in result["runs"]) == sorted(r.name for r in pre + det)
    for r in result["runs"]:
        assert all(np.isfinite(v) for v in r["metrics"].values())
    assert result["summary"] == json.loads(json.dumps(ab.summarise(result["runs"], plan, budget)))
    meta = result["meta"]
    assert meta["runs_finished"] == meta["runs_planned"] == len(pre + det)
    assert meta["seeds"] == [0] and meta["budget"] == budget and "jax" in meta["versions"]
    table = (out / "ablations.md").read_text()
    for row in result["summary"]["variants"]:
        assert ab._pm(row["AP_r fused"]) in table
    for name in ("deltas.png", "curve.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_frozen_and_curve_detectors_start_from_their_checkpoints(sweep):
    out, _, _, _ = sweep
    runs = out / "runs"
    final, half = ab.curve_steps(ab.PLANS["small"], ab.BUDGETS["small"])[::-1]
    pretrained, step = load_params(str(runs / "pretrain/cpe-focal/seed0"))
    assert step == final
    earlier, _ = load_params(str(runs / "pretrain/cpe-focal/seed0"), half)
    frozen, _ = load_params(str(runs / f"detect/cpe-focal/pre{final}/frozen-centerness/seed0"))
    tuned, _ = load_params(str(runs / f"detect/cpe-focal/pre{final}/finetune-centerness/seed0"))
    curve, _ = load_params(str(runs / f"detect/cpe-focal/pre{half}/frozen-centerness/seed0"))

    def same(a, b):
        return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))

    assert same(frozen["backbone"], pretrained["img"])
    assert not same(tuned["backbone"], pretrained["img"])
    assert same(curve["backbone"], earlier["img"]) and not same(earlier["img"], pretrained["img"])


def test_rerun_resumes_and_the_readme_block_is_the_json(sweep, tmp_path):
    out, result, cmd, env = sweep
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{ab.README_BEGIN}\nstale\n{ab.README_END}\n\nafter\n")
    r = subprocess.run(
        cmd + [f"--readme={readme}"], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[ablations]" not in r.stdout  # no run was trained again
    with open(out / "ablations.json") as f:
        again = json.load(f)
    assert again["runs"] == result["runs"]
    first, rerun = again["meta"]["invocations"]
    assert first == result["meta"]["invocations"][0] and rerun["runs_trained"] == 0
    assert again["meta"]["sweep_wall_minutes"] == pytest.approx(first["wall_minutes"])
    text = readme.read_text()
    assert ab.readme_section(again) in text and "stale" not in text
    assert text.startswith("# x\n\nbefore\n\n") and text.endswith("\n\nafter\n")


def test_a_run_made_with_another_budget_is_refused_before_training(sweep):
    out, _, cmd, env = sweep
    final = ab.BUDGETS["small"]["pretrain_steps"]
    path = out / f"runs/detect/cpe-focal/pre{final}/frozen-centerness/seed0/result.json"
    original = path.read_text()
    record = json.loads(original)
    record["budget"]["detect_steps"] += 1
    path.write_text(json.dumps(record))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    finally:
        path.write_text(original)
    assert r.returncode != 0
    assert str(path) in r.stderr and "detect_steps" in r.stderr
    assert "[ablations]" not in r.stdout


def test_readme_block_equals_the_committed_json():
    """The README's generated ablation block is exactly what the committed JSON renders."""
    with open(os.path.join(REPO, "benchmarks/results/ablations/ablations.json")) as f:
        result = json.load(f)
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert ab.readme_section(result) in readme
