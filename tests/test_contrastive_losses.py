"""Contrastive losses against independent references (numpy, torchvision) and the chunked ring loss
against the unchunked one on an 8-device CPU mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rovit_jax.losses import (
    chunked_contrastive_loss,
    contrastive_loss_fn,
    focal_contrastive_loss,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)

# ---------------------------------------------------------------------------------------------------
# Independent numpy references (float64).
# ---------------------------------------------------------------------------------------------------


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_logsumexp(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_siglip(z):
    b = z.shape[0]
    labels = 2.0 * np.eye(b) - 1.0
    return np.sum(-np_log_sigmoid(labels * z)) / b


def np_siglip_grad(z):
    b = z.shape[0]
    labels = 2.0 * np.eye(b) - 1.0
    # d/dz -log sigmoid(l z) = -l * sigmoid(-l z), sigmoid taken in log space for huge |z|.
    return -labels * np.exp(np_log_sigmoid(-labels * z)) / b


def np_clip(z):
    log_p_rows = z - np_logsumexp(z, 1)[:, None]
    log_p_cols = z - np_logsumexp(z, 0)[None, :]
    i2t = -np.mean(np.diag(log_p_rows))
    t2i = -np.mean(np.diag(log_p_cols))
    return 0.5 * (i2t + t2i)


def np_clip_grad(z):
    b = z.shape[0]
    soft_rows = np.exp(z - np_logsumexp(z, 1)[:, None])
    soft_cols = np.exp(z - np_logsumexp(z, 0)[None, :])
    return 0.5 * (soft_rows + soft_cols - 2.0 * np.eye(b)) / b


def torchvision_focal(z, alpha, gamma):
    """Our focal loss through torchvision: ours = 2 * torchvision(sum) / B; value and dloss/dz."""
    import torch
    from torchvision.ops import sigmoid_focal_loss

    b = z.shape[0]
    inputs = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    targets = torch.eye(b, dtype=torch.float64)
    loss = 2.0 * sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=gamma, reduction="sum") / b
    loss.backward()
    return loss.item(), inputs.grad.numpy()


def random_logits(seed, b, scale=3.0):
    rng = np.random.default_rng(seed)
    z = scale * rng.standard_normal((b, b))
    z[np.arange(b), np.arange(b)] += 2.0  # positives a bit higher, like a trained model
    return z.astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Unchunked losses.
# ---------------------------------------------------------------------------------------------------

FOCAL_PARAMS = [(0.5, 0.0), (0.25, 0.0), (0.5, 1.0), (0.25, 2.0), (0.75, 2.0), (0.9, 0.5)]


@pytest.mark.parametrize("alpha,gamma", FOCAL_PARAMS)
def test_focal_matches_torchvision(alpha, gamma):
    z = random_logits(0, 12)
    want, want_grad = torchvision_focal(z.astype(np.float64), alpha, gamma)
    got, got_grad = jax.value_and_grad(focal_contrastive_loss)(
        jnp.asarray(z), alpha=alpha, gamma=gamma
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=1e-4, atol=1e-6)


def test_focal_gamma0_alpha_half_is_siglip():
    z = random_logits(1, 10)
    want = np_siglip(z.astype(np.float64))
    focal = focal_contrastive_loss(jnp.asarray(z), alpha=0.5, gamma=0.0)
    sigmoid = sigmoid_contrastive_loss(jnp.asarray(z))
    np.testing.assert_allclose(float(focal), want, rtol=1e-6)
    np.testing.assert_allclose(float(sigmoid), want, rtol=1e-6)


def test_sigmoid_matches_numpy_value_and_grad():
    z = random_logits(2, 9)
    got, got_grad = jax.value_and_grad(sigmoid_contrastive_loss)(jnp.asarray(z))
    np.testing.assert_allclose(float(got), np_siglip(z.astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(got_grad), np_siglip_grad(z.astype(np.float64)), rtol=1e-5, atol=1e-7
    )


def test_softmax_matches_numpy_value_and_grad():
    z = random_logits(3, 11)
    got, got_grad = jax.value_and_grad(softmax_contrastive_loss)(jnp.asarray(z))
    np.testing.assert_allclose(float(got), np_clip(z.astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(got_grad), np_clip_grad(z.astype(np.float64)), rtol=1e-5, atol=1e-7
    )


def test_softmax_shift_invariant_and_symmetric():
    z = random_logits(4, 7)
    base = float(softmax_contrastive_loss(jnp.asarray(z)))
    np.testing.assert_allclose(
        float(softmax_contrastive_loss(jnp.asarray(z) + 5.0)), base, rtol=1e-6
    )
    # Transposing swaps the image->text and text->image terms, whose average is unchanged.
    np.testing.assert_allclose(float(softmax_contrastive_loss(jnp.asarray(z.T))), base, rtol=1e-6)


def test_grad_matches_finite_differences():
    # Central differences in float64 numpy on a few entries, independent of the closed forms above.
    z = random_logits(5, 6).astype(np.float64)
    eps = 1e-4
    checks = [
        ("softmax", np_clip, softmax_contrastive_loss),
        ("sigmoid", np_siglip, sigmoid_contrastive_loss),
    ]
    for name, np_fn, fn in checks:
        grad = np.asarray(jax.grad(fn)(jnp.asarray(z, jnp.float32)))
        for i, j in [(0, 0), (1, 4), (5, 2), (3, 3)]:
            dz = np.zeros_like(z)
            dz[i, j] = eps
            fd = (np_fn(z + dz) - np_fn(z - dz)) / (2 * eps)
            np.testing.assert_allclose(grad[i, j], fd, rtol=1e-3, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_huge_logits_finite_and_correct(gamma):
    rng = np.random.default_rng(6)
    b = 8
    # Misclassified and well-classified entries at |z| ~ 1e3.
    z = (1000.0 * rng.choice([-1.0, 1.0], size=(b, b))).astype(np.float32)
    z[0, 0] = -1000.0  # a positive with a hopeless score
    z[0, 1] = 1000.0  # a negative with a hopeless score
    for fn in (
        softmax_contrastive_loss,
        sigmoid_contrastive_loss,
        lambda x: focal_contrastive_loss(x, alpha=0.25, gamma=gamma),
    ):
        value, grad = jax.value_and_grad(fn)(jnp.asarray(z))
        assert np.isfinite(float(value))
        assert np.all(np.isfinite(np.asarray(grad)))
    focal = focal_contrastive_loss(jnp.asarray(z), alpha=0.25, gamma=gamma)
    want, _ = torchvision_focal(z.astype(np.float64), 0.25, gamma)
    np.testing.assert_allclose(float(focal), want, rtol=1e-5)
    np.testing.assert_allclose(
        float(sigmoid_contrastive_loss(jnp.asarray(z))), np_siglip(z.astype(np.float64)), rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(jax.grad(sigmoid_contrastive_loss)(jnp.asarray(z))),
        np_siglip_grad(z.astype(np.float64)),
        atol=1e-7,
    )
    np.testing.assert_allclose(
        float(softmax_contrastive_loss(jnp.asarray(z))), np_clip(z.astype(np.float64)), rtol=1e-5
    )


def test_focal_gradient_finite_at_gamma_zero_for_confident_entries():
    # (1 - p_t)^0 with p_t == 1 in float32 is where a naive power would give 0 * inf.
    z = jnp.asarray(np.where(np.eye(4) > 0, 60.0, -60.0), jnp.float32)
    grad = jax.grad(lambda x: focal_contrastive_loss(x, alpha=0.5, gamma=0.0))(z)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(
        np.asarray(grad), np_siglip_grad(np.asarray(z, np.float64)), atol=1e-12
    )


def test_contrastive_loss_fn_dispatch_and_errors():
    z = jnp.asarray(random_logits(7, 5))
    np.testing.assert_allclose(
        float(contrastive_loss_fn("softmax")(z)), np_clip(np.asarray(z, np.float64)), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(contrastive_loss_fn("sigmoid")(z)), np_siglip(np.asarray(z, np.float64)), rtol=1e-6
    )
    want, _ = torchvision_focal(np.asarray(z, np.float64), 0.25, 2.0)
    np.testing.assert_allclose(
        float(contrastive_loss_fn("focal", alpha=0.25, gamma=2.0)(z)), want, rtol=1e-5
    )
    with pytest.raises(ValueError, match=r"'clip'.*softmax.*sigmoid.*focal"):
        contrastive_loss_fn("clip")
    with pytest.raises(ValueError, match="logits"):
        softmax_contrastive_loss(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="gamma"):
        focal_contrastive_loss(z, gamma=-1.0)


# ---------------------------------------------------------------------------------------------------
# Chunked (ring) loss.
# ---------------------------------------------------------------------------------------------------

LOSS_KW = {"softmax": {}, "sigmoid": {}, "focal": {"alpha": 0.3, "gamma": 2.0}}


def make_mesh(shape, names=("data", "fsdp")):
    devices = mesh_utils.create_device_mesh(shape, devices=jax.devices()[: int(np.prod(shape))])
    return Mesh(devices, names)


def embeddings(seed, b, e, mesh, axes):
    k1, k2 = jax.random.split(jax.random.key(seed))
    zimg = jax.random.normal(k1, (b, e), jnp.float32)
    ztxt = jax.random.normal(k2, (b, e), jnp.float32)
    zimg = zimg / jnp.linalg.norm(zimg, axis=-1, keepdims=True)
    ztxt = ztxt / jnp.linalg.norm(ztxt, axis=-1, keepdims=True)
    sharding = NamedSharding(mesh, P(axes, None))
    return jax.device_put(zimg, sharding), jax.device_put(ztxt, sharding)


def unchunked(kind, zimg, ztxt, scale, bias):
    logits = scale * jnp.einsum("ie,je->ij", zimg, ztxt, precision="highest") + bias
    return contrastive_loss_fn(kind, **LOSS_KW[kind])(logits)


def assert_close(got, want, rtol=1e-5):
    want = np.asarray(want)
    atol = rtol * max(float(np.max(np.abs(want))), 1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "focal"])
@pytest.mark.parametrize("mesh_shape", [(4, 2), (8, 1), (1, 1)])
def test_chunked_equals_unchunked(kind, mesh_shape):
    mesh = make_mesh(mesh_shape)
    axes = ("data", "fsdp")
    zimg, ztxt = embeddings(0, 16, 6, mesh, axes)
    scale, bias = jnp.float32(7.5), jnp.float32(-2.0)

    def loss(zi, zt, s, b):
        return chunked_contrastive_loss(zi, zt, s, b, kind=kind, mesh=mesh, **LOSS_KW[kind])

    got, got_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
        zimg, ztxt, scale, bias
    )
    want, want_grads = jax.value_and_grad(lambda *a: unchunked(kind, *a), argnums=(0, 1, 2, 3))(
        zimg, ztxt, scale, bias
    )

    assert got.shape == ()
    assert got.sharding.is_fully_replicated
    assert_close(got, want)
    for name, g, w in zip(("zimg", "ztxt", "scale", "bias"), got_grads, want_grads):
        assert g.shape == w.shape, name
        if name == "bias" and kind == "softmax":
            # Softmax is shift-invariant: both gradients are ~0 up to rounding.
            assert abs(float(g)) < 1e-5 and abs(float(w)) < 1e-5
            continue
        assert_close(g, w)


def test_chunked_without_bias_on_single_named_axis():
    mesh = make_mesh((8,), names=("data",))
    zimg, ztxt = embeddings(1, 24, 5, mesh, ("data",))
    for kind in ("softmax", "sigmoid", "focal"):
        got = jax.jit(
            lambda zi, zt, k=kind: chunked_contrastive_loss(
                zi, zt, 4.0, None, kind=k, mesh=mesh, batch_axes=("data",), **LOSS_KW[k]
            )
        )(zimg, ztxt)
        assert_close(got, unchunked(kind, zimg, ztxt, 4.0, 0.0))


def test_chunked_on_explicit_mesh_with_unsharded_inputs():
    # jax.make_mesh gives Explicit axes, where shard_map does not reshard its inputs by itself.
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    rng = np.random.default_rng(3)
    zimg = jnp.asarray(rng.standard_normal((16, 4)) / 2, jnp.float32)  # uncommitted, unsharded
    ztxt = jnp.asarray(rng.standard_normal((16, 4)) / 2, jnp.float32)
    got = jax.jit(
        lambda zi, zt: chunked_contrastive_loss(zi, zt, 5.0, 1.0, kind="softmax", mesh=mesh)
    )(zimg, ztxt)
    assert_close(got, unchunked("softmax", zimg, ztxt, 5.0, 1.0))


def test_chunked_errors():
    mesh = make_mesh((4, 2))
    zimg = jnp.zeros((12, 4))
    with pytest.raises(ValueError, match="kind"):
        chunked_contrastive_loss(zimg[:8], zimg[:8], 1.0, None, kind="hinge", mesh=mesh)
    with pytest.raises(ValueError, match=r"B=12.*8"):
        chunked_contrastive_loss(zimg, zimg, 1.0, None, kind="sigmoid", mesh=mesh)
    with pytest.raises(ValueError, match="batch_axes"):
        chunked_contrastive_loss(
            zimg[:8], zimg[:8], 1.0, None, kind="sigmoid", mesh=mesh, batch_axes=("replica",)
        )


_HLO_SHAPE = re.compile(r"\b(?:f16|bf16|f32|f64)\[([0-9,]*)\]")


def float_buffer_shapes(hlo_text):
    return {
        tuple(int(d) for d in dims.split(",")) if dims else ()
        for dims in _HLO_SHAPE.findall(hlo_text)
    }


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "focal"])
def test_chunked_never_materialises_global_logits(kind):
    # B=64, E=24, n=8: the per-device block is [8, 8], and 64 can only come from a global-batch dim.
    batch, emb = 64, 24
    mesh = make_mesh((4, 2))
    zimg, ztxt = embeddings(2, batch, emb, mesh, ("data", "fsdp"))

    def loss(zi, zt, s, b):
        return chunked_contrastive_loss(zi, zt, s, b, kind=kind, mesh=mesh, **LOSS_KW[kind])

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    shapes = float_buffer_shapes(
        step.lower(zimg, ztxt, jnp.float32(3.0), jnp.float32(0.5)).compile().as_text()
    )
    assert (8, 8) in shapes
    assert not any(batch in s for s in shapes), sorted(shapes)
    # Everything without an embedding dim is logit-like; none may exceed one [8, 8] block
    # (this also rules out a stack of per-hop [8, 8] blocks kept for the backward pass).
    logit_like = [s for s in shapes if emb not in s]
    assert max(int(np.prod(s)) for s in logit_like) == 8 * 8, sorted(shapes)

    # The same inspection does see the global batch in the unchunked loss.
    naive = jax.jit(jax.value_and_grad(lambda zi, zt: unchunked(kind, zi, zt, 3.0, 0.5)))
    naive_shapes = float_buffer_shapes(naive.lower(zimg, ztxt).compile().as_text())
    assert any(batch in s for s in naive_shapes), sorted(naive_shapes)
