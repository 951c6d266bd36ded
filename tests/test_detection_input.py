"""Detection input: LSJ geometry, flips and scales; filtering and counting; batches; eval."""

import io

import numpy as np
import pytest
from PIL import Image

from rovit_jax.data import detection_example as dex
from rovit_jax.data import detection_input as di
from rovit_jax.data import detection_transforms as dtf
from rovit_jax.data import image_text, shapes_detection

# ------------------------------------------------------------------------------------------
# Synthetic examples written here.


def ramp_image(h, w):
    """R and G encode the source position: R = 4 * (y + 0.5), G = 4 * (x + 0.5); B is constant.

    Resampling is linear, so a canvas pixel's (R, G) / 4 is the source position it sampled.
    """
    assert h <= 63 and w <= 63
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 4 * np.arange(h)[:, None] + 2
    img[..., 1] = 4 * np.arange(w)[None, :] + 2
    img[..., 2] = 50
    return img


def rect_example(h, w, rects, labels=None, image=None, image_id=0):
    """Example whose instance masks are the pixel-edge rectangles (y0, x0, y1, x1)."""
    rects = np.asarray(rects, np.float32).reshape(-1, 4)
    masks = np.zeros((len(rects), h, w), np.bool_)
    for k, (y0, x0, y1, x1) in enumerate(rects.astype(int)):
        masks[k, y0:y1, x0:x1] = True
    return {
        "image": ramp_image(h, w) if image is None else image,
        "image_id": image_id,
        "boxes": rects / np.array([h, w, h, w], np.float32),
        "labels": np.arange(len(rects), dtype=np.int32) if labels is None else np.asarray(labels),
        "masks": masks,
    }


RECTS_40x56 = ((5, 10, 20, 30), (28, 36, 38, 54), (0, 0, 9, 12), (12, 40, 31, 47))


def tight(mask):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float64)


def recovered_axis(values):
    """Fits canvas index -> source coordinate from ramp values along one axis (interior only).

    Returns (a, b) with source = a * (canvas + 0.5) + b, i.e. canvas edge = (source - b) / a.
    """
    src = values / 4.0
    i = np.arange(len(src)) + 0.5
    inner = slice(2, len(src) - 2)  # resampling filters are truncated at the image border
    a, b = np.polyfit(i[inner], src[inner], 1)
    return a, b


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class ListSource:
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


# ------------------------------------------------------------------------------------------
# Transforms.


@pytest.mark.parametrize("with_masks", [True, False])
def test_lsj_boxes_and_masks_follow_the_image(with_masks):
    h, w, size = 40, 56, 48
    base = rect_example(h, w, RECTS_40x56)
    if not with_masks:
        del base["masks"]
    rects = np.asarray(RECTS_40x56, np.float64)
    for seed in range(24):
        out = dtf.large_scale_jitter(
            base, np.random.default_rng(seed), output_size=size, scale_range=(0.3, 2.5), flip=False
        )
        image, (ch, cw) = out["image"], out["valid_size"]
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        # Content fills exactly the top-left valid region; the padding is zero.
        assert (image[:ch, :cw, 2] > 0).all()
        assert not image[ch:].any() and not image[:, cw:].any()
        # Recover the source <- canvas mapping from the ramp, independently of the code.
        ay, by = recovered_axis(image[:ch, :cw, 0].astype(np.float64).mean(axis=1))
        ax, bx = recovered_axis(image[:ch, :cw, 1].astype(np.float64).mean(axis=0))
        scale = out["image_info"][2]
        np.testing.assert_allclose(out["image_info"][:2], [h, w])
        np.testing.assert_allclose([1 / ay, 1 / ax], [scale, scale], rtol=0.03)
        assert ch == min(round(h * scale), size) and cw == min(round(w * scale), size)
        expected = np.stack(
            [
                (rects[:, 0] - by) / ay,
                (rects[:, 1] - bx) / ax,
                (rects[:, 2] - by) / ay,
                (rects[:, 3] - bx) / ax,
            ],
            axis=1,
        )
        expected = np.clip(expected, 0, [ch, cw, ch, cw])
        side = np.minimum(expected[:, 2] - expected[:, 0], expected[:, 3] - expected[:, 1])
        labels = out["labels"]
        assert set(np.flatnonzero(side >= 2)) <= set(labels) <= set(np.flatnonzero(side > 0))
        boxes = out["boxes"].astype(np.float64) * size
        np.testing.assert_allclose(boxes, expected[labels], atol=1.0)
        if with_masks:
            masks = out["masks"]
            assert masks.shape == (len(labels), size, size) and masks.dtype == np.bool_
            for k in range(len(labels)):
                np.testing.assert_allclose(boxes[k], tight(masks[k]), atol=1e-4)  # mask bounds
                y0, x0, y1, x1 = np.round(boxes[k]).astype(int)
                # A rectangle stays a rectangle, except that a corner pixel covered partly along
                # both axes can fall below the one-half threshold.
                holes = np.argwhere(~masks[k, y0:y1, x0:x1]) + [y0, x0]
                corners = {(y0, x0), (y0, x1 - 1), (y1 - 1, x0), (y1 - 1, x1 - 1)}
                assert {tuple(p) for p in holes} <= corners


def test_lsj_flip_mirrors_image_boxes_and_masks():
    h, w, size = 40, 56, 48
    mirrored = 0
    for seed in range(40):
        for with_masks in (True, False):
            base = rect_example(h, w, RECTS_40x56)
            if not with_masks:
                del base["masks"]
            kw = dict(output_size=size, scale_range=(0.4, 2.0))
            plain = dtf.large_scale_jitter(base, np.random.default_rng(seed), flip=False, **kw)
            maybe = dtf.large_scale_jitter(base, np.random.default_rng(seed), flip=True, **kw)
            ch, cw = plain["valid_size"]
            np.testing.assert_array_equal(maybe["valid_size"], plain["valid_size"])
            np.testing.assert_array_equal(maybe["labels"], plain["labels"])
            if np.array_equal(maybe["image"], plain["image"]):
                np.testing.assert_array_equal(maybe["boxes"], plain["boxes"])
                continue
            mirrored += with_masks
            img_p, img_m = plain["image"], maybe["image"]
            np.testing.assert_array_equal(img_m[:ch, :cw], img_p[:ch, :cw][:, ::-1])
            assert not img_m[ch:].any() and not img_m[:, cw:].any()
            # In the mirrored canvas the column ramp runs the other way.
            g = img_m[:ch, :cw, 1].astype(float).mean(axis=0)
            assert g[0] > g[-1]
            bp, bm = plain["boxes"] * size, maybe["boxes"] * size
            np.testing.assert_allclose(bm[:, [0, 2]], bp[:, [0, 2]], atol=1e-4)
            np.testing.assert_allclose(bm[:, 1], cw - bp[:, 3], atol=1e-4)
            np.testing.assert_allclose(bm[:, 3], cw - bp[:, 1], atol=1e-4)
            if with_masks:
                pm, mm = plain["masks"], maybe["masks"]
                np.testing.assert_array_equal(mm[:, :ch, :cw], pm[:, :ch, :cw][:, :, ::-1])
                assert not mm[:, ch:].any() and not mm[:, :, cw:].any()
    assert 8 <= mirrored <= 32  # about half of 40 (p = 0.5, > 3.5 sigma band)


def test_lsj_scale_statistics_follow_scale_range():
    h, w, size = 6, 9, 32
    ex = {
        "image": np.full((h, w, 3), 200, np.uint8),
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int32),
    }
    low, high = 0.1, 2.0
    draws = []
    for seed in range(400):
        out = dtf.large_scale_jitter(
            ex, np.random.default_rng(seed), output_size=size, scale_range=(low, high)
        )
        scale = float(out["image_info"][2])
        draws.append(scale * max(h, w) / size)
        ch, cw = out["valid_size"]
        assert (ch, cw) == (min(round(h * scale), size), min(round(w * scale), size))
        nonzero = out["image"].any(axis=2)
        assert nonzero[:ch, :cw].all() and nonzero.sum() == ch * cw  # zero padding elsewhere
    draws = np.sort(np.asarray(draws))
    assert draws[0] >= low and draws[-1] <= high
    assert abs(draws.mean() - (low + high) / 2) < 0.1  # 4 sigma of the mean of 400 uniforms
    cdf = (draws - low) / (high - low)
    n = len(draws)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 0.1  # Kolmogorov-Smirnov against U(low, high); 1% critical value is 0.081
    fixed = dtf.large_scale_jitter(
        ex, np.random.default_rng(0), output_size=size, scale_range=(0.5, 0.5)
    )
    np.testing.assert_allclose(fixed["image_info"][2], 0.5 * size / max(h, w), rtol=1e-6)


def test_lsj_crop_window_is_uniform_over_the_scaled_image():
    h, w, size = 40, 56, 48
    ex = rect_example(h, w, RECTS_40x56)
    offsets = []
    for seed in range(80):
        out = dtf.large_scale_jitter(
            ex, np.random.default_rng(seed), output_size=size, scale_range=(2.0, 2.0), flip=False
        )
        np.testing.assert_array_equal(out["valid_size"], [size, size])  # always a full crop
        ay, by = recovered_axis(out["image"][:, :, 0].astype(np.float64).mean(axis=1))
        ax, bx = recovered_axis(out["image"][:, :, 1].astype(np.float64).mean(axis=0))
        offsets.append((by / ay, bx / ax))  # crop origin in scaled-image pixels
    offsets = np.asarray(offsets)
    # Scaled image: round(40 * 48 * 2 / 56) = 69 by 96 pixels, so origins lie in [0, 21] x [0, 48].
    limit = np.array([69 - size, 96 - size], np.float64)
    assert (offsets > -0.5).all() and (offsets < limit + 0.5).all()
    assert (offsets.min(axis=0) < 0.15 * limit).all() and (offsets.max(axis=0) > 0.85 * limit).all()
    assert (np.abs(offsets.mean(axis=0) - limit / 2) < 0.15 * limit).all()


def test_lsj_is_deterministic_given_the_generator():
    ex = rect_example(40, 56, RECTS_40x56)
    a = dtf.large_scale_jitter(ex, np.random.default_rng(7), output_size=48)
    b = dtf.large_scale_jitter(ex, np.random.default_rng(7), output_size=48)
    c = dtf.large_scale_jitter(ex, np.random.default_rng(8), output_size=48)
    for key in ("image", "boxes", "labels", "masks", "image_info", "valid_size"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])


def test_resize_and_pad_maps_back_to_original_coordinates():
    h, w, size = 30, 50, 40
    rects = ((3, 4, 20, 31), (10, 30, 29, 50))
    out = dtf.resize_and_pad(rect_example(h, w, rects), output_size=size)
    np.testing.assert_allclose(out["image_info"], [h, w, 0.8, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out["valid_size"], [24, 40])
    assert not out["image"][24:].any() and out["image"][:24].all()
    back = out["boxes"] * size / out["image_info"][2]
    np.testing.assert_allclose(back, np.asarray(rects, np.float32), atol=1 / 0.8)
    # Reference image: PIL's own resize of the whole image (no box), then padding.
    ref = np.asarray(Image.fromarray(ramp_image(h, w)).resize((40, 24), Image.BILINEAR))
    np.testing.assert_allclose(out["image"][:24].astype(int), ref.astype(int), atol=1)


def test_lsj_boxes_are_tight_bounds_of_resampled_shapes(shapes):
    """Real (non-rectangular) masks: boxes equal the bounds of the moved masks, and the moved
    masks agree with a nearest-neighbour reference resampling done here."""
    _, source = shapes
    size = 96
    for i in range(len(source)):
        ex = source[i]
        out = dtf.resize_and_pad(ex, output_size=size)
        np.testing.assert_allclose(out["image_info"][2], 1.5)
        # Nearest-neighbour reference: canvas pixel centre i + 0.5 samples source (i + 0.5) / 1.5.
        centres = np.floor((np.arange(size) + 0.5) / 1.5).astype(int)
        np.testing.assert_array_equal(out["labels"], ex["labels"])  # nothing lost at 1.5x
        for k in range(len(ex["labels"])):
            ref = ex["masks"][k][np.ix_(centres, centres)]
            mask = out["masks"][k]
            assert (mask & ref).sum() / (mask | ref).sum() > 0.8
            np.testing.assert_allclose(out["boxes"][k] * size, tight(ref), atol=1.5)
            np.testing.assert_allclose(out["boxes"][k] * size, tight(mask), atol=1e-4)
        for seed in range(3):  # random crops cut shapes: boxes still hug the visible mask
            jit = dtf.large_scale_jitter(ex, np.random.default_rng([i, seed]), output_size=64)
            for k in range(len(jit["labels"])):
                np.testing.assert_allclose(jit["boxes"][k] * 64, tight(jit["masks"][k]), atol=1e-4)


# ------------------------------------------------------------------------------------------
# Cleaning, filtering, validation.


def test_drop_invalid_boxes_counts_zero_area_nan_and_outside():
    h, w = 20, 20
    boxes = np.array(
        [
            [0.1, 0.1, 0.5, 0.5],  # good
            [0.3, 0.3, 0.3, 0.6],  # zero height
            [np.nan, 0.1, 0.5, 0.5],  # NaN
            [1.2, 0.1, 1.5, 0.5],  # below the image
            [-0.2, 0.5, 0.4, 1.3],  # partly outside: clipped, kept
            [0.6, 0.6, 0.4, 0.9],  # inverted
            [0.1, 0.1, np.inf, 0.5],  # infinite
        ],
        np.float32,
    )
    ex = dex.validate_example(
        {"image": np.zeros((h, w, 3), np.uint8), "boxes": boxes, "labels": np.arange(7)}
    )
    out, dropped = dex.drop_invalid_boxes(ex)
    assert dropped == 5
    np.testing.assert_array_equal(out["labels"], [0, 4])
    np.testing.assert_allclose(out["boxes"], [[0.1, 0.1, 0.5, 0.5], [0.0, 0.5, 0.4, 1.0]])


def test_invalid_examples_and_arguments_raise_clear_errors():
    good = rect_example(10, 12, ((1, 1, 5, 5),))
    with pytest.raises(dex.InvalidExampleError, match="labels"):
        dex.validate_example({**good, "labels": np.array([1, 2])})
    with pytest.raises(dex.InvalidExampleError, match="masks"):
        dex.validate_example({**good, "masks": np.zeros((1, 9, 12), np.bool_)})
    with pytest.raises(dex.InvalidExampleError, match="image"):
        dex.validate_example({**good, "image": np.zeros((10, 12, 3), np.float32)})
    with pytest.raises(dex.InvalidExampleError, match="boxes"):
        dex.validate_example({**good, "boxes": np.zeros((1, 3), np.float32)})
    with pytest.raises(dex.InvalidExampleError, match="'labels'"):
        dex.validate_example({"image": good["image"], "boxes": good["boxes"]})
    with pytest.raises(image_text.CorruptImageError):
        dex.validate_example({**good, "image": b"not an image"})
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="output_size"):
        dtf.large_scale_jitter(good, rng, output_size=0)
    with pytest.raises(ValueError, match="scale_range"):
        dtf.large_scale_jitter(good, rng, output_size=16, scale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="scale_range"):
        dtf.large_scale_jitter(good, rng, output_size=16, scale_range=(2.0, 1.0))
    src = ListSource([good])
    with pytest.raises(ValueError, match="mask_stride"):
        di.DetectionBatches(src, global_batch=1, image_size=18, max_instances=2, seed=0)
    with pytest.raises(ValueError, match="divisible"):
        di.DetectionBatches(
            src, global_batch=3, image_size=16, max_instances=2, seed=0, process_count=2
        )
    with pytest.raises(ValueError, match="max_instances"):
        di.DetectionBatches(src, global_batch=1, image_size=16, max_instances=0, seed=0)
    with pytest.raises(ValueError, match="category_map"):
        di.DetectionBatches(
            src, global_batch=1, image_size=16, max_instances=2, seed=0, category_map={3: -1}
        )
    with pytest.raises(ValueError, match="empty"):
        di.DetectionBatches(ListSource([]), global_batch=1, image_size=16, max_instances=2, seed=0)
    with pytest.raises(ValueError, match="'r'"):
        dex.base_category_map({"f": [0], "c": [1]}, keep=("f", "r"))
    assert dex.base_category_map({"f": [4, 0], "c": [2], "r": [1, 3]}) == {0: 0, 2: 1, 4: 2}


# ------------------------------------------------------------------------------------------
# Training batches.

H, W, S = 32, 48, 48  # scale 1 when scale_range = (1, 1): canvas pixels = source pixels


def _batch_source():
    grey = np.full((H, W, 3), 153, np.uint8)
    return ListSource(
        [
            # 0: one instance of an unmapped (held-out) category
            rect_example(H, W, ((2, 3, 10, 20), (4, 24, 16, 40), (20, 8, 32, 28)), [1, 5, 2], grey),
            # 1: no annotations at all
            {"image": grey, "image_id": 1, "boxes": np.zeros((0, 4)), "labels": np.zeros((0,))},
            # 2: more instances than max_instances
            rect_example(
                H, W, [(4 * k, 8 * k, 4 * k + 4, 8 * k + 8) for k in range(6)], [1] * 6, grey, 2
            ),
            # 3: bad boxes (their masks are empty) around one good instance
            {
                **rect_example(
                    H,
                    W,
                    ((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), (8, 8, 24, 40)),
                    [1, 1, 2, 2],
                    grey,
                    3,
                ),
                "boxes": np.array(
                    [
                        [0.5, 0.5, 0.5, 0.7],
                        [np.nan, 0, 1, 1],
                        [1.1, 0, 1.4, 1],
                        [0.25, 1 / 6, 0.75, 5 / 6],
                    ],
                    np.float32,
                ),
            },
        ]
    )


def _block_mask(rect, stride=4):
    full = np.zeros((S, S), float)
    y0, x0, y1, x1 = rect
    full[y0:y1, x0:x1] = 1
    return (full.reshape(S // stride, stride, S // stride, stride).mean((1, 3)) >= 0.5).astype(
        np.uint8
    )


def test_batches_filter_categories_cap_instances_and_count_drops():
    src = _batch_source()
    batches = di.DetectionBatches(
        src,
        global_batch=4,
        image_size=S,
        max_instances=4,
        seed=0,
        category_map={1: 0, 2: 1},
        scale_range=(1.0, 1.0),
        flip=False,
    )
    batch = batches.batch(0)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "image": ((4, S, S, 3), np.float32),
        "boxes": ((4, 4, 4), np.float32),
        "classes": ((4, 4), np.int32),
        "masks": ((4, 4, S // 4, S // 4), np.uint8),
        "valid": ((4, 4), np.bool_),
        "image_info": ((4, 4), np.float32),
    }
    assert batches.dropped == {
        "bad_box": 3,
        "unmapped_category": 1,
        "cropped_or_tiny": 0,
        "over_max_instances": 2,
    }
    assert batches.skipped == 0
    rows = {index: r for r, (_, index) in enumerate(batches.positions(0))}
    assert sorted(rows) == [0, 1, 2, 3]  # one epoch = one step here

    def check(row, rects, classes):
        n = len(classes)
        np.testing.assert_array_equal(batch["valid"][row], np.arange(4) < n)
        np.testing.assert_array_equal(batch["classes"][row], list(classes) + [-1] * (4 - n))
        expected = np.zeros((4, 4), np.float32)
        expected[:n] = np.reshape(rects, (n, 4))
        np.testing.assert_allclose(batch["boxes"][row], expected, atol=1e-4)
        for k in range(4):
            want = _block_mask(rects[k]) if k < n else np.zeros((S // 4, S // 4), np.uint8)
            np.testing.assert_array_equal(batch["masks"][row, k], want)
        np.testing.assert_allclose(batch["image_info"][row], [H, W, 1.0, 0.0])
        image = batch["image"][row]
        np.testing.assert_allclose(image[:H], 153 / 127.5 - 1, atol=1e-6)
        assert not image[H:].any()  # padding is exactly 0 in the float image

    check(rows[0], [(2, 3, 10, 20), (20, 8, 32, 28)], [0, 1])
    check(rows[1], [], [])  # a negative image: kept, all padding
    check(rows[2], [(4 * k, 8 * k, 4 * k + 4, 8 * k + 8) for k in range(4)], [0] * 4)
    check(rows[3], [(8, 8, 24, 40)], [1])


def test_batches_without_masks_and_identity_vocabulary():
    src = _batch_source()
    batches = di.DetectionBatches(
        src,
        global_batch=4,
        image_size=S,
        max_instances=8,
        seed=0,
        scale_range=(1.0, 1.0),
        flip=False,
        with_masks=False,
    )
    batch = batches.batch(0)
    assert "masks" not in batch
    row = dict((index, r) for r, (_, index) in enumerate(batches.positions(0)))[0]
    np.testing.assert_array_equal(batch["classes"][row, :4], [1, 5, 2, -1])  # dataset ids
    np.testing.assert_allclose(
        batch["boxes"][row, :3], [(2, 3, 10, 20), (4, 24, 16, 40), (20, 8, 32, 28)], atol=1e-4
    )
    assert batches.dropped["bad_box"] == 3 and batches.dropped["unmapped_category"] == 0


def test_batches_are_deterministic_and_host_slices_form_the_global_batch():
    rng = np.random.default_rng(0)
    examples = []
    for i in range(10):
        y, x = rng.integers(0, 20, 2)
        examples.append(rect_example(40, 56, ((y, x, y + 15, x + 30),), [i % 3], image_id=i))
    src = ListSource(examples)
    kw = dict(global_batch=4, image_size=32, max_instances=3, seed=5)
    one, again = di.DetectionBatches(src, **kw), di.DetectionBatches(src, **kw)
    other = di.DetectionBatches(src, **{**kw, "seed": 6})
    hosts = [di.DetectionBatches(src, process_index=h, process_count=2, **kw) for h in range(2)]
    for step in (0, 3, 7):
        b = one.batch(step)
        for key, value in again.batch(step).items():
            np.testing.assert_array_equal(b[key], value)
        parts = [host.batch(step) for host in hosts]
        for key in b:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), b[key])
        assert not np.array_equal(b["image"], other.batch(step)["image"])
    # Epochs: 10 examples over stream positions 0..9 and 10..19 visit each index once.
    for first_step in (0, 5):
        seen = [i for s in range(first_step, first_step + 5) for _, i in one.positions(s)][:10]
        assert sorted(seen) == list(range(10))
        assert len(one.positions(first_step)) == 4


def test_unusable_examples_are_replaced_and_counted():
    good = rect_example(20, 20, ((2, 2, 10, 10),), [0])
    src = ListSource(
        [good, {**good, "image": b"junk bytes"}, {**good, "labels": np.array([0, 1])}, good]
    )
    batches = di.DetectionBatches(src, global_batch=4, image_size=16, max_instances=2, seed=0)
    batch = batches.batch(0)
    assert batches.skipped == 2
    assert batch["valid"].sum() == 4 and np.isfinite(batch["image"]).all()
    broken = ListSource([{**good, "image": b"junk"}] * 3)
    with pytest.raises(RuntimeError, match="unusable"):
        di.DetectionBatches(
            broken, global_batch=1, image_size=16, max_instances=2, seed=0, max_substitutes=4
        ).batch(0)


def test_worker_threads_give_the_same_batches_and_counts():
    good = rect_example(20, 20, ((2, 2, 10, 10),), [0])
    items = [_batch_source()[i] for i in range(4)] + [{**good, "image": b"junk bytes"}, good]
    src = ListSource(items)
    kw = dict(global_batch=6, image_size=S, max_instances=4, seed=2, category_map={1: 0, 2: 1})
    serial, threaded = di.DetectionBatches(src, **kw), di.DetectionBatches(src, num_workers=3, **kw)
    for step in range(3):
        a, b = serial.batch(step), threaded.batch(step)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert serial.skipped == threaded.skipped >= 1
    assert serial.dropped == threaded.dropped and serial.dropped["bad_box"] > 0
    with pytest.raises(ValueError, match="num_workers"):
        di.DetectionBatches(src, num_workers=0, **kw)


# ------------------------------------------------------------------------------------------
# Evaluation batches.


def test_eval_batches_are_ordered_padded_and_masked():
    examples = [rect_example(30, 50, ((1, 1, 9, 9),), image_id=100 + i) for i in range(4)]
    examples.append({**examples[0], "image": png_bytes(ramp_image(20, 10)), "image_id": 104})
    examples[2] = {**examples[2], "image": b"broken"}
    src = ListSource(examples)
    single = list(di.eval_detection_batches(src, batch_size=4, image_size=40))
    assert len(single) == 2
    got = {k: np.concatenate([b[k] for b in single]) for k in single[0]}
    np.testing.assert_array_equal(got["index"], [0, 1, 2, 3, 4, -1, -1, -1])
    np.testing.assert_array_equal(got["mask"], [1, 1, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(got["image_id"], [100, 101, -1, 103, 104, -1, -1, -1])
    np.testing.assert_allclose(got["image_info"][0], [30, 50, 0.8, 0])
    np.testing.assert_allclose(got["image_info"][4], [20, 10, 2.0, 0])
    ref = dtf.resize_and_pad(examples[0], output_size=40)["image"][:24].astype(np.float32)
    np.testing.assert_allclose(got["image"][0, :24], ref / 127.5 - 1, atol=1e-6)
    assert not got["image"][0, 24:].any() and not got["image"][4, :, 20:].any()
    assert not got["image"][2].any() and not got["image"][5:].any()
    hosts = [
        list(
            di.eval_detection_batches(
                src, batch_size=4, image_size=40, process_index=h, process_count=2
            )
        )
        for h in range(2)
    ]
    assert len(hosts[0]) == len(hosts[1]) == 2
    for b in range(2):
        for key in single[b]:
            joined = np.concatenate([hosts[0][b][key], hosts[1][b][key]])
            np.testing.assert_array_equal(joined, single[b][key])


# ------------------------------------------------------------------------------------------
# Shapes world end to end.


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from rovit_jax.data import shapes_tfds

    builder = shapes_tfds.build_shapes_world(
        str(tmp_path_factory.mktemp("tfds")),
        image_size=64,
        num_train=8,
        num_validation=4,
        num_test=4,
        max_objects=4,
    )
    return builder, shapes_detection.ShapesDetectionSource(builder, "train")


def test_shapes_records_convert_to_examples(shapes):
    builder, source = shapes
    raw = builder.as_data_source("train")
    assert len(source) == len(raw) == 8
    for i in range(len(source)):
        ex, rec = source[i], raw[i]
        np.testing.assert_array_equal(ex["image"], rec["image"])
        assert ex["image_id"] == i
        np.testing.assert_array_equal(ex["labels"], np.asarray(rec["objects"]["label"]))
        np.testing.assert_allclose(ex["boxes"], np.asarray(rec["objects"]["bbox"]))
        masks = np.asarray(rec["objects"]["mask"])[..., 0] > 0
        np.testing.assert_array_equal(ex["masks"], masks)
        for k in range(len(masks)):  # stored boxes are the masks' tight bounds
            np.testing.assert_allclose(ex["boxes"][k] * 64, tight(masks[k]), atol=1e-4)
        # Mask PNG bytes decode the same way.
        pngs = [png_bytes(m) for m in np.asarray(rec["objects"]["mask"])[..., 0]]
        as_bytes = {**rec, "objects": {**rec["objects"], "mask": pngs}}
        np.testing.assert_array_equal(
            shapes_detection.example_from_shapes_record(as_bytes)["masks"], masks
        )
    with pytest.raises(ValueError, match="split"):
        shapes_detection.ShapesDetectionSource(builder, "nope")


def test_shapes_batches_hold_out_rare_categories(shapes):
    builder, source = shapes
    groups = builder.info.metadata["frequency_groups"]
    cmap = dex.base_category_map(groups)
    rare = set(groups["r"])
    assert len(cmap) == len(groups["f"]) + len(groups["c"]) and not rare & set(cmap)
    batches = di.DetectionBatches(
        source, global_batch=8, image_size=64, max_instances=3, seed=1, category_map=cmap
    )
    batch = batches.batch(0)
    labels = [source[i]["labels"] for _, i in batches.positions(0)]
    num_rare = sum(int(np.isin(lab, list(rare)).sum()) for lab in labels)
    num_all = sum(len(lab) for lab in labels)
    assert batches.dropped["unmapped_category"] == num_rare and batches.dropped["bad_box"] == 0
    d = batches.dropped
    assert (
        batch["valid"].sum() == num_all - num_rare - d["cropped_or_tiny"] - d["over_max_instances"]
    )
    cls, valid = batch["classes"], batch["valid"]
    assert ((cls >= 0) & (cls < len(cmap)) == valid).all()
    boxes = batch["boxes"][valid]
    assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()
    assert (boxes >= 0).all() and (boxes <= 64).all()
    assert not batch["boxes"][~valid].any() and not batch["masks"][~valid].any()
    # Boxes stay inside each image's content region (LSJ pads at the bottom / right).
    info = batch["image_info"]
    content = np.minimum(np.round(info[:, :2] * info[:, 2:3]), 64)
    assert (batch["boxes"][..., 2] <= content[:, None, 0] + 1e-4).all()
    assert (batch["boxes"][..., 3] <= content[:, None, 1] + 1e-4).all()
