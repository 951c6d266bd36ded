"""`benchmarks/accelerator_check.py`: its small mode end to end on 2 CPU devices (a subprocess,
as a user runs it), and its batch-size choice against compiled memory."""

import json
import os
import subprocess
import sys
import types

import pytest
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import accelerator_check  # noqa: E402


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accelerator_check")
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), TFDS_DATA_DIR=str(tmp / "tfds"))
    cmd = [sys.executable, "benchmarks/accelerator_check.py", "--small", f"--json={tmp}/c.json"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp / "c.json") as f:
        return json.load(f), proc.stdout


def test_small_mode_reports_every_section(small_report):
    report, stdout = small_report
    device = report["device"]
    assert device["backend"] == "cpu" and device["devices"] == 2 and device["memory_bytes"] > 0
    assert report["matmul"]["n"] == 256
    assert report["matmul"]["bfloat16"] > 0 and report["matmul"]["float32"] > 0
    cases = [r["case"] for r in report["steps"]]
    assert [c.split()[0] for c in cases] == ["pretrain", "detect"]
    budget = report["memory_fraction"] * device["memory_bytes"] / accelerator_check.GIB
    for row in report["steps"]:
        # The batch is split over both devices, with the recommended options, and fits.
        assert row["global_batch"] == 2 * row["per_device_batch"]
        assert row["compute_dtype"] == "bfloat16" and row["attention"] == "auto"
        assert 0 < row["estimate_gib"] <= budget
        assert row["step_s"] > 0 and row["images_per_s"] == pytest.approx(
            row["global_batch"] / row["step_s"]
        )
        assert row["model_tflop_per_step"] > 0 and row["mfu_measured"] > 0
        assert row["measured_peak_gib"] is None  # the CPU backend reports no peak
    pretrain, detect = report["steps"]
    assert pretrain["per_device_batch"] == 2 and pretrain["remat"] == "dots"
    assert pretrain["scan_layers"]
    assert detect["per_device_batch"] == 1 and detect["remat"] == "none"
    assert [r["pipeline"].split()[0] for r in report["input"]] == ["pretraining", "detection"]
    assert all(r["images_per_s"] > 0 for r in report["input"])
    for case in cases:  # the printed table names every case
        assert case in stdout


def _fake_compiled(nbytes):
    memory = types.SimpleNamespace(
        argument_size_in_bytes=nbytes // 2,
        output_size_in_bytes=nbytes // 4,
        alias_size_in_bytes=nbytes // 4,
        temp_size_in_bytes=nbytes - nbytes // 2,
    )
    return types.SimpleNamespace(memory_analysis=lambda: memory)


def test_batch_choice_halves_until_the_step_fits():
    """Memory growing with the batch: the largest size under the budget is taken, trying sizes
    largest first and stopping there; the smallest is taken (marked) when none fits."""
    built = []

    def build(per_device):
        built.append(per_device)
        return (None, None, None, _fake_compiled(1000 * per_device + 500), 0.0)

    sizes = [64, 32, 16, 8, 4, 2, 1]
    per_device, result, tries = accelerator_check.fit_batch(build, sizes, budget_bytes=10_000)
    assert per_device == 8 and built == [64, 32, 16, 8]
    assert accelerator_check.compiled_bytes(result[3]) == 8500
    assert [t["fits"] for t in tries] == [False, False, False, True]
    built.clear()
    per_device, _, tries = accelerator_check.fit_batch(build, sizes, budget_bytes=100)
    assert per_device == 1 and built == sizes and not any(t["fits"] for t in tries)
