"""Numerical guards and checkpoint integrity, in process on the tiny pretraining config.

NaN is injected through the data: a task wrapper fills chosen batches with NaN pixels, so the
loss and gradients of exactly those steps are non-finite.
"""

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rovit_jax.config_files import apply_overrides, load_config
from rovit_jax.tasks import get_task
from rovit_jax.train import guards, loop
from rovit_jax.train import mesh as mesh_lib
from rovit_jax.train.checkpoint import Checkpointer, abstract_with_shardings, load_params
from rovit_jax.train.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(data_dir, **overrides):
    c = load_config("shapes_pretrain:tiny")
    c.data.data_dir = data_dir
    c.async_checkpointing = False
    c.log_every = 1
    apply_overrides(c, overrides)
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_reliability"))


def _nan_task(config, nan_batches):
    """The pretraining task, with NaN images in the batches of the given (0-based) indices."""
    task = get_task(config)
    orig = task.train_batches

    def train_batches(pi, pc):
        batches = orig(pi, pc)
        orig_batch = batches.batch

        def batch(step):
            b = orig_batch(step)
            if step in nan_batches:
                b = dict(b, image=np.full_like(b["image"], np.nan))
            return b

        batches.batch = batch
        return batches

    task.train_batches = train_batches
    return task


def _host(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def _all_finite_np(tree):
    return all(
        np.all(np.isfinite(x)) for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.inexact)
    )


def _event_scalars(workdir, tag):
    """{step: value} of a scalar over every TensorBoard event file of `workdir` (all runs)."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
        acc.Reload()
        if tag in acc.Tags()["tensors"]:
            for e in acc.Tensors(tag):
                out[e.step] = float(tf.make_ndarray(e.tensor_proto))
    return out


# ---- pure pieces -------------------------------------------------------------------------------
def test_all_finite_matches_numpy():
    rng = np.random.default_rng(0)
    base = {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "b": [rng.normal(size=5).astype(np.float32), np.arange(4, dtype=np.int32)],
        "c": np.ones((), jnp.bfloat16),
    }
    assert bool(guards.all_finite(base))
    for leaf, bad in [("a", np.nan), ("a", np.inf), ("c", -np.inf)]:
        tree = jax.tree.map(np.copy, base)
        tree[leaf].reshape(-1)[-1] = bad
        assert not bool(guards.all_finite(tree)), (leaf, bad)
    assert bool(guards.all_finite({"only_ints": np.arange(3)}))
    assert bool(guards.all_finite({}))


@pytest.mark.parametrize(
    "guard,match",
    [
        (dict(policy="ignore"), "guard.policy"),
        (dict(max_consecutive=-1), "guard.max_consecutive"),
        (dict(max_consecutive=2.5), "guard.max_consecutive"),
    ],
)
def test_guard_config_errors_name_the_key(guard, match):
    config = ml_collections.ConfigDict(
        {"guard": dict(dict(policy="skip", max_consecutive=3), **guard)}
    )
    with pytest.raises(ValueError, match=match):
        guards.GuardConfig.from_config(config)


def test_guard_config_defaults_when_absent():
    g = guards.GuardConfig.from_config(ml_collections.ConfigDict({"seed": 0}))
    assert (g.policy, g.max_consecutive) == ("skip", 10)


# ---- skipping a NaN step inside training -------------------------------------------------------
def test_nan_step_is_skipped_and_training_continues(data_dir, tmp_path):
    """Batch 2 (step 3) is NaN: step 3 leaves params/opt_state as they were after step 2."""
    config = _tiny(
        data_dir,
        total_steps=6,
        checkpoint_every=1,
        keep_checkpoints=10,
        **{"guard.max_consecutive": 2},
    )
    workdir = str(tmp_path / "run")
    final = loop.run(config, workdir, _nan_task(config, {2}))
    state = _host(final["state"])
    assert int(state["step"]) == 6
    assert int(state["skipped_updates"]) == 1 and int(state["consecutive_nonfinite"]) == 0

    # The checkpoints of steps 2 and 3, restored in full with a separately built trainer.
    mesh = mesh_lib.make_mesh([tuple(a) for a in config.mesh])
    task = get_task(config)
    task.validate(mesh)
    trainer = Trainer(config, task, mesh)
    abstract = abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    ckpt = Checkpointer(workdir, read_only=True)
    assert ckpt.all_steps() == [1, 2, 3, 4, 5, 6]
    before, after = (_host(ckpt.restore(s, abstract)[0]) for s in (2, 3))
    ckpt.close()
    assert int(before["skipped_updates"]) == 0
    assert int(after["step"]) == 3
    assert int(after["skipped_updates"]) == 1 and int(after["consecutive_nonfinite"]) == 1
    _assert_trees_equal(after["params"], before["params"])
    _assert_trees_equal(after["opt_state"], before["opt_state"])
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(after["params"]))
    ]
    assert sum(changed) > len(changed) // 2  # Training went on after the skipped step.

    # Reference: the skip is exactly "keep the state of step 2, advance the step", then three
    # ordinary steps on batches 3..5.
    ref = dict(
        before,
        step=np.int32(3),
        skipped_updates=np.int32(1),
        consecutive_nonfinite=np.int32(1),
    )
    ref = jax.device_put(ref, trainer.state_shardings)
    batches = task.train_batches(0, 1)
    for i in range(3, 6):
        ref, metrics = trainer.train_step(ref, trainer.global_batch(batches.batch(i)))
        assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    _assert_trees_equal(state["params"], _host(ref["params"]))

    # The final checkpoint holds these finite parameters.
    params, step = load_params(workdir)
    assert step == 6 and _all_finite_np(params)
    _assert_trees_equal(params, state["params"])

    # Metrics: train/nonfinite flags step 3 only; train/skipped_updates counts it from then on.
    nonfinite = _event_scalars(workdir, "train/nonfinite")
    skipped = _event_scalars(workdir, "train/skipped_updates")
    assert nonfinite == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 0.0, 6: 0.0}
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}
    assert np.isnan(_event_scalars(workdir, "train/loss")[3])


def _checkpoint_steps(workdir):
    return sorted(
        int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*"))
    )


def _assert_checkpoints_finite(workdir):
    for step in _checkpoint_steps(workdir):
        params, _ = load_params(workdir, step)
        assert _all_finite_np(params), step


def test_halt_policy_stops_at_first_nonfinite_step(data_dir, tmp_path):
    config = _tiny(
        data_dir,
        total_steps=6,
        checkpoint_every=2,
        **{"guard.policy": "halt", "guard.max_consecutive": 2},
    )
    workdir = str(tmp_path / "halt")
    with pytest.raises(FloatingPointError, match=r"at step 3 \(guard.policy='halt'\)"):
        loop.run(config, workdir, _nan_task(config, {2}))
    # Step 2 was saved before the NaN; nothing after it.
    assert _checkpoint_steps(workdir) == [2]
    _assert_checkpoints_finite(workdir)


def test_skip_policy_stops_after_max_consecutive(data_dir, tmp_path):
    """NaN in batches 2 and 3: the second non-finite step in a row (step 4) stops the run,
    before step 4 (a checkpoint step) is saved."""
    config = _tiny(data_dir, total_steps=6, checkpoint_every=2, **{"guard.max_consecutive": 2})
    workdir = str(tmp_path / "skip")
    with pytest.raises(FloatingPointError, match="2 consecutive non-finite steps ending at step 4"):
        loop.run(config, workdir, _nan_task(config, {2, 3}))
    assert _checkpoint_steps(workdir) == [2]
    _assert_checkpoints_finite(workdir)


def test_non_finite_parameters_are_never_checkpointed(data_dir, tmp_path):
    """A parameter the loss never reads starts as NaN: every update is skipped, and the first
    checkpoint is refused rather than written."""
    config = _tiny(data_dir, total_steps=4, checkpoint_every=2, **{"guard.max_consecutive": 0})
    task = get_task(config)
    init, loss_fn = task.init_params, task.loss_fn

    def init_params(rng):
        return dict(init(rng), poisoned=jnp.full((3,), jnp.nan))

    def loss(params, batch, rng):
        return loss_fn({k: v for k, v in params.items() if k != "poisoned"}, batch, rng)

    task.init_params, task.loss_fn = init_params, loss
    workdir = str(tmp_path / "poisoned")
    with pytest.raises(FloatingPointError, match="refusing to checkpoint step 2"):
        loop.run(config, workdir, task)
    assert _checkpoint_steps(workdir) == []


# ---- checkpoint integrity ----------------------------------------------------------------------
def _small_state(step):
    return {
        "params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3) + step},
        "step": np.asarray(step, np.int32),
    }


def _abstract(state):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _write_steps(workdir, steps):
    ckpt = Checkpointer(workdir, keep=10, async_save=False)
    for s in steps:
        ckpt.save(s, _small_state(s), {"next_step": s})
    ckpt.close()


def test_half_written_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    workdir = str(tmp_path)
    _write_steps(workdir, [1, 2, 3])
    root = os.path.join(workdir, "checkpoints")
    # A save killed before its rename, a step directory without commit marker, and step 3 with
    # its array data truncated to nothing (complete-looking, but unreadable).
    tmp = os.path.join(root, "5.orbax-checkpoint-tmp-1700000000000000")
    shutil.copytree(os.path.join(root, "3"), tmp)
    shutil.copytree(os.path.join(root, "3"), os.path.join(root, "4"))
    os.remove(os.path.join(root, "4", "commit_success.txt"))
    truncated = 0
    for dirpath, _, files in os.walk(os.path.join(root, "3", "state")):
        for f in files:
            if "ocdbt.process" in dirpath or f.startswith("manifest"):
                open(os.path.join(dirpath, f), "wb").close()
                truncated += 1
    assert truncated

    # Read-only loading (what detection does with a pretraining run) moves nothing.
    with caplog.at_level(logging.WARNING):
        params, step = load_params(workdir)
    assert step == 2
    np.testing.assert_array_equal(params["w"], _small_state(2)["params"]["w"])
    assert os.path.isdir(tmp) and os.path.isdir(os.path.join(root, "4"))

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ckpt = Checkpointer(workdir, keep=10, async_save=False)
        restored = ckpt.restore_latest(_abstract(_small_state(0)))
    assert restored is not None
    step, state, input_state = restored
    assert step == 2 and input_state == {"next_step": 2}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), _small_state(2)["params"]["w"])
    text = caplog.text
    for name in (os.path.basename(tmp), os.path.join(root, "4"), os.path.join(root, "3")):
        assert name in text, (name, text)
    # The unusable step directories are set aside, so their steps can be saved again.
    aside = os.path.join(workdir, "unusable_checkpoints")
    assert sorted(os.listdir(aside)) == ["3.0", "4.0"]
    ckpt.save(3, _small_state(3), {"next_step": 3})
    ckpt.save(4, _small_state(4), {"next_step": 4})
    ckpt.close()
    assert not os.path.exists(tmp)  # orbax's cleanup of interrupted saves
    ckpt = Checkpointer(workdir, keep=10, async_save=False)
    step, state, _ = ckpt.restore_latest(_abstract(_small_state(0)))
    ckpt.close()
    assert step == 4
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), _small_state(4)["params"]["w"])


def test_nothing_usable_means_a_fresh_start(tmp_path, caplog):
    workdir = str(tmp_path)
    _write_steps(workdir, [1])
    root = os.path.join(workdir, "checkpoints")
    os.rename(os.path.join(root, "1"), os.path.join(root, "1.orbax-checkpoint-tmp-17"))
    with caplog.at_level(logging.WARNING):
        ckpt = Checkpointer(workdir, async_save=False)
        assert ckpt.restore_latest(_abstract(_small_state(0))) is None
        ckpt.close()
    assert "1.orbax-checkpoint-tmp-17" in caplog.text
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_params(workdir)


def test_checkpoint_without_guard_counters_restores_with_zero_counters(tmp_path):
    workdir = str(tmp_path)
    _write_steps(workdir, [7])  # {"params", "step"}: written before the guard existed
    new_state = dict(
        _small_state(0), skipped_updates=np.int32(0), consecutive_nonfinite=np.int32(0)
    )
    ckpt = Checkpointer(workdir, async_save=False)
    with pytest.raises(ValueError, match=r"skipped_updates.*incompatible version"):
        ckpt.restore(7, _abstract(new_state))
    state, input_state = ckpt.restore(
        7, _abstract(new_state), optional={k: np.zeros((), np.int32) for k in guards.COUNTER_KEYS}
    )
    ckpt.close()
    assert input_state == {"next_step": 7}
    assert int(state["step"]) == 7
    assert int(state["skipped_updates"]) == 0 and int(state["consecutive_nonfinite"]) == 0
    assert state["skipped_updates"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), _small_state(7)["params"]["w"])
