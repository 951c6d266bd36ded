"""End-to-end pretraining: config errors, sharded == single-device, exact resume, the CLI run."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import xla_flags

from rovit_jax.config_files import apply_overrides, load_config
from rovit_jax.tasks import get_task
from rovit_jax.train import loop
from rovit_jax.train import mesh as mesh_lib
from rovit_jax.train.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(arg="tiny"):
    return load_config(f"shapes_pretrain:{arg}" if arg else "shapes_pretrain")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _tiny(data_dir, **overrides):
    c = _load_config("tiny")
    c.data.data_dir = data_dir
    c.async_checkpointing = False
    apply_overrides(c, overrides)
    return c


# ---- bad input: one clear error naming the config key, before anything compiles ---------------
@pytest.mark.parametrize(
    "key,value,match",
    [
        ("pp.image_size", 36, "pp.image_size"),  # patch 8 does not divide 36
        ("loss.kind", "hinge", "loss.kind"),
        ("model.image.pool_type", "max", "model.image.pool_type"),
        ("model.text.pool_type", "cls", "model.text.pool_type"),
        ("cpe.scale", (0.0, 1.0), "cpe.scale"),
        ("cpe.scale", (0.5, 1.5), "cpe.scale"),
    ],
)
def test_bad_config_is_named_at_construction(key, value, match, data_dir):
    with pytest.raises(ValueError, match=match):
        get_task(_tiny(data_dir, **{key: value}))


def test_batch_not_divisible_by_data_axis_fails_before_compiling(data_dir, tmp_path, monkeypatch):
    config = _tiny(data_dir, batch_size=12)  # 8 devices on the data axis
    task = get_task(config)

    def no_trainer(*a, **k):
        raise AssertionError("the trainer (and compilation) must not be reached")

    monkeypatch.setattr(loop, "Trainer", no_trainer)
    with pytest.raises(ValueError, match="batch_size"):
        loop.run(config, str(tmp_path), task)


# ---- sharded train step == single-device train step -------------------------------------------
def _synthetic_batches(config, steps, seed=0):
    rng = np.random.default_rng(seed)
    b, s, length = config.batch_size, config.pp.image_size, config.tokenizer.max_len
    out = []
    for _ in range(steps):
        tokens = rng.integers(4, 200, size=(b, length)).astype(np.int32)
        tokens[:, 0] = 1
        tokens[:, length // 2 :] = 0
        out.append({"image": rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32), "text": tokens})
    return out


@pytest.mark.parametrize("loss", ["focal", "softmax"])
def test_sharded_step_matches_single_device(loss, data_dir):
    config = _tiny(data_dir, **{"loss.kind": loss, "fsdp_min_size": 0, "batch_size": 16})
    batches = _synthetic_batches(config, 3)
    results = {}
    for name, axes, devices in [
        ("single", [("data", 1), ("fsdp", 1)], jax.devices()[:1]),
        ("sharded", [("data", 4), ("fsdp", 2)], jax.devices()),
    ]:
        mesh = mesh_lib.make_mesh(axes, devices)
        task = get_task(config)
        task.validate(mesh)
        trainer = Trainer(config, task, mesh)
        state = trainer.init_state()
        losses = []
        for b in batches:
            state, metrics = trainer.train_step(state, trainer.global_batch(b))
            losses.append(float(metrics["loss"]))
        results[name] = (jax.device_get(state["params"]), losses, state, task)
    single, sharded = results["single"], results["sharded"]
    assert sharded[3]._use_chunked() and not single[3]._use_chunked()
    # Parameters really are sharded over fsdp in the sharded run.
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(sharded[2]["params"])}
    assert any("fsdp" in s for s in specs), specs
    np.testing.assert_allclose(sharded[1], single[1], rtol=1e-5)
    from rovit_jax.train.mesh import tree_paths

    for path, a, b in zip(
        tree_paths(single[0]), jax.tree.leaves(sharded[0]), jax.tree.leaves(single[0])
    ):
        if path.endswith("key/bias"):
            # Softmax attention is invariant to the key bias, so its exact gradient is zero and Adam
            # turns pure rounding noise into lr-sized steps: only check it stayed that small.
            assert np.abs(a).max() < 3 * config.optim.lr * len(batches)
            continue
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=path)


# ---- stop and resume -------------------------------------------------------------------------
class _Recording:
    """Wraps a task's train batches to record which dataset examples each step used."""

    def __init__(self, task, log):
        self.task, self.log = task, log
        self._orig = task.train_batches

        def train_batches(pi, pc):
            batches = self._orig(pi, pc)
            orig_batch = batches.batch

            def batch(step):
                log.append((step, batches.positions(step)))
                return orig_batch(step)

            batches.batch = batch
            return batches

        task.train_batches = train_batches


def test_stop_and_resume_equals_straight_run(data_dir, tmp_path):
    config = _tiny(data_dir, total_steps=6, checkpoint_every=100)
    straight_log, resumed_log = [], []
    task = get_task(config)
    _Recording(task, straight_log)
    straight = loop.run(config, str(tmp_path / "straight"), task)

    task = get_task(config)
    _Recording(task, resumed_log)
    first = loop.run(config, str(tmp_path / "resumed"), task, stop_after=3)
    assert first["start_step"] == 0 and int(first["state"]["step"]) == 3
    task = get_task(config)
    _Recording(task, resumed_log)
    second = loop.run(config, str(tmp_path / "resumed"), task)
    assert second["start_step"] == 3

    assert [s for s, _ in resumed_log] == list(range(6)) == [s for s, _ in straight_log]
    assert resumed_log == straight_log  # same examples, same order
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        straight["state"]["params"],
        second["state"]["params"],
    )


def test_resume_refuses_changed_batch_size(data_dir, tmp_path):
    config = _tiny(data_dir, total_steps=4)
    loop.run(config, str(tmp_path), get_task(config), stop_after=2)
    changed = _tiny(data_dir, total_steps=4, batch_size=32)
    with pytest.raises(ValueError, match="batch_size"):
        loop.run(changed, str(tmp_path), get_task(changed))


# ---- the command line on the shapes world ----------------------------------------------------
def _scalars(workdir, tag):
    from tensorboard.backend.event_processing import event_accumulator

    events = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert events, f"no TensorBoard events in {workdir}"
    acc = event_accumulator.EventAccumulator(events[0], size_guidance={"tensors": 0})
    acc.Reload()
    import tensorflow as tf

    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def test_main_cli_tiny_run(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [
        sys.executable,
        "-m",
        "rovit_jax.main",
        f"--config={os.path.join(REPO, 'configs', 'shapes_pretrain.py')}:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.total_steps=30",
    ]
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final evaluation at step 30" in proc.stdout and "t2i_recall@1" in proc.stdout
    steps = sorted(
        int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*"))
    )
    assert steps and steps[-1] == 30
    losses = [v for _, v in _scalars(workdir, "train/loss")]
    assert len(losses) >= 10
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    recall = _scalars(workdir, "eval/t2i_recall@5")
    assert recall and recall[-1][0] == 30
