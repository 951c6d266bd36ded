"""Tests for rovit_jax.ops.posemb against independent numpy / torch / torchvision references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from rovit_jax.ops.posemb import crop_pos_embed, resize_pos_embed, sample_crop_boxes


# ---------------------------------------------------------------------------------------------
# Independent numpy reference: explicit loops, half-pixel centres, clamped bilinear sampling.
# ---------------------------------------------------------------------------------------------
def np_sample(grid: np.ndarray, y: float, x: float) -> np.ndarray:
    """Bilinear sample of grid [H, W, D] at continuous (y, x), clamped to the cell centres."""
    h, w = grid.shape[:2]
    y = min(max(y, 0.0), h - 1.0)
    x = min(max(x, 0.0), w - 1.0)
    ya, xa = int(math.floor(y)), int(math.floor(x))
    yb, xb = min(ya + 1, h - 1), min(xa + 1, w - 1)
    dy, dx = y - ya, x - xa
    return (
        (1 - dy) * (1 - dx) * grid[ya, xa]
        + (1 - dy) * dx * grid[ya, xb]
        + dy * (1 - dx) * grid[yb, xa]
        + dy * dx * grid[yb, xb]
    )


def np_resize(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w, d = grid.shape
    out = np.zeros((out_h, out_w, d), np.float64)
    for i in range(out_h):
        for j in range(out_w):
            out[i, j] = np_sample(grid, (i + 0.5) * h / out_h - 0.5, (j + 0.5) * w / out_w - 0.5)
    return out


def np_crop(grid: np.ndarray, boxes: np.ndarray, up: int) -> np.ndarray:
    h, w, d = grid.shape
    upg = np_resize(grid, up, up)
    out = np.zeros((len(boxes), h, w, d), np.float64)
    for b, (y0, x0, y1, x1) in enumerate(boxes):
        for i in range(h):
            for j in range(w):
                y = y0 * up + (i + 0.5) * (y1 - y0) * up / h - 0.5
                x = x0 * up + (j + 0.5) * (x1 - x0) * up / w - 0.5
                out[b, i, j] = np_sample(upg, y, x)
    return out


def random_boxes(rs: np.random.RandomState, n: int) -> np.ndarray:
    lo = rs.uniform(0.0, 0.6, size=(n, 2))
    size = rs.uniform(0.1, 0.4, size=(n, 2))
    return np.concatenate([lo, lo + size], axis=1).astype(np.float32)  # (y0, x0, y1, x1)


@pytest.fixture
def pe():
    return np.random.RandomState(0).normal(size=(5, 4, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# crop_pos_embed
# ---------------------------------------------------------------------------------------------
def test_full_box_at_native_size_is_identity():
    pe = np.random.RandomState(1).normal(size=(6, 6, 8)).astype(np.float32)
    boxes = jnp.tile(jnp.array([[0.0, 0.0, 1.0, 1.0]]), (3, 1))
    out = crop_pos_embed(jnp.asarray(pe), boxes, up_size=6)
    assert out.shape == (3, 6, 6, 8)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(pe, out.shape), atol=1e-5)


@pytest.mark.parametrize("up_size", [11, 16, 3])
def test_crop_matches_numpy_loops(pe, up_size):
    rs = np.random.RandomState(up_size)
    boxes = random_boxes(rs, 4)
    boxes[0] = [0.0, 0.0, 1.0, 1.0]
    boxes[1] = [0.9, 0.0, 1.0, 0.05]  # tiny box at an edge: exercises clamping
    out = crop_pos_embed(jnp.asarray(pe), jnp.asarray(boxes), up_size=up_size)
    assert out.shape == (4, 5, 4, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), np_crop(pe.astype(np.float64), boxes, up_size), atol=1e-5
    )


def test_different_boxes_give_different_embeddings(pe):
    boxes = random_boxes(np.random.RandomState(3), 4)
    out = np.asarray(crop_pos_embed(jnp.asarray(pe), jnp.asarray(boxes), up_size=16))
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(out[a] - out[b]).max() > 1e-2


def test_crop_matches_torchvision_roi_align(pe):
    """Stage 2 (crop-and-resize) is RoIAlign(aligned=True, sampling_ratio=1) on the upsampled
    grid, with box corners scaled to pixels of that grid."""
    up = 16
    h, w, d = pe.shape
    boxes = random_boxes(np.random.RandomState(4), 5)
    boxes[0] = [0.0, 0.0, 1.0, 1.0]
    # Upsampled grid from torch (independent of the code under test).
    grid = torch.from_numpy(pe.astype(np.float64)).permute(2, 0, 1)[None]
    up_grid = torch.nn.functional.interpolate(
        grid, size=(up, up), mode="bilinear", align_corners=False
    )
    rois = torch.from_numpy(
        np.stack(
            [
                np.zeros(len(boxes)),
                boxes[:, 1] * up,
                boxes[:, 0] * up,
                boxes[:, 3] * up,
                boxes[:, 2] * up,
            ],
            axis=1,
        )
    )
    ref = torchvision.ops.roi_align(
        up_grid, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True
    )
    ref = ref.permute(0, 2, 3, 1).numpy()
    out = crop_pos_embed(jnp.asarray(pe), jnp.asarray(boxes), up_size=up)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_crop_gradient_matches_finite_differences():
    rs = np.random.RandomState(5)
    pe = rs.normal(size=(3, 3, 2)).astype(np.float32)
    boxes = jnp.asarray(random_boxes(rs, 2))
    weights = jnp.asarray(rs.normal(size=(2, 3, 3, 2)).astype(np.float32))

    def loss(p):
        return jnp.sum(crop_pos_embed(p, boxes, up_size=7) * weights)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(pe)))
    assert np.abs(grad).max() > 1e-3
    eps = 1e-1  # the op is linear in pe, so central differences are exact up to rounding
    fd = np.zeros_like(pe)
    for idx in np.ndindex(pe.shape):
        delta = np.zeros_like(pe)
        delta[idx] = eps
        plus, minus = loss(jnp.asarray(pe + delta)), loss(jnp.asarray(pe - delta))
        fd[idx] = (float(plus) - float(minus)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=2e-3)


def test_crop_jits_and_keeps_dtype(pe):
    boxes = jnp.asarray(random_boxes(np.random.RandomState(6), 3))
    fn = jax.jit(lambda p, b: crop_pos_embed(p, b, up_size=9))
    out = fn(jnp.asarray(pe), boxes)
    ref = np_crop(pe.astype(np.float64), np.asarray(boxes), 9)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    out_bf16 = fn(jnp.asarray(pe, jnp.bfloat16), boxes)
    assert out_bf16.dtype == jnp.bfloat16


def test_crop_rejects_bad_shapes(pe):
    with pytest.raises(ValueError, match="pos_embed"):
        crop_pos_embed(jnp.zeros((4, 3)), jnp.zeros((2, 4)), up_size=8)
    with pytest.raises(ValueError, match="boxes"):
        crop_pos_embed(jnp.asarray(pe), jnp.zeros((2, 3)), up_size=8)
    with pytest.raises(ValueError, match="boxes"):
        crop_pos_embed(jnp.asarray(pe), jnp.zeros((4,)), up_size=8)
    with pytest.raises(ValueError, match="up_size"):
        crop_pos_embed(jnp.asarray(pe), jnp.zeros((2, 4)), up_size=0)


# ---------------------------------------------------------------------------------------------
# resize_pos_embed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_hw", [(9, 7), (3, 2), (5, 4), (10, 3)])
def test_resize_matches_jax_image_torch_and_numpy(pe, out_hw):
    out = np.asarray(resize_pos_embed(jnp.asarray(pe), out_hw))
    assert out.shape == (*out_hw, 3)
    ref_jax = jax.image.resize(jnp.asarray(pe), (*out_hw, 3), "bilinear", antialias=False)
    np.testing.assert_allclose(out, np.asarray(ref_jax), atol=1e-5)
    grid = torch.from_numpy(pe).permute(2, 0, 1)[None]
    ref_torch = torch.nn.functional.interpolate(
        grid, size=out_hw, mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(out, ref_torch[0].permute(1, 2, 0).numpy(), atol=1e-5)
    np.testing.assert_allclose(out, np_resize(pe.astype(np.float64), *out_hw), atol=1e-5)


def test_resize_rejects_bad_input(pe):
    with pytest.raises(ValueError, match="pos_embed"):
        resize_pos_embed(jnp.zeros((1, 4, 3, 2)), (2, 2))
    with pytest.raises(ValueError, match="out_hw"):
        resize_pos_embed(jnp.asarray(pe), (0, 2))
    with pytest.raises(ValueError, match="out_hw"):
        resize_pos_embed(jnp.asarray(pe), (2, 2, 2))


# ---------------------------------------------------------------------------------------------
# sample_crop_boxes
# ---------------------------------------------------------------------------------------------
def test_sampled_boxes_are_valid_and_respect_ranges():
    n = 20000
    boxes = np.asarray(sample_crop_boxes(jax.random.key(0), n))
    assert boxes.shape == (n, 4) and boxes.dtype == np.float32
    y0, x0, y1, x1 = boxes.T
    h, w = y1 - y0, x1 - x0
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0 + 1e-6
    assert (h > 0).all() and (w > 0).all()
    aspect = w / h
    assert aspect.min() >= 0.5 * (1 - 1e-4) and aspect.max() <= 2.0 * (1 + 1e-4)
    area = h * w
    assert area.max() <= 1.0 + 1e-5
    clipped = np.maximum(h, w) >= 1.0 - 1e-6
    assert 0 < clipped.mean() < 0.5  # with these defaults some, not most, boxes hit the border
    assert area[~clipped].min() >= 0.1 - 1e-5
    # Aspect ratio is log-uniform on [0.5, 2]: log-ratio mean ~ 0, half of them below 1.
    assert abs(np.log(aspect).mean()) < 0.02
    assert abs((aspect < 1).mean() - 0.5) < 0.02
    # Positions cover the square: both low and high corners occur.
    assert y0.min() < 0.01 and x0.min() < 0.01 and y1.max() > 0.99 and x1.max() > 0.99


def test_area_is_uniform_without_clipping():
    boxes = np.asarray(
        sample_crop_boxes(jax.random.key(1), 20000, scale=(0.1, 1.0), ratio=(1.0, 1.0))
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert abs(area.mean() - 0.55) < 0.01
    for q in (0.25, 0.5, 0.75):  # CDF of U(0.1, 1)
        assert abs((area < 0.1 + 0.9 * q).mean() - q) < 0.015
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], rtol=1e-5)


def test_positions_uniform_for_fixed_size():
    boxes = np.asarray(
        sample_crop_boxes(jax.random.key(2), 20000, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    )
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 0.5, atol=1e-5)
    assert abs(boxes[:, 0].mean() - 0.25) < 0.005 and abs(boxes[:, 1].mean() - 0.25) < 0.005
    assert abs(boxes[:, 0].std() - 0.5 / math.sqrt(12)) < 0.005
    assert abs(np.corrcoef(boxes[:, 0], boxes[:, 1])[0, 1]) < 0.03


def test_sampler_is_deterministic_and_jittable():
    a = sample_crop_boxes(jax.random.key(3), 8)
    b = jax.jit(lambda k: sample_crop_boxes(k, 8))(jax.random.key(3))
    c = sample_crop_boxes(jax.random.key(4), 8)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(scale=(0.0, 1.0)), "scale"),
        (dict(scale=(0.5, 0.2)), "scale"),
        (dict(scale=(0.1, 1.5)), "scale"),
        (dict(scale=(0.1,)), "scale"),
        (dict(ratio=(-1.0, 2.0)), "ratio"),
        (dict(ratio=(0.0, 2.0)), "ratio"),
        (dict(ratio=(2.0, 0.5)), "ratio"),
    ],
)
def test_sampler_rejects_bad_ranges(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_crop_boxes(jax.random.key(0), 4, **kwargs)


def test_sampler_rejects_bad_batch():
    with pytest.raises(ValueError, match="batch"):
        sample_crop_boxes(jax.random.key(0), 0)
