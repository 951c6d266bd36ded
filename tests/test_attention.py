"""The attention kernels behind the `attention` setting (rovit_jax.models.attention), against
flax's `dot_product_attention`, an independent transcription of softmax attention."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rovit_jax import config_check as cc
from rovit_jax.models import TextTransformer, ViT
from rovit_jax.models.attention import attention_function, kernel_for
from rovit_jax.pretrain_config import pretrain_defaults
from rovit_jax.tasks import pretrain

REFERENCE = functools.partial(nn.dot_product_attention, deterministic=True)
MU = dict(width=64, depth=3, mlp_dim=128, num_heads=4)


def _qkv(shape_q, shape_k, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=shape_q), dtype)
    k, v = (jnp.asarray(rng.normal(size=shape_k), dtype) for _ in range(2))
    return q, k, v


def _masks(rng, b, heads, t, s):
    """The masks the towers build, by name: None, key padding, causal with padding, per head."""
    valid = np.arange(s)[None, :] < rng.integers(1, s + 1, size=(b, 1))
    causal = np.tril(np.ones((t, s), bool))
    return {
        "none": None,
        "keys": jnp.asarray(valid[:, None, None, :]),
        "causal": jnp.asarray(valid[:, None, None, :] & causal[None, None]),
        "per_head": jnp.asarray(rng.uniform(size=(b, heads, t, s)) < 0.7).at[..., 0].set(True),
    }


@pytest.mark.parametrize("impl", ["einsum", "xla", "auto"])
@pytest.mark.parametrize("mask_kind", ["none", "keys", "causal", "per_head"])
def test_kernels_equal_flax_attention_in_float32(impl, mask_kind):
    """Values and gradients (query, key, value) to 1e-5, every mask the towers build."""
    b, t, heads, d = 3, 10, 4, 8
    q, k, v = _qkv((b, t, heads, d), (b, t, heads, d))
    mask = _masks(np.random.default_rng(1), b, heads, t, t)[mask_kind]
    attend = attention_function(impl)

    def loss(fn):
        return lambda *x: jnp.sum(jnp.sin(fn(*x, mask=mask)))

    np.testing.assert_allclose(attend(q, k, v, mask=mask), REFERENCE(q, k, v, mask=mask), atol=1e-5)
    got = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(REFERENCE), argnums=(0, 1, 2))(q, k, v)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, atol=1e-5)


def test_einsum_kernel_attends_uniformly_on_a_fully_masked_row():
    """As flax's: a row with no key to attend to averages the values (never NaN)."""
    q, k, v = _qkv((2, 6, 2, 8), (2, 6, 2, 8))
    mask = jnp.ones((2, 1, 6, 6), bool).at[:, :, 3, :].set(False)
    got = attention_function("einsum")(q, k, v, mask=mask)
    np.testing.assert_allclose(got, REFERENCE(q, k, v, mask=mask), atol=1e-6)
    np.testing.assert_allclose(got[:, 3], jnp.mean(v, axis=1), atol=1e-6)


def test_kernels_take_a_single_query_and_other_key_lengths():
    """The MAP head's shape: one probe query over N keys with a key mask."""
    q, k, v = _qkv((2, 1, 4, 8), (2, 7, 4, 8))
    mask = jnp.asarray(np.arange(7)[None, None, None, :] < np.array([3, 7])[:, None, None, None])
    want = REFERENCE(q, k, v, mask=mask)
    for impl in ("einsum", "xla"):
        np.testing.assert_allclose(attention_function(impl)(q, k, v, mask=mask), want, atol=1e-5)


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_bfloat16_kernels_track_float32(impl):
    """16-bit inputs: logits and softmax run in float32, so the output is as close to the f32
    reference as bfloat16 inputs and output allow."""
    q, k, v = _qkv((2, 64, 4, 16), (2, 64, 4, 16))
    want = REFERENCE(q, k, v)
    got = attention_function(impl)(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want))
    assert err.max() < 0.05 and err.mean() < 0.005


def test_kernel_choice():
    bf16, f32 = jnp.bfloat16, jnp.float32
    # auto: cuDNN where it applies, einsum elsewhere.
    assert kernel_for("auto", bf16, 64, 196, 196, False, "gpu") == "cudnn"
    assert kernel_for("auto", bf16, 64, 64, 64, True, "gpu") == "cudnn"
    assert kernel_for("auto", bf16, 64, 196, 196, False, "cpu") == "einsum"
    assert kernel_for("auto", bf16, 64, 196, 196, False, "tpu") == "einsum"
    assert kernel_for("auto", f32, 64, 196, 196, False, "gpu") == "einsum"
    assert kernel_for("auto", bf16, 12, 196, 196, False, "gpu") == "einsum"  # head dim % 8
    assert kernel_for("auto", bf16, 256, 196, 196, False, "gpu") == "einsum"  # head dim > 128
    assert kernel_for("auto", bf16, 64, 1, 197, True, "gpu") == "einsum"  # odd, masked
    assert kernel_for("auto", bf16, 64, 197, 197, False, "gpu") == "cudnn"  # odd, no mask
    assert kernel_for("einsum", bf16, 64, 196, 196, False, "gpu") == "einsum"
    assert kernel_for("xla", bf16, 64, 196, 196, False, "gpu") == "xla"
    # cudnn: where it does not apply, the reason.
    with pytest.raises(ValueError, match="needs a GPU; JAX's backend is 'cpu'"):
        kernel_for("cudnn", bf16, 64, 196, 196, False, "cpu")
    with pytest.raises(ValueError, match="bfloat16 or float16 compute, got float32"):
        kernel_for("cudnn", f32, 64, 196, 196, False, "gpu")
    with pytest.raises(ValueError, match="multiple of 8 and at most 128, got 12"):
        kernel_for("cudnn", bf16, 12, 196, 196, False, "gpu")
    with pytest.raises(ValueError, match="must be one of"):
        attention_function("flash")


def _apply_both(model_fn, x, **call):
    """Applies the model built with each kernel to `x` from one set of parameters (initialised
    under the default) and checks the parameter trees agree in names and shapes."""
    variables = model_fn("auto").init(jax.random.key(0), x, **call)
    outs = {}
    for impl in ("einsum", "xla"):
        model = model_fn(impl)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, **call))
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)
        outs[impl] = model.apply(variables, x, **call)
    return outs


def test_towers_give_the_same_outputs_under_every_kernel():
    """Global and window blocks (the grid is not a multiple of the window: padded windows),
    a MAP head; the text tower causal with padding masked and MAP pooling; f32 to 1e-5."""
    images = jax.random.normal(jax.random.key(1), (2, 48, 40, 3))

    def vit(impl):
        return ViT(
            **MU,
            patch_size=8,
            posemb_grid=(6, 5),
            pool_type="map",
            window_size=4,
            global_blocks=(1,),
            attention=impl,
        )

    outs = _apply_both(vit, images)
    np.testing.assert_allclose(outs["xla"][0], outs["einsum"][0], atol=1e-5)
    np.testing.assert_allclose(
        outs["xla"][1]["patch_grid"], outs["einsum"][1]["patch_grid"], atol=1e-5
    )

    tokens = jnp.array([[3, 9, 4, 0, 0, 0], [7, 7, 8, 2, 5, 11]], jnp.int32)

    def text(impl):
        return TextTransformer(
            **MU, vocab_size=50, max_len=8, pool_type="map", causal=True, attention=impl
        )

    outs = _apply_both(text, tokens)
    np.testing.assert_allclose(outs["xla"][0], outs["einsum"][0], atol=1e-5)
    np.testing.assert_allclose(outs["xla"][1]["tokens"], outs["einsum"][1]["tokens"], atol=1e-5)


def test_the_setting_reaches_the_towers_and_cudnn_is_checked_before_compiling():
    c = pretrain_defaults()
    c.attention = "xla"
    model = pretrain.build_model(c)
    assert model.image["attention"] == model.text["attention"] == "xla"
    assert pretrain.build_model(c, attention="einsum").image["attention"] == "einsum"
    c.attention = "cudnn"
    with pytest.raises(cc.ConfigError) as info:
        pretrain.validate_config(c)
    assert [k for k, _, _ in info.value.problems] == ["attention"]
    assert "needs a GPU" in str(info.value)
    c.attention = "flash"
    with pytest.raises(cc.ConfigError, match="attention"):
        pretrain.validate_config(c)
