"""Files in a bucket: the path layer and the training runs against a local GCS server.

Every test here talks to a real GCS JSON API (`gcp-storage-emulator`, started by the
`gcs_bucket` fixture in conftest.py) through the production clients: gcsfs for files, tensorstore
for orbax's arrays. Nothing is mocked.
"""

import os
import re
import subprocess
import sys
import uuid

import jax
import numpy as np
import pytest
import test_preemption
import test_recipes
from conftest import copy_tree, xla_flags
from tensorboard.backend.event_processing import event_accumulator

from rovit_jax import paths
from rovit_jax.train import checkpoint, preemption


def test_path_layer_reads_writes_lists_and_moves_in_a_bucket_as_on_disk(gcs_bucket, tmp_path):
    for root in (f"{gcs_bucket}/layer", str(tmp_path)):
        paths.write_json(f"{root}/a/b.json", {"x": 1})
        assert paths.read_json(f"{root}/a/b.json") == {"x": 1}
        assert paths.isdir(f"{root}/a") and paths.isfile(f"{root}/a/b.json")
        assert not paths.isfile(f"{root}/a") and not paths.exists(f"{root}/missing")
        assert paths.listdir(f"{root}/a") == ["b.json"]
        assert paths.glob(f"{root}/a/*.json") == [f"{root}/a/b.json"]
        assert paths.glob(f"{root}/a/*.txt") == []
        paths.rename(f"{root}/a", f"{root}/c")
        assert paths.listdir(f"{root}/c") == ["b.json"] and not paths.exists(f"{root}/a")
        with paths.open_file(f"{root}/c/t.txt", "w") as f:
            f.write("héllo")
        assert paths.read_text(f"{root}/c/t.txt") == "héllo"
        assert paths.size(f"{root}/c/t.txt") == len("héllo".encode())
        with paths.local_file(f"{root}/c/t.txt") as local:
            assert open(local, encoding="utf-8").read() == "héllo"
        paths.remove(f"{root}/c")
        assert not paths.exists(f"{root}/c/t.txt")
    assert not [name for name in os.listdir() if name.startswith("gs:")]  # no local "gs:" folder


# ---- training runs whose workdir and data are in the bucket ------------------------------------
# The real-format datasets of test_recipes (web shards, Karpathy JSON, COCO images, a
# SentencePiece model), uploaded to the bucket; every run below reads them from there.
files = test_recipes.files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    """The subprocesses' environment, read when they start: it holds the emulator's address."""
    return dict(
        os.environ,
        XLA_FLAGS=xla_flags(2),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        **extra,
    )


TOTAL, PERIOD = 12, 4  # configs/shapes_pretrain.py:tiny steps, and a checkpoint every 4


@pytest.fixture(scope="module")
def bucket(files, gcs_bucket):
    """The datasets' paths in the bucket, and the bucket folder of this module's runs."""
    root = f"{gcs_bucket}/runs_{uuid.uuid4().hex[:8]}"
    local = str(files["root"])
    copy_tree(local, f"{root}/data")
    data = {k: v.replace(local, f"{root}/data") for k, v in files.items() if isinstance(v, str)}
    return {"root": root, **data}


def _pretrain_cmd(bucket, workdir):
    return [
        sys.executable,
        "-m",
        "rovit_jax.main",
        f"--config={os.path.join(REPO, 'configs', 'shapes_pretrain.py')}:tiny",
        f"--workdir={workdir}",
        f"--config.checkpoint_every={PERIOD}",
        "--config.data.name=web_shards",
        f"--config.data.train_files={bucket['shards']}",
        f"--config.tokenizer.model_path={bucket['spm']}",
        "--config.data.eval.name=karpathy",
        f"--config.data.eval.annotations={bucket['karpathy']}",
        f"--config.data.eval.images={bucket['coco_images']}",
    ]


def _run(cmd, log_path):
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), timeout=900)
    return proc.returncode, open(log_path).read()


@pytest.fixture(scope="module")
def straight(bucket, tmp_path_factory):
    """An uninterrupted tiny pretraining run, its workdir and data in the bucket."""
    workdir = f"{bucket['root']}/straight"
    log = str(tmp_path_factory.mktemp("gcs_logs") / "straight.log")
    rc, text = _run(_pretrain_cmd(bucket, workdir), log)
    assert rc == 0, text[-4000:]
    # Nothing written to a local "gs:" folder (what a URL given to `open` would create).
    assert not [name for name in os.listdir() if name.startswith("gs:")]
    return workdir


def test_pretraining_writes_checkpoints_config_and_metrics_into_the_bucket(straight):
    assert paths.read_json(f"{straight}/config.json")["data"]["train_files"].startswith("gs://")
    steps = sorted(int(n) for n in paths.listdir(f"{straight}/checkpoints") if n.isdigit())
    assert steps == [TOTAL - PERIOD, TOTAL]  # keep_checkpoints=2 of the tiny config
    assert checkpoint.scan(f"{straight}/checkpoints") == (steps, [])  # all complete
    (events,) = [n for n in paths.listdir(straight) if ".tfevents." in n]
    with paths.local_file(f"{straight}/{events}") as local:
        acc = event_accumulator.EventAccumulator(local, size_guidance={"tensors": 0})
        acc.Reload()
    logged = [e.step for e in acc.Tensors("train/loss")]
    assert logged and logged[-1] == TOTAL


def test_sigterm_and_relaunch_resume_from_the_bucket_bit_identical(bucket, straight, tmp_path):
    """SIGTERM mid-run; plant a half-written step (as a save killed in a bucket leaves it: a step
    directory without its commit marker); the relaunch moves it aside, resumes from the step
    reached and ends on the straight run's parameters, bit for bit."""
    workdir = f"{bucket['root']}/interrupted"
    ckpts = f"{workdir}/checkpoints"
    launcher = tmp_path / "launch.py"
    launcher.write_text(test_preemption.LAUNCHER)  # slows the input: SIGTERM lands mid-run
    cmd = _pretrain_cmd(bucket, workdir)
    rc, text = test_preemption.sigterm_mid_run(
        [cmd[0], str(launcher), *cmd[3:]],
        str(tmp_path / "1_sigterm.log"),
        _env(TEST_BATCH_DELAY="0.5"),
    )
    assert rc == preemption.PREEMPTED_EXIT_CODE, text[-4000:]
    stopped = int(re.search(r"stopping on SIGTERM after step (\d+)", text).group(1))
    assert 0 < stopped < TOTAL
    assert checkpoint.scan(ckpts)[0][-1] == stopped

    # A half-written step above every other: the finished step's objects minus the marker.
    bad = f"{ckpts}/{TOTAL - 1}"
    done = f"{ckpts}/{stopped}"
    for name in paths.find(done):
        if name != f"{done}/{checkpoint.COMMIT_MARKER}":  # the save's last object
            paths.write_bytes(bad + name[len(done) :], paths.read_bytes(name))
    assert checkpoint.step_problem(bad) == f"no commit marker {checkpoint.COMMIT_MARKER}"
    half_written = paths.find(bad)

    rc, text = _run(cmd, str(tmp_path / "2_resume.log"))
    assert rc == 0, text[-4000:]
    warnings = [line for line in text.splitlines() if line.startswith("W")]
    assert any(bad in line and "moved aside" in line for line in warnings), warnings
    assert f"resumed from step {stopped}" in text
    aside = f"{workdir}/{checkpoint.UNUSABLE_DIR}/{TOTAL - 1}.0"
    assert paths.find(aside) == [f"{aside}{n[len(bad) :]}" for n in half_written]
    assert not paths.exists(bad)
    params, step = checkpoint.load_params(workdir)
    reference, ref_step = checkpoint.load_params(straight)
    assert step == ref_step == TOTAL
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)


def test_detection_trains_from_the_bucket_and_a_predictor_loads_it_from_there(
    bucket, straight, tmp_path
):
    """Detection finetuning whose pretraining run, COCO-format data and workdir are all in the
    bucket; `Predictor.from_checkpoint('gs://...')` then detects exactly as from a local copy."""
    from rovit_jax.inference.predictor import Predictor

    workdir = f"{bucket['root']}/detect"
    cmd = [
        sys.executable,
        "-m",
        "rovit_jax.main",
        f"--config={os.path.join(REPO, 'configs', 'shapes_detect.py')}:tiny",
        f"--workdir={workdir}",
        "--config.init.run_pretraining=False",
        f"--config.init.pretrain_workdir={straight}",
        "--config.data.name=coco",
        f"--config.data.train_annotations={bucket['instances']}",
        f"--config.data.train_images={bucket['coco_images']}",
        f"--config.data.eval_annotations={bucket['instances']}",
        f"--config.data.eval_images={bucket['coco_images']}",
    ]
    rc, text = _run(cmd, str(tmp_path / "detect.log"))
    assert rc == 0, text[-4000:]
    assert paths.isfile(f"{workdir}/detections_fused.json")

    local = str(tmp_path / "copy")
    copy_tree(workdir, local)
    image = f"{bucket['coco_images']}/{1:012d}.jpg"
    queries = ["person", "car", "bus"]
    got = Predictor.from_checkpoint(workdir).predict(image, queries, score_threshold=0.0)
    want = Predictor.from_checkpoint(local).predict(image, queries, score_threshold=0.0)
    assert len(got.boxes) > 0
    for field in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
