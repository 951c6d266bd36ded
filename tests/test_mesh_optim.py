"""Mesh construction, regex sharding rules, schedules and regex optimizer masks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rovit_jax.pretrain_config import pretrain_defaults
from rovit_jax.train import mesh as mesh_lib
from rovit_jax.train.optim import (
    OptimSettings,
    make_optimizer,
    make_schedule,
    optim_settings,
    regex_mask,
)


def test_mesh_sizes_and_errors():
    mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 2)])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert mesh_lib.num_batch_shards(mesh) == 8
    with pytest.raises(ValueError, match="mesh"):
        mesh_lib.make_mesh([("data", 3), ("fsdp", 2)])
    with pytest.raises(ValueError, match="mesh"):
        mesh_lib.make_mesh([("data", -1), ("fsdp", -1)])
    with pytest.raises(ValueError, match="fsdp"):
        mesh_lib.make_mesh([("data", -1)])


def test_sharding_rules():
    mesh = mesh_lib.make_mesh([("data", 4), ("fsdp", 2)])
    tree = {
        "img": {
            "kernel": jax.ShapeDtypeStruct((64, 384), jnp.float32),
            "bias": jax.ShapeDtypeStruct((384,), jnp.float32),
            "odd": jax.ShapeDtypeStruct((129, 129), jnp.float32),
        },
        "txt": {"embed": jax.ShapeDtypeStruct((512, 64), jnp.float32)},
    }
    rules = [("txt/embed", ("fsdp", None)), ("bias", "replicate"), (".*", "fsdp")]
    sh = mesh_lib.infer_shardings(tree, mesh, rules, fsdp_min_size=100)
    assert sh["txt"]["embed"].spec == P("fsdp", None)
    assert sh["img"]["bias"].spec == P()
    assert sh["img"]["kernel"].spec == P(None, "fsdp")  # largest divisible dimension
    assert sh["img"]["odd"].spec == P()  # nothing divisible by 2
    with pytest.raises(ValueError, match="sharding_rules"):
        mesh_lib.infer_shardings(
            {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32)},
            mesh,
            [("w", ("fsdp", None))],
            fsdp_min_size=0,
        )
    with pytest.raises(ValueError, match="more entries than dimensions"):
        mesh_lib.infer_shardings(
            {"w": jax.ShapeDtypeStruct((4,), jnp.float32)},
            mesh,
            [("w", ("fsdp", None))],
            fsdp_min_size=0,
        )
    # Specs name trailing dimensions: a stacked [layers, ...] leaf keeps its layer axis whole.
    stacked = mesh_lib.infer_shardings(
        {"w": jax.ShapeDtypeStruct((3, 8, 4), jnp.float32)},
        mesh,
        [("w", ("fsdp", None))],
        fsdp_min_size=0,
    )
    assert stacked["w"].spec == P(None, "fsdp", None)


def test_logical_axis_rules():
    mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 2), ("model", 2)])
    f32 = jnp.float32
    tree = {
        "params": {
            "w": jax.ShapeDtypeStruct((8, 6), f32),
            "tiny": jax.ShapeDtypeStruct((4, 2), f32),
            "odd": jax.ShapeDtypeStruct((3, 4), f32),
            "flat": jax.ShapeDtypeStruct((16,), f32),
            "unnamed": jax.ShapeDtypeStruct((2, 12), f32),
        },
        "opt_state": {"mu": {"w": jax.ShapeDtypeStruct((8, 6), f32)}},
    }
    names = {
        "w": ("embed", "mlp"),
        "tiny": ("embed", "mlp"),
        "odd": ("embed", None),
        "flat": ("embed", "mlp"),  # a rank the leaf does not have: names ignored
    }
    table = [("embed", "fsdp"), ("mlp", "model")]

    def specs(rules, **kw):
        sh = mesh_lib.infer_shardings(
            tree, mesh, rules, logical_axes=names, logical_rules=table, **kw
        )
        return {k: v.spec for k, v in sh["params"].items()}, sh["opt_state"]["mu"]["w"].spec

    got, moment = specs([("odd", "replicate"), (".*", "fsdp")], fsdp_min_size=10)
    assert got["w"] == P("fsdp", "model") and moment == P("fsdp", "model")
    # Below fsdp_min_size the fsdp split is dropped, the model split kept.
    assert got["tiny"] == P(None, "model")
    assert got["odd"] == P()  # "replicate" wins over the names
    assert got["flat"] == P("fsdp")  # largest divisible dimension, as for unnamed leaves
    assert got["unnamed"] == P(None, "fsdp")
    # An explicit tuple rule wins over the names.
    got, _ = specs(
        [("params/w", (None, "fsdp")), ("odd", "replicate"), (".*", "fsdp")], fsdp_min_size=2**14
    )
    assert got["w"] == P(None, "fsdp")
    # A named split that does not divide is an error naming the table.
    with pytest.raises(ValueError, match="logical_axis_rules.*odd.*not divisible"):
        specs([(".*", "fsdp")], fsdp_min_size=0)
    # Names a table leaves out, and mesh axes of size 1, do not split.
    sh = mesh_lib.infer_shardings(
        {"w": jax.ShapeDtypeStruct((8, 6), f32)},
        mesh_lib.make_mesh([("data", 8), ("fsdp", 1)]),
        [(".*", "fsdp")],
        logical_axes={"w": ("embed", "mlp")},
        logical_rules=[("embed", "fsdp")],
        fsdp_min_size=0,
    )
    assert sh["w"].spec == P()


def test_schedule_shape():
    optim = OptimSettings(lr=1.0, warmup_steps=10, schedule="cosine")
    s = make_schedule(optim, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.5)), abs=1e-6)
    assert float(s(110)) == pytest.approx(0.0, abs=1e-6)
    linear = dataclasses.replace(optim, schedule="linear")
    assert float(make_schedule(linear, 110)(60)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="optim.schedule"):
        dataclasses.replace(optim, schedule="nope")


def test_optim_settings_resolve_the_config_and_name_bad_rules():
    config = pretrain_defaults()
    assert optim_settings(config) == OptimSettings()
    config.optim.lr_mults = [["^img/", 2]]  # as JSON gives it back
    config.optim.no_decay = ["bias$"]
    got = optim_settings(config)
    assert got.lr_mults == (("^img/", 2.0),) and got.no_decay == ("bias$",)
    config.optim.lr_mults = [("(", 1.0)]
    config.optim.frozen = ["ok", "["]
    config.optim.grad_scales = [("^a", -1.0)]
    with pytest.raises(ValueError) as e:
        optim_settings(config)
    text = str(e.value)
    for key in ("optim.lr_mults", "optim.frozen", "optim.grad_scales"):
        assert f"`{key}`" in text
    assert "regex" in text and ">= 0" in text


def _optim(**kw):
    return OptimSettings(
        **dict(dict(lr=0.1, warmup_steps=0, schedule="constant", clip_norm=0.0), **kw)
    )


def test_weight_decay_mask_and_frozen_params():
    params = {
        "img": {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}},
        "txt": {"kernel": jnp.ones((2, 2))},
    }
    assert regex_mask(params, [r"bias$"]) == {
        "img": {"Dense_0": {"kernel": False, "bias": True}},
        "txt": {"kernel": False},
    }
    zero = jax.tree.map(jnp.zeros_like, params)
    tx, _ = make_optimizer(_optim(weight_decay=0.5, no_decay=(r"bias$",), frozen=(r"^txt/",)), 10)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradient: only decoupled decay moves decayed, trainable leaves: -lr * wd * p.
    np.testing.assert_allclose(updates["img"]["Dense_0"]["kernel"], -0.05 * np.ones((2, 2)))
    np.testing.assert_allclose(updates["img"]["Dense_0"]["bias"], np.zeros(2))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["txt"]["kernel"], np.zeros((2, 2)))
    assert np.all(np.asarray(updates["img"]["Dense_0"]["bias"]) < 0)


def test_matches_optax_adamw_without_masks():
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    grads = {"w": jnp.linspace(-1, 1, 6).reshape(2, 3)}
    tx, _ = make_optimizer(_optim(weight_decay=0.01, no_decay=()), 10)
    ref = optax.adamw(0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    u1, _ = tx.update(grads, tx.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)


class _TwoLayerTask:
    """y = relu(x @ a) @ b with a squared loss: `a` is the 'backbone' a config may freeze."""

    def __init__(self, config):
        self.config = config

    def validate(self, mesh):
        del mesh

    def init_params(self, rng):
        ka, kb = jax.random.split(rng)
        return {
            "backbone": {"a": jax.random.normal(ka, (16, 64))},
            "head": {"b": jax.random.normal(kb, (64, 1))},
        }

    init_model_params = init_params

    def loss_fn(self, params, batch, rng):
        del rng
        h = jax.nn.relu(batch["x"] @ params["backbone"]["a"])
        loss = jnp.mean((h @ params["head"]["b"] - batch["y"]) ** 2)
        return loss, {}

    def batch_shapes(self):
        return {
            "x": jax.ShapeDtypeStruct((8, 16), jnp.float32),
            "y": jax.ShapeDtypeStruct((8, 1), jnp.float32),
        }


def _trainer(frozen):
    from rovit_jax.train.trainer import Trainer

    config = pretrain_defaults()
    config.total_steps, config.batch_size = 3, 8
    config.optim.warmup_steps, config.optim.lr = 0, 0.1
    config.optim.frozen = frozen
    config.mesh = (("data", 1), ("fsdp", 1))
    mesh = mesh_lib.make_mesh([("data", 1), ("fsdp", 1)], devices=jax.devices()[:1])
    return Trainer(config, _TwoLayerTask(config), mesh)


def test_frozen_parameters_get_no_update_and_no_backward_pass():
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(8, 16)).astype(np.float32),
        "y": rng.normal(size=(8, 1)).astype(np.float32),
    }
    frozen, free = _trainer(["^backbone/"]), _trainer([])
    s_frozen, s_free = frozen.init_state(), free.init_state()
    a0 = np.asarray(s_frozen["params"]["backbone"]["a"])
    np.testing.assert_array_equal(a0, s_free["params"]["backbone"]["a"])
    s_frozen, m_frozen = frozen.train_step(s_frozen, frozen.global_batch(batch))
    s_free, m_free = free.train_step(s_free, free.global_batch(batch))
    # The backbone is untouched; the head moves exactly as in the unfrozen run's first step
    # (Adam's first step is g / (|g| + eps): clipping the larger unfrozen gradient
    # rescales g and so moves it only at the eps level).
    np.testing.assert_array_equal(s_frozen["params"]["backbone"]["a"], a0)
    assert not np.allclose(s_free["params"]["backbone"]["a"], a0)
    np.testing.assert_allclose(
        s_frozen["params"]["head"]["b"], s_free["params"]["head"]["b"], rtol=1e-5, atol=1e-7
    )
    # grad_norm covers only the trained parameters: re-derived in numpy for the head.
    a, b = a0, np.asarray(free.init_state()["params"]["head"]["b"])
    h = np.maximum(batch["x"] @ a, 0.0)
    grad_b = h.T @ (2.0 * (h @ b - batch["y"]) / batch["y"].size)
    np.testing.assert_allclose(float(m_frozen["grad_norm"]), np.linalg.norm(grad_b), rtol=1e-5)
    # The frozen backbone's backward pass is not computed at all: fewer FLOPs per step.
    flops = lambda t: t.lower().compile().cost_analysis()["flops"]  # noqa: E731
    assert flops(frozen) < flops(free) - 0.5 * 2 * 8 * 16 * 64
