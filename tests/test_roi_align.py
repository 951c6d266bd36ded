"""Tests for rovit_jax.ops.roi_align against torchvision.ops.roi_align (aligned=True)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from rovit_jax.ops.roi_align import (
    assign_fpn_levels,
    batched_roi_align,
    multilevel_roi_align,
    roi_align,
)


def tv_roi_align(
    features: np.ndarray, boxes: np.ndarray, out, scale: float, sampling_ratio: int, aligned=True
) -> np.ndarray:
    """torchvision reference on [H, W, C] features and [N, 4] yxyx boxes -> [N, oh, ow, C]."""
    rois = np.concatenate([np.zeros((len(boxes), 1)), boxes[:, [1, 0, 3, 2]]], axis=1)
    ref = torchvision.ops.roi_align(
        torch.from_numpy(features).permute(2, 0, 1)[None].contiguous(),
        torch.from_numpy(rois.astype(np.float32)),
        output_size=out,
        spatial_scale=scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    return ref.permute(0, 2, 3, 1).numpy()


def mixed_boxes(rs: np.random.RandomState, n: int, image_h: float, image_w: float) -> np.ndarray:
    """Boxes in image pixels: ordinary, partly/fully outside the image, and tiny."""
    third = n // 3
    lo = rs.uniform(0, 0.7, size=(third, 2)) * [image_h, image_w]
    size = rs.uniform(0.05, 0.5, size=(third, 2)) * [image_h, image_w]
    ordinary = np.concatenate([lo, lo + size], 1)
    lo = rs.uniform(-0.4, 1.1, size=(third, 2)) * [image_h, image_w]
    size = rs.uniform(0.1, 0.8, size=(third, 2)) * [image_h, image_w]
    outside = np.concatenate([lo, lo + size], 1)
    rest = n - 2 * third
    lo = rs.uniform(0, 1, size=(rest, 2)) * [image_h, image_w]
    tiny = np.concatenate([lo, lo + rs.uniform(0.0, 2.0, size=(rest, 2))], 1)
    return np.concatenate([ordinary, outside, tiny]).astype(np.float32)


@pytest.mark.parametrize(
    "scale, sampling_ratio, out",
    [(1.0, 1, 7), (0.5, 2, (5, 3)), (0.25, 2, 4), (0.125, 3, 2)],
)
def test_roi_align_matches_torchvision(scale, sampling_ratio, out):
    rs = np.random.RandomState(int(scale * 100) + sampling_ratio)
    h, w, c = 9, 12, 3
    features = rs.randn(h, w, c).astype(np.float32)
    boxes = mixed_boxes(rs, 60, h / scale, w / scale)
    got = roi_align(
        jnp.asarray(features),
        jnp.asarray(boxes),
        output_size=out,
        spatial_scale=scale,
        sampling_ratio=sampling_ratio,
    )
    ref = tv_roi_align(features, boxes, out, scale, sampling_ratio)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    # The out-of-range rule must actually be exercised: some samples outside contribute 0.
    assert np.any(ref == 0.0)


def test_roi_align_unaligned_matches_torchvision():
    rs = np.random.RandomState(11)
    features = rs.randn(8, 10, 2).astype(np.float32)
    boxes = mixed_boxes(rs, 30, 16.0, 20.0)
    got = roi_align(
        jnp.asarray(features),
        jnp.asarray(boxes),
        output_size=3,
        spatial_scale=0.5,
        sampling_ratio=2,
        aligned=False,
    )
    ref = tv_roi_align(features, boxes, 3, 0.5, 2, aligned=False)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_batched_roi_align_and_jit_and_grad():
    rs = np.random.RandomState(12)
    features = rs.randn(2, 6, 7, 4).astype(np.float32)
    boxes = np.stack([mixed_boxes(rs, 9, 24.0, 28.0) for _ in range(2)])
    fn = jax.jit(
        lambda f, b: batched_roi_align(f, b, output_size=3, spatial_scale=0.25, sampling_ratio=2)
    )
    got = fn(jnp.asarray(features), jnp.asarray(boxes))
    assert got.shape == (2, 9, 3, 3, 4)
    for i in range(2):
        ref = tv_roi_align(features[i], boxes[i], 3, 0.25, 2)
        np.testing.assert_allclose(got[i], ref, atol=1e-5, rtol=1e-5)
    # Gradient w.r.t. the features equals torchvision's backward pass.
    cot = rs.randn(*got.shape).astype(np.float32)
    grad = jax.grad(
        lambda f: jnp.sum(
            batched_roi_align(f, jnp.asarray(boxes), output_size=3, spatial_scale=0.25) * cot
        )
    )(jnp.asarray(features))
    for i in range(2):
        ft = torch.from_numpy(features[i]).permute(2, 0, 1)[None].contiguous().requires_grad_()
        rois = np.concatenate([np.zeros((9, 1)), boxes[i][:, [1, 0, 3, 2]]], 1).astype(np.float32)
        out = torchvision.ops.roi_align(
            ft, torch.from_numpy(rois), 3, spatial_scale=0.25, sampling_ratio=2, aligned=True
        )
        (out * torch.from_numpy(cot[i]).permute(0, 3, 1, 2)).sum().backward()
        ref_grad = ft.grad[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(grad[i], ref_grad, atol=1e-5, rtol=1e-5)


def np_level(box: np.ndarray, lo: int, hi: int, canonical_level: int, canonical_size: float):
    area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
    if area <= 0:
        return lo
    level = math.floor(canonical_level + math.log2(math.sqrt(area) / canonical_size))
    return min(max(level, lo), hi)


def test_multilevel_roi_align_uses_the_fpn_level_rule():
    rs = np.random.RandomState(13)
    image = 128
    levels = range(2, 6)
    features = {lv: rs.randn(2, image >> lv, image >> lv, 3).astype(np.float32) for lv in levels}
    # Side lengths spread over every level with canonical_size 32: sqrt(area) from 2 to 200.
    n = 40
    sides = np.exp(rs.uniform(np.log(2.0), np.log(200.0), size=(2, n, 1)))
    aspect = np.exp(rs.uniform(-0.5, 0.5, size=(2, n, 1)))
    hw = np.concatenate([sides / np.sqrt(aspect), sides * np.sqrt(aspect)], -1)
    lo = rs.uniform(-10, image - 10, size=(2, n, 2))
    boxes = np.concatenate([lo, lo + hw], -1).astype(np.float32)
    boxes[0, 0] = [5.0, 5.0, 5.0, 9.0]  # empty box -> min_level
    kw = dict(min_level=2, max_level=5, canonical_level=4, canonical_size=32.0)
    fn = jax.jit(
        lambda f, b: multilevel_roi_align(f, b, output_size=(3, 2), sampling_ratio=2, **kw)
    )
    got = np.asarray(fn({k: jnp.asarray(v) for k, v in features.items()}, jnp.asarray(boxes)))
    assert got.shape == (2, n, 3, 2, 3)
    got_levels = np.asarray(assign_fpn_levels(jnp.asarray(boxes), **kw))
    used = set()
    for b in range(2):
        for i in range(n):
            level = np_level(boxes[b, i].astype(np.float64), 2, 5, 4, 32.0)
            used.add(level)
            assert got_levels[b, i] == level
            ref = tv_roi_align(features[level][b], boxes[b, i : i + 1], (3, 2), 2.0**-level, 2)
            np.testing.assert_allclose(got[b, i : i + 1], ref, atol=1e-5, rtol=1e-5)
    assert used == {2, 3, 4, 5}


def test_bad_arguments_raise():
    f = jnp.zeros((4, 4, 1))
    b = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(f, b, output_size=2, spatial_scale=1.0, sampling_ratio=0)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(f, b, output_size=(2, 2, 2), spatial_scale=1.0)
    with pytest.raises(ValueError, match="features must be"):
        roi_align(jnp.zeros((4, 4)), b, output_size=2, spatial_scale=1.0)
    with pytest.raises(ValueError, match="missing levels"):
        multilevel_roi_align({2: jnp.zeros((1, 4, 4, 1))}, b[None], output_size=2)


@pytest.mark.parametrize("method", ["gather", "matmul"])
def test_both_methods_match_torchvision_values_and_gradients(method):
    rs = np.random.RandomState(14)
    features = rs.randn(2, 9, 12, 3).astype(np.float32)
    boxes = np.stack([mixed_boxes(rs, 30, 18.0, 24.0) for _ in range(2)])
    cot = rs.randn(2, 30, 4, 3, 3).astype(np.float32)

    def loss(f, b):
        out = batched_roi_align(f, b, output_size=(4, 3), spatial_scale=0.5, method=method)
        return jnp.sum(out * cot), out

    (_, got), grad = jax.value_and_grad(loss, has_aux=True)(
        jnp.asarray(features), jnp.asarray(boxes)
    )
    for i in range(2):
        ft = torch.from_numpy(features[i]).permute(2, 0, 1)[None].contiguous().requires_grad_()
        rois = np.concatenate([np.zeros((30, 1)), boxes[i][:, [1, 0, 3, 2]]], 1)
        out = torchvision.ops.roi_align(
            ft,
            torch.from_numpy(rois.astype(np.float32)),
            (4, 3),
            spatial_scale=0.5,
            sampling_ratio=2,
            aligned=True,
        )
        ref = out.permute(0, 2, 3, 1).detach().numpy()
        np.testing.assert_allclose(got[i], ref, atol=1e-5, rtol=1e-5)
        (out * torch.from_numpy(cot[i]).permute(0, 3, 1, 2)).sum().backward()
        ref_grad = ft.grad[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(grad[i], ref_grad, atol=1e-5, rtol=1e-5)


def test_gather_and_matmul_methods_agree_on_a_pyramid_with_box_gradients():
    rs = np.random.RandomState(15)
    features = {lv: jnp.asarray(rs.randn(2, 64 >> lv, 64 >> lv, 5), jnp.float32) for lv in (2, 3)}
    features[4] = jnp.asarray(rs.randn(2, 4, 4, 5), jnp.float32)
    boxes = jnp.asarray(np.stack([mixed_boxes(rs, 24, 64.0, 64.0) for _ in range(2)]))
    cot = jnp.asarray(rs.randn(2, 24, 3, 2, 5), jnp.float32)
    kw = dict(output_size=(3, 2), min_level=2, max_level=4, canonical_size=32.0)

    def loss(method):
        return lambda f, b: jnp.sum(multilevel_roi_align(f, b, method=method, **kw) * cot)

    methods = ("gather", "matmul")
    values = {m: multilevel_roi_align(features, boxes, method=m, **kw) for m in methods}
    np.testing.assert_allclose(values["gather"], values["matmul"], atol=1e-5, rtol=1e-5)
    grads = {m: jax.grad(loss(m), argnums=(0, 1))(features, boxes) for m in methods}
    for lv in features:
        np.testing.assert_allclose(grads["gather"][0][lv], grads["matmul"][0][lv], atol=1e-5)
    np.testing.assert_allclose(grads["gather"][1], grads["matmul"][1], atol=1e-4, rtol=1e-4)
    assert np.any(np.asarray(grads["gather"][1]) != 0)


def test_auto_method_keeps_gathers_for_large_maps():
    from rovit_jax.ops.roi_align import _use_matmul

    assert _use_matmul("auto", (7, 7), [(32, 32), (16, 16), (8, 8)], 2)  # 256 px, P3-P5
    assert not _use_matmul("auto", (7, 7), [(256 >> i, 256 >> i) for i in range(4)], 2)  # 1024 px
    assert not _use_matmul("gather", (7, 7), [(4, 4)], 2)
    assert _use_matmul("matmul", (7, 7), [(512, 512)], 2)
    with pytest.raises(ValueError, match="method"):
        roi_align(
            jnp.zeros((4, 4, 1)), jnp.zeros((1, 4)), output_size=2, spatial_scale=1.0, method="x"
        )
