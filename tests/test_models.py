"""Tests for the ViT, text transformer and two-tower models (tiny shapes, CPU)."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rovit_jax.models import TextTransformer, TwoTower, ViT, text_variant, vit_variant
from rovit_jax.ops.posemb import crop_pos_embed

MU = dict(width=64, depth=2, mlp_dim=256, num_heads=2)


def tiny_vit(**kw):
    args = dict(MU, patch_size=8, posemb_grid=(4, 4), cpe_up_size=8)
    args.update(kw)
    return ViT(**args)


def images(batch=2, h=32, w=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, h, w, 3))


@pytest.fixture(scope="module")
def vit_vars():
    """Variables of tiny_vit() (gap pooling), shared by the tests that only apply the model."""
    return tiny_vit().init(jax.random.key(0), images())


def with_param(variables, path, value):
    """Returns a copy of ``variables`` with the leaf at ``path`` (tuple of keys) replaced."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    assert path in flat
    flat[path] = value
    return flax.traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool_type", ["gap", "tok", "map"])
def test_vit_shapes_and_param_names(pool_type):
    model = tiny_vit(pool_type=pool_type)
    x = images()
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    assert params["pos_embedding"].shape == (4, 4, 64)
    assert params["embedding"]["kernel"].shape == (8, 8, 3, 64)
    block = params["Transformer"]["encoderblock_1"]
    assert set(block) == {
        "LayerNorm_0",
        "MultiHeadDotProductAttention_0",
        "LayerNorm_1",
        "MlpBlock_0",
    }
    assert set(block["MlpBlock_0"]) == {"Dense_0", "Dense_1"}
    assert "encoder_norm" in params["Transformer"]
    assert ("cls" in params) == (pool_type == "tok")
    assert ("MAPHead_0" in params) == (pool_type == "map")
    out, aux = model.apply(variables, x)
    assert out.shape == (2, 64)
    assert aux["patch_grid"].shape == (2, 4, 4, 64)
    np.testing.assert_array_equal(np.asarray(aux["pre_logits"]), np.asarray(out))
    if pool_type == "gap":
        np.testing.assert_allclose(
            np.asarray(out), np.asarray(aux["patch_grid"]).mean((1, 2)), atol=1e-5
        )


def test_vit_init_is_deterministic_and_eval_shape_cheap():
    model = tiny_vit()
    x = images()
    a = model.init(jax.random.key(0), x)
    b = model.init(jax.random.key(0), x)
    c = model.init(jax.random.key(1), x)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(a)
    assert not np.allclose(a["params"]["pos_embedding"], c["params"]["pos_embedding"])


def test_vit_other_resolution_uses_resized_pe(vit_vars):
    """A 6x4 patch grid with a 4x4 learned PE == a model whose PE is the bilinearly resized one."""
    x = images(h=48, w=32)
    small = tiny_vit()
    variables = vit_vars
    out, aux = jax.jit(small.apply)(variables, x)
    assert out.shape == (2, 64) and aux["patch_grid"].shape == (2, 6, 4, 64)
    pe = variables["params"]["pos_embedding"]
    resized = jax.image.resize(pe, (6, 4, 64), "bilinear", antialias=False)
    big = tiny_vit(posemb_grid=(6, 4))
    ref, _ = jax.jit(big.apply)(with_param(variables, ("params", "pos_embedding"), resized), x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_vit_cpe_per_example_and_full_box_equivalence(vit_vars):
    model = tiny_vit()
    apply = jax.jit(model.apply)
    x = jnp.tile(images(batch=1), (3, 1, 1, 1))  # identical images
    variables = vit_vars
    boxes = jnp.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.1, 0.3, 0.9, 0.6]])
    out, _ = apply(variables, x, crop_boxes=boxes)
    out = np.asarray(out)
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(out[a] - out[b]).max() > 1e-3
    # Each example's output is the plain model with that example's cropped PE as its PE.
    pe = variables["params"]["pos_embedding"]
    crops = crop_pos_embed(pe, boxes, up_size=8)
    for i in range(3):
        ref, _ = apply(with_param(variables, ("params", "pos_embedding"), crops[i]), x)
        np.testing.assert_allclose(out[i], np.asarray(ref[i]), atol=1e-5)
    # Full boxes with cpe_up_size == grid reproduce the whole PE.
    native = tiny_vit(cpe_up_size=4)
    full, _ = jax.jit(native.apply)(
        variables, x, crop_boxes=jnp.tile(jnp.array([[0.0, 0, 1, 1]]), (3, 1))
    )
    plain, _ = apply(variables, x)
    np.testing.assert_allclose(np.asarray(full), np.asarray(plain), atol=1e-5)


def test_vit_cpe_requires_native_grid_and_batch_boxes(vit_vars):
    model = tiny_vit()
    variables = vit_vars
    with pytest.raises(ValueError, match="posemb_grid"):
        model.apply(variables, images(h=48), crop_boxes=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="crop_boxes"):
        model.apply(variables, images(), crop_boxes=jnp.zeros((3, 4)))


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(pool_type="cls"), "pool_type"),
        (dict(remat_policy="some"), "remat_policy"),
        (dict(pool_type="tok", window_size=2), "window_size"),
        (dict(window_size=2, global_blocks=(5,)), "global_blocks"),
    ],
)
def test_vit_rejects_bad_fields(kw, name):
    with pytest.raises(ValueError, match=name):
        tiny_vit(**kw).init(jax.random.key(0), images())


def test_vit_rejects_indivisible_images():
    with pytest.raises(ValueError, match="patch_size"):
        tiny_vit().init(jax.random.key(0), images(h=30))


def test_vit_variants():
    assert vit_variant("B/16") == dict(
        width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16
    )
    assert vit_variant("L/16") == dict(
        width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=16
    )
    assert vit_variant("H/14") == dict(
        width=1280, depth=32, mlp_dim=5120, num_heads=16, patch_size=14
    )
    assert vit_variant("Ti/16")["width"] == 192 and vit_variant("S/16")["num_heads"] == 6
    assert vit_variant("mu/8") == dict(MU, patch_size=8)
    assert vit_variant("pico/4") == dict(width=96, depth=3, mlp_dim=384, num_heads=3, patch_size=4)
    assert vit_variant("nano/8") == dict(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8)
    for bad in ["X/16", "B", "B16", "B/0", "b/16", "/16"]:
        with pytest.raises(ValueError, match=bad):
            vit_variant(bad)


def test_vit_bfloat16_compute_keeps_float32_params(vit_vars):
    x = images()
    f32 = tiny_vit()
    variables = vit_vars
    bf16 = tiny_vit(dtype=jnp.bfloat16)
    bf_vars = jax.eval_shape(bf16.init, jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(bf_vars))
    out_bf, aux = jax.jit(bf16.apply)(variables, x)
    out_f32, _ = jax.jit(f32.apply)(variables, x)
    assert out_bf.dtype == jnp.bfloat16 and aux["patch_grid"].dtype == jnp.bfloat16
    out_bf = np.asarray(out_bf.astype(jnp.float32))
    assert np.isfinite(out_bf).all()
    # bf16 has ~3 significant digits; outputs are LayerNorm-scale (~1).
    assert np.abs(out_bf - np.asarray(out_f32)).max() < 0.1


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_vit_remat_matches_no_remat(policy):
    x = images()
    boxes = jnp.array([[0.0, 0.1, 0.6, 0.9], [0.2, 0.2, 1.0, 0.7]])
    plain = tiny_vit(depth=1)
    remat = tiny_vit(depth=1, remat_policy=policy)
    variables = plain.init(jax.random.key(0), x)
    remat_shapes = jax.eval_shape(remat.init, jax.random.key(0), x)  # same parameter layout
    assert jax.tree_util.tree_structure(remat_shapes) == jax.tree_util.tree_structure(variables)

    def loss(model):
        def fn(v):
            out, _ = model.apply(v, x, crop_boxes=boxes, train=True)
            return jnp.sum(out**2)

        return jax.jit(jax.value_and_grad(fn))

    v0, g0 = loss(plain)(variables)
    v1, g1 = loss(remat)(variables)
    np.testing.assert_allclose(float(v0), float(v1), rtol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g0)) > 0
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g0, g1
    )


def test_vit_dropout_only_in_train(vit_vars):
    model = tiny_vit(dropout=0.5)
    x = images()
    variables = vit_vars
    a, _ = model.apply(variables, x)
    b, _ = model.apply(variables, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3


def test_window_attention_covering_grid_equals_global(vit_vars):
    """A window as large as the grid, or larger (padded, padding masked), is global attention."""
    x = images()
    variables = vit_vars
    ref, _ = tiny_vit().apply(variables, x)
    for window in (4, 6):
        out, _ = tiny_vit(window_size=window).apply(variables, x)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_window_attention_is_local():
    """With 3x3 windows on a 4x4 grid (padded), a patch only influences its own window."""
    x = images(batch=1)
    x2 = x.at[:, :8, :8].add(1.0)  # changes patch (0, 0) only
    model = tiny_vit(window_size=3, depth=1)
    variables = model.init(jax.random.key(0), x)
    _, a = model.apply(variables, x)
    _, b = model.apply(variables, x2)
    diff = np.abs(np.asarray(a["block_0"] - b["block_0"])).max(-1).reshape(4, 4)
    inside = np.zeros((4, 4), bool)
    inside[:3, :3] = True
    assert diff[inside].min() > 1e-4
    assert diff[~inside].max() < 1e-6
    # A global block spreads the change everywhere.
    glob = tiny_vit(window_size=3, depth=1, global_blocks=(0,))
    _, a = glob.apply(variables, x)
    _, b = glob.apply(variables, x2)
    assert np.abs(np.asarray(a["block_0"] - b["block_0"])).max(-1).min() > 1e-4


# ---------------------------------------------------------------------------------------------
# Text transformer
# ---------------------------------------------------------------------------------------------
def tiny_text(**kw):
    args = dict(MU, vocab_size=50, max_len=12)
    args.update(kw)
    return TextTransformer(**args)


TOKENS = jnp.array([[3, 9, 4, 0, 0, 0], [7, 7, 8, 2, 5, 11]], jnp.int32)


@pytest.mark.parametrize("pool_type", ["mean", "last", "first", "map"])
def test_text_shapes(pool_type):
    model = tiny_text(pool_type=pool_type)
    variables = model.init(jax.random.key(0), TOKENS)
    assert variables["params"]["pos_embedding"].shape == (12, 64)
    assert variables["params"]["embedding"]["embedding"].shape == (50, 64)
    out, aux = model.apply(variables, TOKENS)
    assert out.shape == (2, 64) and aux["tokens"].shape == (2, 6, 64)
    np.testing.assert_array_equal(
        np.asarray(aux["valid"]), [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    )


def test_text_pooling_reads_the_right_tokens():
    lengths = [3, 6]
    for pool_type in ("mean", "last", "first"):
        model = tiny_text(pool_type=pool_type)
        variables = model.init(jax.random.key(0), TOKENS)
        out, aux = model.apply(variables, TOKENS)
        tok = np.asarray(aux["tokens"])
        for i, n in enumerate(lengths):
            expected = {"mean": tok[i, :n].mean(0), "last": tok[i, n - 1], "first": tok[i, 0]}[
                pool_type
            ]
            np.testing.assert_allclose(np.asarray(out[i]), expected, atol=1e-5)


@pytest.mark.parametrize("pool_type", ["mean", "last", "map"])
def test_text_padding_invariance(pool_type):
    model = tiny_text(pool_type=pool_type)
    variables = model.init(jax.random.key(0), TOKENS)
    apply = jax.jit(model.apply)
    ref, _ = apply(variables, TOKENS)
    longer = jnp.pad(TOKENS, ((0, 0), (0, 4)))  # append pad tokens
    out, _ = apply(variables, longer)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    junk = longer.at[0, 4:].set(jnp.array([13, 14, 0, 15, 16, 17]))  # content beyond length
    out, _ = apply(variables, junk)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), atol=1e-5)
    changed = TOKENS.at[0, 1].set(10)  # a real token change must matter
    out, _ = apply(variables, changed)
    assert np.abs(np.asarray(out[0] - ref[0])).max() > 1e-3
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(ref[1]), atol=1e-5)


def test_text_rejects_bad_input():
    with pytest.raises(ValueError, match="pool_type"):
        tiny_text(pool_type="max").init(jax.random.key(0), TOKENS)
    with pytest.raises(ValueError, match="max_len"):
        tiny_text(max_len=4).init(jax.random.key(0), TOKENS)
    with pytest.raises(ValueError, match="remat_policy"):
        tiny_text(remat_policy="x").init(jax.random.key(0), TOKENS)


def test_text_remat_matches_no_remat():
    plain, remat = tiny_text(), tiny_text(remat_policy="full")
    variables = plain.init(jax.random.key(0), TOKENS)

    def grads(model):
        return jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, TOKENS)[0] ** 2)))(variables)

    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
        grads(plain),
        grads(remat),
    )


def test_text_variants():
    assert text_variant("B") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12)
    assert text_variant("B/16") == text_variant("B")
    for name in ("mu", "pico", "nano"):
        v = vit_variant(name + "/8")
        assert text_variant(name) == {k: v[k] for k in ("width", "depth", "mlp_dim", "num_heads")}
    with pytest.raises(ValueError, match="Q"):
        text_variant("Q")


# ---------------------------------------------------------------------------------------------
# Two towers
# ---------------------------------------------------------------------------------------------
def tiny_two_tower(**kw):
    args = dict(
        image=dict(MU, patch_size=8, posemb_grid=(4, 4), cpe_up_size=8),
        text=dict(MU, vocab_size=50, max_len=12),
        embed_dim=32,
    )
    args.update(kw)
    return TwoTower(**args)


def test_two_tower_embeddings_scale_and_methods():
    model = tiny_two_tower(temperature_init=7.0)
    x = images()
    variables = model.init(jax.random.key(0), x, TOKENS)
    params = variables["params"]
    assert {"img", "txt", "img_proj", "txt_proj", "t", "b"} <= set(params)
    assert "bias" not in params["img_proj"]
    (zimg, ztxt), aux = model.apply(variables, x, TOKENS)
    assert zimg.shape == (2, 32) and ztxt.shape == (2, 32)
    assert zimg.dtype == jnp.float32 and ztxt.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zimg), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ztxt), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(float(aux["scale"]), 7.0, rtol=1e-6)
    np.testing.assert_allclose(float(params["t"]), math.log(7.0), rtol=1e-6)
    np.testing.assert_allclose(float(aux["bias"]), -10.0)
    assert aux["img/patch_grid"].shape == (2, 4, 4, 64) and aux["txt/tokens"].shape == (2, 6, 64)
    # The image embedding is the normalised projection of the tower's pooled features.
    proj = np.asarray(aux["img/pre_logits"]) @ np.asarray(params["img_proj"]["kernel"])
    np.testing.assert_allclose(
        np.asarray(zimg), proj / np.linalg.norm(proj, axis=-1, keepdims=True), atol=1e-5
    )

    zi = model.apply(variables, x, method=TwoTower.embed_images)
    zt = model.apply(variables, TOKENS, method=TwoTower.embed_texts)
    np.testing.assert_allclose(np.asarray(zi), np.asarray(zimg), atol=1e-6)
    np.testing.assert_allclose(np.asarray(zt), np.asarray(ztxt), atol=1e-6)

    boxes = jnp.array([[0.0, 0.0, 0.5, 0.5], [0.2, 0.3, 0.9, 1.0]])
    (zc, none), _ = model.apply(variables, x, None, crop_boxes=boxes)
    assert none is None
    zc2 = model.apply(variables, x, crop_boxes=boxes, method=TwoTower.embed_images)
    np.testing.assert_allclose(np.asarray(zc), np.asarray(zc2), atol=1e-6)
    assert np.abs(np.asarray(zc) - np.asarray(zimg)).max() > 1e-4


def test_two_tower_without_bias_and_eval_shape():
    model = tiny_two_tower(bias_init=None)
    x = images()
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, TOKENS)
    assert "b" not in shapes["params"] and shapes["params"]["t"].shape == ()
    variables = model.init(jax.random.key(0), x, TOKENS)
    (zimg, ztxt), aux = model.apply(variables, None, TOKENS)
    assert zimg is None and ztxt.shape == (2, 32)
    assert float(aux["bias"]) == 0.0
    np.testing.assert_allclose(float(aux["scale"]), 10.0, rtol=1e-6)


def test_two_tower_bfloat16():
    model = tiny_two_tower(
        dtype=jnp.bfloat16,
        image=dict(MU, depth=1, patch_size=8, posemb_grid=(4, 4)),
        text=dict(MU, depth=1, vocab_size=50, max_len=12),
    )
    x = images()
    variables = model.init(jax.random.key(0), x, TOKENS)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    (zimg, ztxt), aux = jax.jit(model.apply)(variables, x, TOKENS)
    assert zimg.dtype == jnp.float32 and aux["img/patch_grid"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ztxt), axis=-1), 1.0, atol=1e-5)


def test_logical_axis_names_are_traced_not_stored():
    from rovit_jax.models.logical_axes import named, param_logical_axes
    from rovit_jax.train.mesh import path_str

    model = TwoTower(
        image=dict(vit_variant("mu/8"), posemb_grid=(4, 4)),
        text=dict(text_variant("mu"), vocab_size=50, max_len=8),
        embed_dim=16,
    )

    def init(rng):
        return model.init(rng, images(1), jnp.ones((1, 8), jnp.int32))["params"]

    names = {path_str(p): n for p, n in param_logical_axes(init, jax.random.key(0)).items()}
    params = init(jax.random.key(0))
    shapes = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    # Plain arrays outside the trace: checkpoints and callers of `init` see no boxes.
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    block = "txt/Transformer/encoderblock_1/"
    assert names[block + "MultiHeadDotProductAttention_0/query/kernel"] == ("embed", "heads", "kv")
    assert names[block + "MultiHeadDotProductAttention_0/out/kernel"] == ("heads", "kv", "embed")
    assert names[block + "MlpBlock_0/Dense_1/kernel"] == ("mlp", "embed")
    assert names["txt/embedding/embedding"] == ("vocab", "embed")
    assert names["img/embedding/kernel"] == (None, None, None, "embed")
    # Every transformer weight matrix is named, with one name per dimension.
    for path, shape in shapes.items():
        if "Transformer/encoderblock" in path and path.endswith("kernel"):
            assert path in names, path
        if path in names:
            assert len(names[path]) == len(shape), path
    with pytest.raises(ValueError, match="unknown logical axis"):
        named(jax.nn.initializers.zeros, "width")
