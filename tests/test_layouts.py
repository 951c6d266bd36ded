"""Parallelism layouts: data, FSDP and tensor-parallel steps equal a single device; a checkpoint
written on one mesh restores onto another; scan/remat/bf16 options keep the model's function.

Tolerance for "sharded = unsharded" after 3 AdamW steps: rtol 2e-4, atol 2e-6 on every parameter
(float32; collectives reorder sums, so values agree to rounding, not bit for bit), except the
attention key biases whose exact gradient is zero (softmax is invariant to them): those must stay
within a few learning-rate steps of their start.
"""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rovit_jax.config_files import apply_overrides, load_config
from rovit_jax.models.layers import unscan_params
from rovit_jax.tasks import get_task
from rovit_jax.train import layouts
from rovit_jax.train import mesh as mesh_lib
from rovit_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from rovit_jax.train.mesh import tree_paths
from rovit_jax.train.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _config(**overrides):
    c = load_config("shapes_pretrain:tiny")
    c.batch_size = 16
    c.fsdp_min_size = 0
    c.async_checkpointing = False
    apply_overrides(c, overrides)
    return c


def _batches(config, steps, seed=0):
    rng = np.random.default_rng(seed)
    b, s, length = config.batch_size, config.pp.image_size, config.tokenizer.max_len
    out = []
    for _ in range(steps):
        tokens = rng.integers(4, 200, size=(b, length)).astype(np.int32)
        tokens[:, 0] = 1
        tokens[:, length // 2 :] = 0
        out.append({"image": rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32), "text": tokens})
    return out


def _stack_blocks(tree):
    """The test's own conversion to the scanned layout: encoderblock_{i} -> encoderblock [depth]."""
    if not isinstance(tree, dict):
        return tree
    blocks = sorted((k for k in tree if k.startswith("encoderblock_")), key=lambda k: int(k[13:]))
    out = {k: _stack_blocks(v) for k, v in tree.items() if k not in blocks}
    if blocks:
        out["encoderblock"] = jax.tree.map(lambda *a: np.stack(a), *[tree[k] for k in blocks])
    return out


def _train(config, mesh, batches, params=None):
    task = get_task(config)
    task.validate(mesh)
    trainer = Trainer(config, task, mesh)
    state = trainer.init_state()
    if params is not None:  # start from given (fresh) parameters; Adam's moments are zeros
        state["params"] = jax.device_put(params, trainer.state_shardings["params"])
    losses = []
    for b in batches:
        state, metrics = trainer.train_step(state, trainer.global_batch(b))
        losses.append(float(metrics["loss"]))
    return trainer, state, losses


def _assert_params_close(got, want, lr, what):
    for path, a, b in zip(tree_paths(want), jax.tree.leaves(got), jax.tree.leaves(want)):
        if path.endswith("key/bias"):
            assert np.abs(a).max() < 3 * lr * STEPS, f"{what}: {path}"
            continue
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=f"{what}: {path}")


@pytest.fixture(scope="module")
def single_device_run():
    config = _config()
    batches = _batches(config, STEPS)
    mesh = mesh_lib.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1])
    _, state, losses = _train(config, mesh, batches)
    return jax.device_get(state["params"]), losses, batches


@pytest.mark.parametrize("name", ["data", "fsdp", "fsdp_tp"])
def test_layout_matches_single_device(name, single_device_run):
    want_params, want_losses, batches = single_device_run
    config = _config()
    layouts.apply_layout(config, name, model_parallel=2)
    mesh = mesh_lib.make_mesh([tuple(a) for a in config.mesh])
    trainer, state, losses = _train(config, mesh, batches)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    _assert_params_close(jax.device_get(state["params"]), want_params, config.optim.lr, name)

    specs = dict(zip(tree_paths(state), (x.sharding.spec for x in jax.tree.leaves(state))))
    mlp_in = "params/img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
    query = "params/txt/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"
    if name == "data":
        assert all(s == P() for s in specs.values())
        assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
    elif name == "fsdp":
        assert specs[mlp_in] == P(None, "fsdp")  # [64, 256]: the larger dimension
        # Adam's moments follow their parameters.
        moments = [p for p in specs if p.startswith("opt_state") and p.endswith(mlp_in[7:])]
        assert len(moments) == 2 and all(specs[p] == P(None, "fsdp") for p in moments), moments
    else:
        assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "model": 2}
        # Megatron: heads and the MLP width over `model`, the model width over `fsdp`.
        block = "params/img/Transformer/encoderblock_0/"
        assert specs[mlp_in] == P("fsdp", "model")
        assert specs[block + "MlpBlock_0/Dense_0/bias"] == P("model")
        assert specs[block + "MlpBlock_0/Dense_1/kernel"] == P("model", "fsdp")
        assert specs[query] == P("fsdp", "model", None)
        assert specs[block + "MultiHeadDotProductAttention_0/key/bias"] == P("model", None)
        assert specs[block + "MultiHeadDotProductAttention_0/out/kernel"] == P(
            "model", None, "fsdp"
        )
        # Unnamed parameters (layer norms) fall back to their largest divisible dimension.
        assert specs["params/txt/Transformer/encoder_norm/scale"] == P("fsdp")
    # Whatever the layout, each device holds the right share of the parameters.
    leaf = jax.tree.leaves(state["params"]["img"]["Transformer"]["encoderblock_0"])[0]
    assert sum(s.data.size for s in leaf.addressable_shards) == leaf.size * (
        len(jax.devices()) // max(1, np.prod([mesh.shape[a] for a in leaf.sharding.spec if a]))
    )


def test_scan_remat_bf16_options():
    """scan_layers + remat keep the function (same values as the unrolled model, fp32); bf16
    compute with fp32 parameters tracks fp32 losses to bf16 precision."""
    base = _config()
    batches = _batches(base, STEPS)
    mesh = mesh_lib.make_mesh([("data", 1), ("fsdp", -1)])
    trainer0, state0, losses0 = _train(base, mesh, batches)
    init = jax.device_get(trainer0.init_state()["params"])
    fast = _config(scan_layers=True, remat="full")
    # Scanned blocks draw their initial values differently: start both from the same values.
    _, state1, losses1 = _train(fast, mesh, batches, params=_stack_blocks(init))
    np.testing.assert_allclose(losses1, losses0, rtol=1e-5)
    stacked = state1["params"]["img"]["Transformer"]["encoderblock"]
    assert jax.tree.leaves(stacked)[0].shape[0] == 2  # [depth, ...]
    _assert_params_close(
        unscan_params(jax.device_get(state1["params"])),
        jax.device_get(state0["params"]),
        base.optim.lr,
        "scan+remat",
    )
    half = _config(compute_dtype="bfloat16")
    _, state2, losses2 = _train(half, mesh, batches)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state2["params"]))
    np.testing.assert_allclose(losses2, losses0, rtol=3e-2)


def test_checkpoint_restores_onto_another_mesh(tmp_path, single_device_run):
    """Written under pure data parallelism (8 x 1), read back as FSDP x tensor parallel (4 x 2)."""
    _, _, batches = single_device_run
    config = _config()
    layouts.apply_layout(config, "data")
    trainer_a, state_a, _ = _train(config, mesh_lib.make_mesh(config.mesh), batches[:2])
    saved = jax.device_get(state_a)
    ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
    ckpt.save(2, state_a, {"next_step": 2})
    ckpt.wait()
    ckpt.close()

    config_b = _config()
    layouts.apply_layout(config_b, "fsdp_tp", model_parallel=2)
    mesh_b = mesh_lib.make_mesh(config_b.mesh)
    task_b = get_task(config_b)
    task_b.validate(mesh_b)
    trainer_b = Trainer(config_b, task_b, mesh_b)
    restored = Checkpointer(str(tmp_path), keep=1, async_save=False).restore_latest(
        abstract_with_shardings(trainer_b.abstract_state, trainer_b.state_shardings)
    )
    assert restored is not None
    step, state_b, _ = restored
    assert step == 2
    for path, got, want, sharding in zip(
        tree_paths(saved),
        jax.tree.leaves(state_b),
        jax.tree.leaves(saved),
        jax.tree.leaves(trainer_b.state_shardings),
    ):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=path)
        assert got.sharding.is_equivalent_to(sharding, got.ndim), path
    # Training continues identically on the new mesh.
    state_a, m_a = trainer_a.train_step(state_a, trainer_a.global_batch(batches[2]))
    state_b, m_b = trainer_b.train_step(state_b, trainer_b.global_batch(batches[2]))
    np.testing.assert_allclose(float(m_b["loss"]), float(m_a["loss"]), rtol=1e-5)
    _assert_params_close(
        jax.device_get(state_b["params"]), jax.device_get(state_a["params"]), config.optim.lr, "b"
    )


def test_layout_names_and_bad_values():
    mesh, rules, table = layouts.layout("fsdp_tp", 4)
    assert mesh[-1] == ("model", 4) and rules == ((".*", "fsdp"),)
    assert dict(table) == {"embed": "fsdp", "heads": "model", "mlp": "model"}
    with pytest.raises(ValueError, match="layout"):
        layouts.layout("pipeline")
    with pytest.raises(ValueError, match="tp"):
        layouts.layout("fsdp_tp", 0)
