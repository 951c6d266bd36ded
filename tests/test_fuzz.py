"""Property-based fuzzing: hostile floats, bytes, example fields and config values.

Bounded and reproducible (hypothesis with derandomize=True, a fixed number of examples, no
deadline). Each test states the promise it checks: no crash, only the documented errors, and
no NaN where the docstring promises finite output.
"""

import io

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from rovit_jax.data import detection_example as dex
from rovit_jax.data import detection_transforms as dtf
from rovit_jax.data import image_text
from rovit_jax.detect_config import detect_defaults
from rovit_jax.ops import boxes as box_ops
from rovit_jax.pretrain_config import pretrain_defaults
from rovit_jax.tasks import detect, pretrain


def bounded(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------------------------
# Box ops.

F32_MAX = float(np.finfo(np.float32).max)


def f32(x: float) -> float:
    """`x` rounded to float32 (hypothesis wants float32 bounds to be exactly representable)."""
    return float(np.float32(x))


def f32s(lo: float, hi: float):
    return st.floats(f32(lo), f32(hi), width=32)


HOSTILE_FLOATS = [np.nan, np.inf, -np.inf, F32_MAX, -F32_MAX, 0.0, -0.0]
HOSTILE_FLOATS += [f32(1e30), f32(-1e30)]  # huge (subnormals: see below)
any_float = st.one_of(
    # No subnormals: XLA on CPU flushes them to zero, so numpy references would disagree.
    st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=False),
    st.sampled_from(HOSTILE_FLOATS),
)
# Large but safe: |coord| <= 1e15 keeps every area (<= 4e30) representable in float32, and the
# coordinates come in any order, so negative and zero sizes are common.
big_finite = st.one_of(
    f32s(-1e15, 1e15), st.sampled_from([0.0, -1.0, 1.0, f32(1e15), f32(-1e15), f32(1e-30)])
)


def box_array(n: int, elements):
    return hnp.arrays(np.float32, (n, 4), elements=elements)


def well_formed_boxes(n: int, lo: float = 1e-2, hi: float = 1e4):
    """[n, 4] boxes with sides in [lo, hi] and centres in [-1e4, 1e4]."""
    side = f32s(lo, hi)
    centre = f32s(-1e4, 1e4)
    row = st.tuples(centre, centre, side, side).map(
        lambda t: [t[0] - t[2] / 2, t[1] - t[3] / 2, t[0] + t[2] / 2, t[1] + t[3] / 2]
    )
    return st.lists(row, min_size=n, max_size=n).map(lambda r: np.asarray(r, np.float32))


@bounded(80)
@given(box_array(3, any_float), box_array(2, any_float))
def test_box_ops_take_any_float_without_crashing(a, b):
    """Any float32 input, NaN and inf included: right shapes, and IoU stays in [0, 1]."""
    a_np, (a, b) = a, (jnp.asarray(a), jnp.asarray(b))
    iou = np.asarray(box_ops.box_iou(a, b))
    assert iou.shape == (3, 2)
    # paired_iou's docstring: "IoU in [0, 1]; 0 where the union is empty" (no input condition).
    assert not np.isnan(iou).any() and (iou >= 0).all() and (iou <= 1 + 1e-6).all()
    assert np.asarray(box_ops.generalized_box_iou(a, b)).shape == (3, 2)
    assert np.asarray(box_ops.encode_deltas(a[:2], b)).shape == (2, 4)
    assert np.asarray(box_ops.decode_deltas(a[:2], b)).shape == (2, 4)
    valid = np.asarray(box_ops.valid_box_mask(a))
    finite = np.isfinite(a_np).all(1)
    expected = finite & (a_np[:, 2] > a_np[:, 0]) & (a_np[:, 3] > a_np[:, 1])
    np.testing.assert_array_equal(valid, expected)
    area = np.asarray(box_ops.box_area(a))
    assert area.shape == (3,) and not (area < 0).any()


@bounded(80)
@given(box_array(3, big_finite), box_array(2, big_finite))
def test_box_ops_are_finite_and_bounded_on_large_finite_boxes(a, b):
    """Finite boxes of any order (negative / zero sizes) up to 1e15: every output is finite."""
    a_np, (a, b) = a, (jnp.asarray(a), jnp.asarray(b))
    iou = np.asarray(box_ops.box_iou(a, b))
    giou = np.asarray(box_ops.generalized_box_iou(a, b))
    assert np.isfinite(iou).all() and np.isfinite(giou).all()
    assert (iou >= 0).all() and (iou <= 1 + 1e-6).all()
    assert (giou >= -1 - 1e-6).all() and (giou <= 1 + 1e-6).all()
    assert (giou <= iou + 1e-6).all()  # GIoU subtracts a non-negative term from IoU
    np.testing.assert_array_equal(iou, np.asarray(box_ops.box_iou(b, a)).T)
    # Degenerate boxes (a non-positive side) have IoU 0 with everything (module docstring).
    degenerate = (a_np[:, 2] <= a_np[:, 0]) | (a_np[:, 3] <= a_np[:, 1])
    assert (iou[degenerate] == 0).all()
    # encode_deltas: "padding boxes give large but finite targets".
    assert np.isfinite(np.asarray(box_ops.encode_deltas(a[:2], b))).all()
    assert np.isfinite(np.asarray(box_ops.encode_deltas(b, a[1:]))).all()


@bounded(60)
@given(well_formed_boxes(4), st.data())
def test_decode_inverts_encode_within_the_clip(anchors, data):
    """decode(encode(b, a), a) == b for boxes within a factor 50 of their anchors' sides."""
    factors = data.draw(hnp.arrays(np.float32, (4, 2), elements=f32s(0.02, 50.0)))
    shifts = data.draw(hnp.arrays(np.float32, (4, 2), elements=f32s(-3.0, 3.0)))
    h, w = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cy = (anchors[:, 0] + anchors[:, 2]) / 2 + shifts[:, 0] * h
    cx = (anchors[:, 1] + anchors[:, 3]) / 2 + shifts[:, 1] * w
    bh, bw = h * factors[:, 0], w * factors[:, 1]
    target = np.stack([cy - bh / 2, cx - bw / 2, cy + bh / 2, cx + bw / 2], 1).astype(np.float32)
    deltas = box_ops.encode_deltas(jnp.asarray(target), jnp.asarray(anchors))
    decoded = np.asarray(box_ops.decode_deltas(deltas, jnp.asarray(anchors)))
    scale = np.abs(target).max(axis=1, keepdims=True) + np.maximum(h, w)[:, None]
    # float32: errors scale with the coordinates' magnitude, not with the box size.
    assert (np.abs(decoded - target) <= 1e-4 * scale).all()


@bounded(60)
@given(
    well_formed_boxes(3, lo=1e-3),
    hnp.arrays(np.float32, (3, 2), elements=f32s(-1e3, 1e3)),
    hnp.arrays(
        np.float32, (3, 2), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)
    ),
)
def test_decode_stays_finite_for_wild_scale_deltas(anchors, shift, scale):
    """decode_deltas clips log-scale deltas: any finite dh, dw gives finite boxes."""
    deltas = np.concatenate([shift, scale], axis=1)
    out = np.asarray(box_ops.decode_deltas(jnp.asarray(deltas), jnp.asarray(anchors)))
    assert np.isfinite(out).all()
    clip = np.exp(box_ops.DEFAULT_DELTA_CLIP) * (1 + 1e-5)
    sides = np.stack([out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]], 1)
    anchor_sides = np.stack([anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]], 1)
    tol = 4 * np.spacing(np.abs(out).max(axis=1, keepdims=True))  # rounding of the corners
    assert (sides <= anchor_sides * clip + tol).all() and (sides >= -tol).all()


@bounded(80)
@given(
    box_array(4, any_float.filter(lambda v: not np.isnan(v))),
    f32s(1.0, 4096.0),
    f32s(1.0, 4096.0),
)
def test_clip_puts_any_non_nan_box_inside_the_image(boxes, height, width):
    out = np.asarray(box_ops.clip_boxes(jnp.asarray(boxes), height, width))
    assert np.isfinite(out).all()
    assert (out >= 0).all() and (out[:, [0, 2]] <= height).all() and (out[:, [1, 3]] <= width).all()
    np.testing.assert_array_equal(
        np.asarray(box_ops.clip_boxes(jnp.asarray(out), height, width)), out
    )
    inside = np.isfinite(boxes).all(1) & (boxes >= 0).all(1)
    inside &= (boxes[:, [0, 2]] <= height).all(1) & (boxes[:, [1, 3]] <= width).all(1)
    # Unchanged, up to XLA's flushing of subnormal floats to zero on CPU.
    flushed = np.where(np.abs(boxes) < np.finfo(np.float32).tiny, 0.0, boxes)
    np.testing.assert_array_equal(out[inside], flushed[inside])


@bounded(40)
@given(
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5).filter(lambda s: s[-1] != 4),
    st.lists(st.floats(-2.0, 0.0), min_size=1, max_size=4),
)
def test_box_ops_raise_only_documented_errors(bad_shape, weights):
    bad = jnp.zeros(bad_shape, jnp.float32)
    good = jnp.ones((2, 4), jnp.float32)
    for fn in (box_ops.box_iou, box_ops.generalized_box_iou, box_ops.encode_deltas):
        with pytest.raises(ValueError):
            fn(bad, good)
        with pytest.raises(ValueError):
            fn(good, bad)
    for fn in (box_ops.box_area, box_ops.valid_box_mask, box_ops.yxyx_to_xywh):
        with pytest.raises(ValueError):
            fn(bad)
    with pytest.raises(ValueError, match="weights"):  # too few, or not positive
        box_ops.encode_deltas(good, good, weights=weights)


# ------------------------------------------------------------------------------------------------
# The image decoder and captions.

FUZZ_MAX_PIXELS = 1 << 16  # keeps mutated headers from asking for large allocations


def _seed_files() -> dict[str, bytes]:
    image = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    out = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP"):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


SEED_FILES = _seed_files()


def _check_decode(data: bytes) -> None:
    try:
        image = image_text.decode_image(data, max_pixels=FUZZ_MAX_PIXELS)
    except image_text.CorruptImageError as e:  # the only error allowed
        assert e.reason in image_text.IMAGE_SKIP_REASONS, e.reason
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= image_text.MIN_IMAGE_SIDE
    assert image.shape[0] * image.shape[1] <= FUZZ_MAX_PIXELS


@bounded(100)
@given(st.binary(max_size=600))
def test_decoder_on_random_bytes_raises_only_corrupt_image_error(data):
    _check_decode(data)


@bounded(100)
@given(st.sampled_from(sorted(SEED_FILES)), st.data())
def test_decoder_on_mutated_real_files_raises_only_corrupt_image_error(fmt, data):
    blob = bytearray(SEED_FILES[fmt])
    # Header bytes are where decoders are most fragile: bias edits towards the start.
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, min(len(blob) - 1, 96)), st.integers(0, 255)), max_size=6)
    )
    for pos, value in edits:
        blob[pos] = value
    cut = data.draw(st.integers(0, len(blob)))
    _check_decode(bytes(blob[:cut]))


@bounded(100)
@given(
    st.one_of(
        st.binary(max_size=20),
        st.text(max_size=10),
        st.none(),
        st.integers(),
        st.lists(st.integers(), max_size=2),
    )
)
def test_caption_check_raises_only_invalid_caption_error(value):
    try:
        text = image_text.caption_text(value)
    except image_text.InvalidCaptionError as e:
        assert e.reason in image_text.CAPTION_SKIP_REASONS
        return
    assert isinstance(text, str) and text.strip()
    text.encode("utf-8")  # clean text


# ------------------------------------------------------------------------------------------------
# validate_example (and what the batcher does next with a validated example).

DTYPES = [np.uint8, np.float32, np.int64, np.bool_, np.complex64, np.dtype("U2")]


def random_array(max_dims: int = 4):
    return hnp.arrays(
        st.sampled_from(DTYPES),
        hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=4),
    )


junk = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=4),
    st.binary(max_size=16),
    st.lists(st.integers(), max_size=3),
    st.lists(st.lists(st.floats(), max_size=3), max_size=3),  # ragged
    random_array(),
)


def _mostly(draw, common, rare, odds: int = 4):
    """Draws from `common`, or from `rare` about once in `odds + 1` draws.

    (Hypothesis favours small integers and the first choices, so the common case comes first.)
    """
    return (
        draw(rare)
        if draw(st.sampled_from(["common"] * odds + ["rare"])) == "rare"
        else draw(common)
    )


@st.composite
def examples(draw):
    """A structurally plausible example, sometimes with fields replaced by junk or removed."""
    n = _mostly(draw, st.integers(1, 3), st.just(0))
    h = _mostly(draw, st.integers(2, 7), st.integers(0, 1))
    w = _mostly(draw, st.integers(2, 7), st.integers(0, 1))
    ex = {
        "image": draw(hnp.arrays(np.uint8, (h, w, 3))),
        "image_id": _mostly(draw, st.integers(-5, 10**6), junk),
        "boxes": draw(box_array(n, any_float)),
        "labels": _mostly(
            draw,
            hnp.arrays(np.int64, (n,), elements=st.integers(-5, 100)),
            hnp.arrays(np.int64, (n,), elements=st.sampled_from([2**31, -(2**31) - 1])),
        ),
    }
    if draw(st.booleans()):
        ex["masks"] = draw(hnp.arrays(st.sampled_from([np.bool_, np.uint8]), (n, h, w)))
    fields = ["image", "boxes", "labels", "masks", "image_id"]
    for key in draw(st.lists(st.sampled_from(["-"] + fields), max_size=2)):  # junk in 0-2 fields
        if key != "-":
            ex[key] = draw(junk)
    for key in _mostly(
        draw, st.just([]), st.lists(st.sampled_from(fields[:3]), max_size=1), odds=6
    ):
        ex.pop(key, None)
    return _mostly(draw, st.just(ex), junk, odds=9)


@bounded(150)
@given(examples(), st.integers(0, 2**31))
def test_validate_example_raises_only_documented_errors(example, seed):
    try:
        ex = dex.validate_example(example)
    except (dex.InvalidExampleError, image_text.CorruptImageError) as e:
        assert e.reason in dex.DETECTION_SKIP_REASONS, e.reason
        return
    h, w = ex["image"].shape[:2]
    n = len(ex["boxes"])
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (h, w, 3) and min(h, w) >= 2
    assert ex["boxes"].dtype == np.float32 and ex["boxes"].shape == (n, 4)
    assert ex["labels"].dtype == np.int32 and ex["labels"].shape == (n,)
    assert isinstance(ex["image_id"], int)
    if "masks" in ex:
        assert ex["masks"].dtype == np.bool_ and ex["masks"].shape == (n, h, w)
    # What the batcher does next never fails on a validated example.
    kinds = dex.bad_box_counts(ex["boxes"])
    kept, dropped = dex.drop_invalid_boxes(ex)
    assert sum(kinds.values()) == dropped
    b = kept["boxes"]
    assert np.isfinite(b).all() and (b >= 0).all() and (b <= 1).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    out = dtf.large_scale_jitter(ex, np.random.default_rng(seed), output_size=16)
    assert out["image"].shape == (16, 16, 3) and np.isfinite(out["boxes"]).all()
    assert len(out["labels"]) <= len(kept["labels"])


# ------------------------------------------------------------------------------------------------
# Config validation.


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        keys.append(key)  # nodes too: replacing a whole block must be reported
        if isinstance(v, dict):
            keys += _leaf_keys(v, key + ".")
    return keys


def _set(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree[p]
    tree[leaf] = value


config_values = st.one_of(
    st.sampled_from(
        [
            None,
            "",
            "x",
            True,
            False,
            0,
            -1,
            1,
            3,
            10**20,
            0.5,
            -0.5,
            2.0,
            float("nan"),
            float("inf"),
        ]
    ),
    st.integers(-(10**6), 10**6),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(-3, 3), max_size=3),
    st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
    st.fixed_dictionaries({"a": st.integers()}),
)

TASKS = {
    "pretrain": (pretrain_defaults, pretrain.validate_config),
    "detect": (detect_defaults, detect.validate_config),
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_config_fuzz_reports_the_changed_key_with_a_value_error_only(task):
    defaults, validate = TASKS[task]
    base = defaults().to_dict()
    validate(ml_collections.ConfigDict(base))  # the defaults are clean
    keys = _leaf_keys(base)

    @bounded(100)
    @given(st.sampled_from(keys), config_values)
    def check(key, value):
        tree = defaults().to_dict()
        _set(tree, key, value)
        try:
            validate(ml_collections.ConfigDict(tree))
        except ValueError as e:  # any other type fails the test
            assert key in str(e), (key, value, str(e))

    check()
