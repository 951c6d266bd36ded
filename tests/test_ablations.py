"""The ablation sweep (benchmarks/ablations.py) in its small mode, end to end, in a subprocess.

One seed and one loss keep it to 7 tiny runs: pretraining with and without CPE, each backbone
finetuned frozen and at 0.1x learning rate, and binary objectness on the best backbone. The
summary, the deltas and the tables are re-derived here from the per-run records; the frozen
probe must leave the pretrained image tower untouched.
"""

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


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    data_dir = tmp_path_factory.mktemp("tfds_ablations")
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "ablations.py"),
        f"--out={out}",
        "--mode=small",
        "--seeds=0",
        "--losses=focal",
        "--workers=1",
        f"--data_dir={data_dir}",
    ]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "ablations.json") as f:
        return out, json.load(f), cmd, env


def test_sweep_runs_every_variant_once(sweep):
    _, result, _, _ = sweep
    names = sorted(r["run"]["name"] for r in result["runs"])
    assert names == sorted(
        [
            "pretrain/cpe-focal/seed0",
            "pretrain/nocpe-focal/seed0",
            "detect/cpe-focal/frozen-centerness/seed0",
            "detect/nocpe-focal/frozen-centerness/seed0",
            "detect/cpe-focal/finetune-centerness/seed0",
            "detect/nocpe-focal/finetune-centerness/seed0",
            f"detect/{_best(result)}-focal/finetune-binary/seed0",
        ]
    )
    for r in result["runs"]:
        for v in r["metrics"].values():
            assert np.isfinite(v)
    meta = result["meta"]
    assert meta["seeds"] == [0] and meta["budget"]["tiny"] is True
    assert "jax" in meta["versions"] and "--mode=small" in meta["command"]


def _best(result):
    return "cpe" if result["summary"]["best_backbone"]["cpe"] else "nocpe"


def _records(result):
    return {r["run"]["name"]: r["metrics"] for r in result["runs"]}


def test_summary_and_deltas_rederived_from_the_runs(sweep):
    out, result, _, _ = sweep
    rec = _records(result)
    rows = result["summary"]["rows"]
    assert len(rows) == 5
    for row in rows:
        variant = f"{'cpe' if row['cpe'] else 'nocpe'}-{row['loss']}"
        det = rec[f"detect/{variant}/{row['mode']}-{row['objectness']}/seed0"]
        pre = rec[f"pretrain/{variant}/seed0"]
        assert row["AP_r"]["mean"] == pytest.approx(100 * det["fused/bbox/APr"])
        assert row["AP_base (det. only)"]["mean"] == pytest.approx(
            100 * det["detector_only/bbox/AP_base"]
        )
        r1 = 50 * (pre["i2t_recall@1"] + pre["t2i_recall@1"])
        assert row["R@1"]["mean"] == pytest.approx(r1)
    # The best backbone is the finetuned variant with the highest detector-only AP_r.
    finetuned = [r for r in rows if r["mode"] == "finetune" and r["objectness"] == "centerness"]
    best = max(finetuned, key=lambda r: r["AP_r (det. only)"]["mean"])
    assert result["summary"]["best_backbone"] == dict(cpe=best["cpe"], loss=best["loss"])
    for key, metric in (("deltas", "fused"), ("deltas_detector_only", "detector_only")):
        deltas = {d["comparison"]: d for d in result["summary"][key]}
        for mode in ("frozen", "finetune"):
            d = deltas[f"{mode}: CPE + focal vs no CPE + focal"]
            want = 100 * (
                rec[f"detect/cpe-focal/{mode}-centerness/seed0"][f"{metric}/bbox/APr"]
                - rec[f"detect/nocpe-focal/{mode}-centerness/seed0"][f"{metric}/bbox/APr"]
            )
            assert d["values"] == [pytest.approx(want)]
    # The markdown table shows the JSON's numbers; the plot is a real image.
    table = (out / "ablations.md").read_text()
    for row in rows:
        assert f"{row['AP_r']['mean']:.2f} ± {row['AP_r']['std']:.2f}" in table
    with Image.open(out / "ablations.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_frozen_probe_keeps_the_pretrained_backbone(sweep):
    out, _, _, _ = sweep
    runs = out / "runs"
    pretrained, _ = load_params(str(runs / "pretrain/cpe-focal/seed0"))
    frozen, _ = load_params(str(runs / "detect/cpe-focal/frozen-centerness/seed0"))
    tuned, _ = load_params(str(runs / "detect/cpe-focal/finetune-centerness/seed0"))
    same = jax.tree.map(np.array_equal, frozen["backbone"], pretrained["img"])
    assert all(jax.tree.leaves(same))
    moved = jax.tree.map(np.array_equal, tuned["backbone"], pretrained["img"])
    assert not all(jax.tree.leaves(moved))


def test_rerun_resumes_from_finished_runs(sweep):
    out, result, cmd, env = sweep
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[ablations]" not in r.stdout  # no run was trained again
    with open(out / "ablations.json") as f:
        again = json.load(f)
    assert _records(again) == _records(result)
    # The first invocation's measured time survives the rerun, which trained nothing.
    first, rerun = again["meta"]["invocations"]
    assert first == result["meta"]["invocations"][0]
    assert first["runs_trained"] == 7 and rerun["runs_trained"] == 0
    assert first["wall_minutes"] == result["meta"]["wall_minutes"]
    assert first["worker_minutes_trained"] == pytest.approx(
        sum(r["seconds"] for r in result["runs"]) / 60
    )


def test_a_run_made_with_another_budget_is_not_reused(sweep):
    out, _, cmd, env = sweep
    path = out / "runs/detect/cpe-focal/frozen-centerness/seed0/result.json"
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
    assert "[ablations]" not in r.stdout  # it stopped before training anything


def _driver():
    spec = importlib.util.spec_from_file_location(
        "ablations_driver", os.path.join(REPO, "benchmarks", "ablations.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_statistics_on_constructed_records_match_scipy():
    """The driver's summary, paired deltas and verdicts on made-up records of 4 seeds, against
    numpy and scipy (no training: the pure part of the sweep)."""
    from scipy import stats

    ab = _driver()
    rng = np.random.default_rng(0)
    seeds = [0, 1, 2, 3]
    # AP_r per (cpe, loss, mode, objectness, seed): CPE adds 5 points with noise 1, focal 0.
    records, table = [], {}
    for cpe in (True, False):
        for loss in ("focal", "softmax"):
            for seed in seeds:
                recall = {"i2t_recall@1": rng.uniform(), "t2i_recall@1": rng.uniform()}
                run = ab.pretrain_run(cpe, loss, seed)
                records.append({"run": vars(run), "metrics": recall})
                for mode in ("frozen", "finetune"):
                    for obj in ("centerness", "binary"):
                        ap = 0.10 + 0.05 * cpe + 0.01 * rng.normal()
                        table[(cpe, loss, mode, obj, seed)] = 100 * ap
                        metrics = {key: ap for _, key in ab.METRICS.values() if key != "recall@1"}
                        run = ab.detect_run(cpe, loss, seed, mode, obj)
                        records.append({"run": vars(run), "metrics": metrics})

    rows = ab.summarise(records)["rows"]
    row = next(
        r
        for r in rows
        if r["cpe"]
        and r["loss"] == "focal"
        and r["mode"] == "frozen"
        and r["objectness"] == "centerness"
    )
    want = [table[(True, "focal", "frozen", "centerness", s)] for s in seeds]
    assert row["AP_r"]["mean"] == pytest.approx(np.mean(want))
    assert row["AP_r"]["std"] == pytest.approx(np.std(want, ddof=1))

    deltas = {d["comparison"]: d for d in ab.deltas(records, (True, "focal"))}
    for mode in ("frozen", "finetune"):
        cpe = deltas[f"{mode}: CPE + focal vs no CPE + focal"]
        diff = [
            table[(True, "focal", mode, "centerness", s)]
            - table[(False, "focal", mode, "centerness", s)]
            for s in seeds
        ]
        assert cpe["values"] == pytest.approx(diff)
        assert cpe["std"] == pytest.approx(np.std(diff, ddof=1))
        p = stats.ttest_rel(
            [table[(True, "focal", mode, "centerness", s)] for s in seeds],
            [table[(False, "focal", mode, "centerness", s)] for s in seeds],
        ).pvalue
        assert cpe["verdict"] == f"{'yes' if p < 0.05 else 'no'} (p = {p:.2f})"
        assert p < 0.05  # 5 points against noise of 1.4: detected
    assert "focal vs sigmoid" not in {d["mechanism"] for d in deltas.values()}  # no sigmoid runs
    assert deltas["finetune, CPE + focal: centerness vs binary"]["values"] == pytest.approx(
        [
            table[(True, "focal", "finetune", "centerness", s)]
            - table[(True, "focal", "finetune", "binary", s)]
            for s in seeds
        ]
    )
    assert ab.verdict([1.0]) == "n < 2" and ab.verdict([2.0, 2.0]) == "yes"
