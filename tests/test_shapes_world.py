"""Tests for the procedural shapes world: the scene renderer and its tfds builder."""

import collections
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from rovit_jax.data import shapes_world as sw

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def tight_box(mask: np.ndarray) -> np.ndarray:
    """Independent tight bounds (y0, x0, y1, x1) / S of a boolean [S, S] mask, pixel edges."""
    size = mask.shape[0]
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float64) / size


def english_plural(noun: str) -> str:
    last = noun.split()[-1]
    suffix = "es" if last in ("cross", "fish") else "s"
    return noun + suffix


# ------------------------------------------------------------------------------------------
# Category table.


def test_category_table_invariants():
    cats = sw.CATEGORIES
    assert len(cats) >= 30
    assert [c.id for c in cats] == list(range(len(cats)))
    names = sw.category_names()
    assert names == [c.name for c in cats]
    assert len(set(names)) == len(names)
    for c in cats:
        # A category is a surface: the name is "<pattern> <colour>" and nothing about the shape.
        assert c.name == f"{c.pattern} {c.colour}"
        assert c.pattern in sw.PATTERNS and c.colour in sw.COLOURS
        assert c.frequency in ("f", "c", "r")
    assert len({(c.pattern, c.colour) for c in cats}) == len(sw.PATTERNS) * len(sw.COLOURS)
    groups = sw.frequency_groups()
    assert set(groups) == {"f", "c", "r"}
    assert all(groups[g] for g in groups)
    assert len(groups["r"]) >= 8
    assert sorted(sum(groups.values(), [])) == list(range(len(cats)))
    # The novel categories are one pattern in every colour: the pattern is never on a base
    # category, every colour is; no name shares a word with a background kind.
    assert {cats[i].pattern for i in groups["r"]} == {sw.RARE_PATTERN}
    assert sorted(cats[i].colour for i in groups["r"]) == sorted(sw.COLOURS)
    assert all(c.pattern != sw.RARE_PATTERN for c in cats if c.frequency != "r")
    words = {w for c in cats for w in c.name.split()}
    assert not words & set(sw.BACKGROUNDS)
    # Every silhouette is distinct (no two masks agree on 90% of their union).
    masks = [sw._shape_mask(s, 48, 24, 24, 20, 0.0) for s in sw.SHAPES]
    for i in range(len(masks)):
        for j in range(i):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.9, (sw.SHAPES[i], sw.SHAPES[j], iou)


def test_named_colours_are_far_apart_and_far_from_backgrounds():
    hues = sorted(h for h, _, _ in sw.COLOURS.values())
    gaps = np.diff(hues + [hues[0] + 360.0])
    assert gaps.min() > 2 * sw._HUE_JITTER + 10.0, gaps
    rng = np.random.default_rng(0)
    for _ in range(50):
        for name in sw.COLOURS:
            rgb = sw._object_colour(rng, name) / 255.0
            sat = (rgb.max() - rgb.min()) / rgb.max()
            assert sat > 0.4, (name, rgb)  # backgrounds stay below 0.3


def test_patterns_mark_the_expected_share_of_a_surface():
    ys, xs = np.mgrid[0:200, 0:200].reshape(2, -1).astype(np.float64)
    phase = np.zeros(2)
    shares = {p: sw._pattern_on(p, ys, xs, 0.3, 10.0, phase).mean() for p in sw.PATTERNS}
    assert shares["plain"] == 0.0
    assert abs(shares["striped"] - 0.5) < 0.03 and abs(shares["checkered"] - 0.5) < 0.03
    assert abs(shares["dotted"] - np.pi * sw._DOT_RADIUS**2) < 0.03
    with pytest.raises(ValueError, match="pattern='wavy'"):
        sw._pattern_on("wavy", ys, xs, 0.0, 10.0, phase)


def test_plural():
    assert sw.plural("cross") == "crosses"
    assert sw.plural("circle") == "circles"


# ------------------------------------------------------------------------------------------
# Scenes.


@pytest.mark.parametrize("size,max_objects", [(32, 1), (64, 3), (64, 6), (128, 6)])
def test_render_scene_geometry(size, max_objects):
    for seed in range(25):
        scene = sw.render_scene(np.random.default_rng(seed), size, max_objects=max_objects)
        image, boxes, masks, labels = (
            scene["image"],
            scene["boxes"],
            scene["masks"],
            scene["labels"],
        )
        n = len(labels)
        assert 1 <= n <= max_objects
        assert image.dtype == np.uint8 and image.shape == (size, size, 3)
        assert boxes.dtype == np.float32 and boxes.shape == (n, 4)
        assert masks.dtype == bool and masks.shape == (n, size, size)
        assert labels.dtype == np.int32 and labels.shape == (n,)
        assert np.all((labels >= 0) & (labels < len(sw.CATEGORIES)))
        # Occlusion leaves every pixel to at most one object.
        assert masks.sum(axis=0).max() <= 1
        for k in range(n):
            assert masks[k].sum() >= 10  # heavily occluded objects are dropped
            np.testing.assert_allclose(boxes[k], tight_box(masks[k]), atol=1e-6)
        assert np.all((boxes >= 0) & (boxes <= 1))
        assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of float RGB [..., 3] in [0, 255] (independent of the renderer's colorsys)."""
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-9), 0.0)


def test_objects_are_saturated_while_the_background_is_muted():
    for seed in range(200):
        scene = sw.render_scene(np.random.default_rng(seed), 48)
        image = scene["image"].astype(np.float64)
        for mask, label in zip(scene["masks"], scene["labels"]):
            # Marks may be white (checks), so the object's colour is its most saturated half.
            sat = np.percentile(_saturation(image[mask]), 75)
            assert sat > 0.4, (seed, sw.CATEGORIES[label].name, sat)
        background = image[~scene["masks"].any(axis=0)]
        if len(background):
            assert np.median(_saturation(background)) < 0.4, seed


def test_caption_names_every_object_with_counts():
    for seed in range(200):
        scene = sw.render_scene(np.random.default_rng(seed), 48)
        caption = scene["caption"]
        assert caption == caption.lower() and caption.endswith(".")
        counts = collections.Counter(scene["labels"].tolist())
        for label, count in counts.items():
            name = sw.CATEGORIES[label].name
            assert name in caption, (caption, name)
            if count == 1:
                article = "an" if name[0] in "aeiou" else "a"
                assert re.search(rf"\b{article} {name}\b(?!e?s)", caption), (caption, name)
            else:
                assert f"{NUMBER_WORDS[count]} {english_plural(name)}" in caption, (caption, name)
        # No category that is absent from the scene is mentioned.
        for c in sw.CATEGORIES:
            if c.id not in counts:
                assert not re.search(rf"\b{c.name}", caption), (caption, c.name)


def test_spatial_captions_match_the_boxes():
    pattern = re.compile(
        r"^an? (\w+ \w+) (to the left of|to the right of|above|below|next to) "
        r"an? (\w+ \w+) on an? \w+ background\.$"
    )
    seen = 0
    for seed in range(400):
        scene = sw.render_scene(np.random.default_rng(seed), 64, max_objects=2)
        match = pattern.match(scene["caption"])
        if not match:
            continue
        seen += 1
        names = [sw.CATEGORIES[i].name for i in scene["labels"]]
        a, b = names.index(match.group(1)), names.index(match.group(3))
        box_a, box_b = tight_box(scene["masks"][a]), tight_box(scene["masks"][b])
        dy = (box_a[0] + box_a[2] - box_b[0] - box_b[2]) / 2
        dx = (box_a[1] + box_a[3] - box_b[1] - box_b[3]) / 2
        relation = match.group(2)
        if relation == "to the left of":
            assert dx < 0 and abs(dx) >= abs(dy)
        elif relation == "to the right of":
            assert dx > 0 and abs(dx) >= abs(dy)
        elif relation == "above":
            assert dy < 0 and abs(dy) > abs(dx)
        elif relation == "below":
            assert dy > 0 and abs(dy) > abs(dx)
        else:
            assert max(abs(dx), abs(dy)) < 0.1
    assert seen >= 10


def test_render_scene_is_deterministic_per_seed():
    a = sw.render_scene(np.random.default_rng(123), 64)
    b = sw.render_scene(np.random.default_rng(123), 64)
    c = sw.render_scene(np.random.default_rng(124), 64)
    for key in ("image", "boxes", "masks", "labels"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["caption"] == b["caption"]
    assert not np.array_equal(a["image"], c["image"])


def test_scene_statistics():
    group_of = {c.id: c.frequency for c in sw.CATEGORIES}
    instances = collections.Counter()
    per_category = collections.Counter()
    extents, num_objects = [], []
    for seed in range(400):
        scene = sw.render_scene(np.random.default_rng(seed), 64)
        num_objects.append(len(scene["labels"]))
        for label, mask in zip(scene["labels"].tolist(), scene["masks"]):
            instances[group_of[label]] += 1
            per_category[label] += 1
            box = tight_box(mask)
            extents.append(max(box[2] - box[0], box[3] - box[1]))
    total = sum(instances.values())
    for group, share in sw.GROUP_SHARE.items():
        # Within 4 binomial standard deviations of the configured share.
        tol = 4 * np.sqrt(share * (1 - share) / total)
        assert abs(instances[group] / total - share) < tol, (group, instances, total)
    assert all(per_category[i] > 0 for i in sw.frequency_groups()["r"])
    # Object sizes span at least 4x (tight extents of the visible part, as a fraction of the side).
    small, large = np.quantile(extents, [0.02, 0.98])
    assert large / small >= 4.0, (small, large)
    assert set(num_objects) == set(range(1, 7))


def test_render_scene_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image_size"):
        sw.render_scene(rng, 8)
    with pytest.raises(ValueError, match="max_objects"):
        sw.render_scene(rng, 64, max_objects=0)


# ------------------------------------------------------------------------------------------
# tfds builder (tiny configs).

TINY = dict(image_size=64, num_train=16, num_validation=4, num_test=4, max_objects=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rovit_jax.data import shapes_tfds

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return shapes_tfds.build_shapes_world(data_dir, **TINY), data_dir


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_builder_splits_and_metadata(tiny):
    builder, data_dir = tiny
    assert builder.name == "shapes_world"
    assert builder.is_prepared()
    splits = builder.info.splits
    assert {s: splits[s].num_examples for s in ("train", "validation", "test")} == {
        "train": 16,
        "validation": 4,
        "test": 4,
    }
    assert builder.info.features["objects"]["label"].names == sw.category_names()
    meta = builder.info.metadata
    assert [c["name"] for c in meta["categories"]] == sw.category_names()
    assert {k: list(v) for k, v in meta["frequency_groups"].items()} == sw.frequency_groups()
    assert str(builder.data_dir).startswith(data_dir)
    assert "s64_n16-4-4_o4_seed0" in str(builder.data_dir)


def test_builder_examples_are_self_consistent(tiny):
    builder, _ = tiny
    size = TINY["image_size"]
    for split in ("train", "validation", "test"):
        source = builder.as_data_source(split)
        for i in range(len(source)):
            ex = source[i]
            assert ex["image_id"] == i
            assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
            caption = ex["caption"].decode()
            objects = ex["objects"]
            labels = np.asarray(objects["label"])
            bboxes = np.asarray(objects["bbox"])
            masks = np.asarray(objects["mask"])
            areas = np.asarray(objects["area"])
            n = len(labels)
            assert 1 <= n <= TINY["max_objects"]
            assert (
                bboxes.shape == (n, 4) and masks.shape == (n, size, size, 1) and areas.shape == (n,)
            )
            binary = masks[..., 0] > 0
            assert binary.sum(axis=0).max() <= 1
            for k in range(n):
                np.testing.assert_allclose(bboxes[k], tight_box(binary[k]), atol=1.0 / size + 1e-6)
                assert areas[k] == binary[k].sum()
                assert sw.CATEGORIES[labels[k]].name in caption


def test_builder_stores_the_rendered_scene(tiny):
    builder, _ = tiny
    source = builder.as_data_source("validation")
    for i in range(len(source)):
        scene = sw.render_scene(np.random.default_rng([0, 1, i]), 64, max_objects=4)
        ex = source[i]
        np.testing.assert_array_equal(ex["image"], scene["image"])  # PNG is lossless
        assert ex["caption"].decode() == scene["caption"]
        np.testing.assert_array_equal(np.asarray(ex["objects"]["label"]), scene["labels"])


def test_data_source_random_access_and_raw_image_bytes(tiny):
    builder, _ = tiny
    import tensorflow_datasets as tfds

    source = builder.as_data_source("train")
    raw = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    assert len(source) == len(raw) == 16
    for i in (15, 3, 0, 9):
        encoded = raw[i]["image"]
        assert isinstance(encoded, bytes) and encoded[:8] == b"\x89PNG\r\n\x1a\n"
        np.testing.assert_array_equal(_decode_png(encoded), source[i]["image"])
        assert raw[i]["caption"] == source[i]["caption"]


def test_splits_are_disjoint(tiny):
    builder, _ = tiny
    captions = {}
    images = []
    for split in ("train", "validation", "test"):
        source = builder.as_data_source(split)
        captions[split] = [source[i]["caption"] for i in range(len(source))]
        images.extend(source[i]["image"].tobytes() for i in range(len(source)))
    assert len(set(images)) == len(images)
    assert captions["train"][:4] != captions["validation"]


def test_rebuild_is_a_no_op(tiny):
    from rovit_jax.data import shapes_tfds

    builder, data_dir = tiny
    before = {
        p: os.stat(os.path.join(builder.data_dir, p)).st_mtime_ns
        for p in os.listdir(builder.data_dir)
    }
    again = shapes_tfds.build_shapes_world(data_dir, **TINY)
    after = {
        p: os.stat(os.path.join(again.data_dir, p)).st_mtime_ns for p in os.listdir(again.data_dir)
    }
    assert str(again.data_dir) == str(builder.data_dir)
    assert before == after
    assert len(again.as_data_source("train")) == 16


def test_seed_controls_the_data(tmp_path):
    from rovit_jax.data import shapes_tfds

    small = dict(TINY, num_train=6, num_validation=2, num_test=2)

    def captions(data_dir, seed):
        builder = shapes_tfds.build_shapes_world(str(data_dir), seed=seed, **small)
        source = builder.as_data_source("train")
        return [source[i]["caption"] for i in range(len(source))], str(builder.data_dir)

    first, dir_a = captions(tmp_path / "a", 0)
    second, dir_b = captions(tmp_path / "b", 0)
    third, dir_c = captions(tmp_path / "a", 1)
    assert first == second
    assert first != third
    assert dir_a != dir_c  # different parameters never share a folder


def test_config_validation():
    from rovit_jax.data import shapes_tfds

    with pytest.raises(ValueError, match="image_size"):
        shapes_tfds.ShapesWorldConfig(image_size=4)
    with pytest.raises(ValueError, match="num_train"):
        shapes_tfds.ShapesWorldConfig(num_train=0)
    assert shapes_tfds.ShapesWorldConfig().name == "s128_n6000-500-500_o6_seed0"


def test_each_object_shows_its_categorys_colour_and_pattern():
    """Re-derives every object's category from its pixels: the tone of its marks (grey stripes,
    near-black dots, white checks, none when plain), and the hue of the rest."""
    import colorsys

    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(30):
        scene = sw.render_scene(rng, 128)
        for k, label in enumerate(scene["labels"]):
            cat = sw.CATEGORIES[label]
            pixels = scene["image"][scene["masks"][k]].astype(np.float64) / 255.0
            if len(pixels) < 150:  # too few pixels for stable shares
                continue
            value = pixels.max(-1)
            sat = (value - pixels.min(-1)) / np.maximum(value, 1e-6)
            white = (sat < 0.2) & (value > 0.8)
            grey = (sat < 0.2) & (value > 0.35) & (value < 0.65)
            black = value < 0.15
            rest = ~white & ~grey & ~black
            shares = {"striped": grey.mean(), "dotted": black.mean(), "checkered": white.mean()}
            for pattern, share in shares.items():
                if pattern == cat.pattern:
                    assert share > 0.1, (cat.name, shares)
                else:
                    assert share < 0.05, (cat.name, shares)
            r, g, b = pixels[rest].mean(0)
            hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360.0
            want = sw.COLOURS[cat.colour][0]
            assert min(abs(hue - want), 360 - abs(hue - want)) < sw._HUE_JITTER + 6.0, (
                cat.name,
                hue,
            )
            checked += 1
    assert checked > 40
