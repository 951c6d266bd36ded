"""Detection task end to end on a tiny shapes world: pretrain -> finetune -> LVIS-style eval."""

import os
import subprocess
import sys

import pytest
from conftest import xla_flags

from rovit_jax.config_files import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg="tiny"):
    return load_config(f"shapes_detect:{arg}" if arg else "shapes_detect")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_det"))


def test_cli_pretrain_finetune_evaluate(data_dir, tmp_path):
    workdir = str(tmp_path / "det")
    cmd = [
        sys.executable,
        "-m",
        "rovit_jax.main",
        f"--config={os.path.join(REPO, 'configs', 'shapes_detect.py')}:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
    ]
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| fused |" in proc.stdout and "| detector_only |" in proc.stdout, proc.stdout
    for name in (
        "detections.png",
        "detections_fused.json",
        "detections_detector_only.json",
        "pretrain/config.json",
    ):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "checkpoints"))
