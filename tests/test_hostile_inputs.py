"""Hostile inputs mixed with valid ones: every problem counted under its reason, nothing valid lost.

The broken files are written here in their real formats (truncated JPEG / PNG, random bytes, a
PNG header claiming 100000 x 100000 pixels, ...) and run through PretrainBatches,
DetectionBatches and the COCO reader. One epoch visits every dataset index exactly once as an
original example, so the skip counts must equal what was planted.
"""

import io
import json
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from rovit_jax.data import detection_example as dex
from rovit_jax.data import detection_input as di
from rovit_jax.data import image_text
from rovit_jax.data.coco import CocoDetectionSource
from rovit_jax.data.stream import error_reason

# ------------------------------------------------------------------------------------------------
# Files in real formats.


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def flat_png(value: int, h: int = 12, w: int = 14) -> bytes:
    return encode(np.full((h, w, 3), value, np.uint8))


def noise(h: int = 24, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def truncated(fmt: str) -> bytes:
    data = encode(noise(), fmt)  # noise does not compress: the cut lands inside the pixel data
    return data[: len(data) // 2]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels, with a token IDAT (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def zero_height(fmt: str) -> bytes:
    """A real BMP / JPEG file whose header is edited to declare a height of 0."""
    data = bytearray(encode(noise(8, 8), fmt))
    if fmt == "BMP":
        data[22:26] = struct.pack("<i", 0)
    else:
        sof = data.index(b"\xff\xc0")  # baseline start-of-frame: length, precision, H, W
        data[sof + 5 : sof + 7] = struct.pack(">H", 0)
    return bytes(data)


RANDOM_BYTES = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()


def test_planted_files_are_what_they_claim():
    """The corpus itself: each broken file is refused for the intended reason."""
    cases = {
        "undecodable_image": [RANDOM_BYTES, truncated("JPEG"), truncated("PNG"), b""],
        "image_too_large": [png_header_only(100_000, 100_000), png_header_only(9000, 9000)],
        "zero_size_image": [
            png_header_only(0, 8),
            png_header_only(8, 0),
            zero_height("BMP"),
            zero_height("JPEG"),
        ],
        "image_too_small": [flat_png(3, 1, 1), flat_png(3, 1, 40)],
    }
    for reason, blobs in cases.items():
        for blob in blobs:
            with pytest.raises(image_text.CorruptImageError) as info:
                image_text.decode_image(blob)
            assert info.value.reason == reason == error_reason(info.value)
    # The untruncated files decode, so the truncation is what breaks them.
    assert image_text.decode_image(encode(noise(), "JPEG")).shape == (24, 24, 3)
    np.testing.assert_array_equal(image_text.decode_image(encode(noise(), "PNG")), noise())
    assert image_text.decode_image(flat_png(3, 2, 2)).shape == (2, 2, 3)  # smallest accepted


# ------------------------------------------------------------------------------------------------
# Pretraining.


class WordTokenizer:
    """One id per word (caption "i" -> id i + 4 after BOS, other words 3); 0 = padding."""

    vocab_size, max_len, pad_id = 1000, 4, 0

    def encode(self, texts):
        out = np.zeros((len(texts), self.max_len), np.int32)
        for i, t in enumerate(texts):
            words = [int(w) + 4 if w.isdigit() else 3 for w in t.split()]
            ids = [1] + words[: self.max_len - 1]
            out[i, : len(ids)] = ids
        return out


class ListSource:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pixel_value(i: int) -> int:
    return 10 + 7 * i


def pretrain_corpus():
    """(items, planted {reason: count}, indices of valid examples, indices with a bad image)."""
    valid = [
        {"image": flat_png(pixel_value(i), 8 + i % 5, 9 + i % 7), "caption": f"{i}"}
        for i in range(21)
    ]
    hostile = [
        ("undecodable_image", {"image": RANDOM_BYTES, "caption": "100"}),
        ("undecodable_image", {"image": truncated("JPEG"), "caption": "101"}),
        ("undecodable_image", {"image": truncated("PNG"), "caption": "102"}),
        ("image_too_large", {"image": png_header_only(100_000, 100_000), "caption": "103"}),
        ("image_too_large", {"image": png_header_only(9000, 9000), "caption": "104"}),
        ("zero_size_image", {"image": png_header_only(0, 8), "caption": "105"}),
        ("image_too_small", {"image": flat_png(200, 1, 1), "caption": "106"}),
        ("empty_caption", {"image": flat_png(201), "caption": ""}),
        ("empty_caption", {"image": flat_png(202), "caption": " \t\n"}),
        ("non_utf8_caption", {"image": flat_png(203), "caption": b"\xff\xfe 7"}),
        ("missing_caption", {"image": flat_png(204), "caption": None}),
    ]
    # Interleave so bad examples sit next to each other and to good ones.
    items, valid_idx, bad_image_idx, planted = [], [], [], {}
    order = list(range(len(valid) + len(hostile)))
    np.random.default_rng(5).shuffle(order)
    pool = [("ok", ex) for ex in valid] + hostile
    for k in order:
        reason, ex = pool[k]
        if reason == "ok":
            valid_idx.append(len(items))
        else:
            planted[reason] = planted.get(reason, 0) + 1
            if "caption" not in reason:
                bad_image_idx.append(len(items))
        items.append(ex)
    return items, planted, valid_idx, bad_image_idx


def test_pretrain_batches_count_each_planted_problem_and_serve_every_valid_example():
    items, planted, valid_idx, _ = pretrain_corpus()
    assert len(items) == 32
    src = ListSource(items)
    kw = dict(global_batch=8, image_size=8, seed=4)
    serial = image_text.PretrainBatches(src, WordTokenizer(), **kw)
    threaded = image_text.PretrainBatches(src, WordTokenizer(), num_workers=3, **kw)
    processes = image_text.PretrainBatches(src, WordTokenizer(), worker_processes=2, **kw)
    served = []
    for step in range(4):  # one epoch: every index is an original example exactly once
        a = serial.batch(step)
        for b in (threaded.batch(step), processes.batch(step)):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["text"], b["text"])
        ids = a["text"][:, 1] - 4
        # Content matches the caption: the row's image is the example's own image.
        np.testing.assert_allclose(
            a["image"][:, 0, 0, 0], [pixel_value(i) / 127.5 - 1.0 for i in ids], atol=1e-6
        )
        served += ids.tolist()
    assert len(served) == 32
    valid_ids = {int(items[i]["caption"]) for i in valid_idx}
    assert set(served) == valid_ids  # every valid example served; no hostile one
    for batches in (serial, threaded, processes):
        assert batches.skipped == sum(planted.values()) == 11
        nonzero = {r: n for r, n in batches.skipped_by_reason.items() if n}
        assert nonzero == planted
        assert batches.counts() == {f"skipped/{r}": n for r, n in batches.skipped_by_reason.items()}
    # Resuming restores the tallies.
    resumed = image_text.PretrainBatches(src, WordTokenizer(), **kw)
    resumed.restore_counts(serial.counts())
    assert resumed.counts() == serial.counts() and resumed.skipped == serial.skipped


def test_eval_batches_mask_bad_images_and_survive_bad_captions():
    items, _, _, bad_image_idx = pretrain_corpus()
    batches = list(
        image_text.eval_batches(ListSource(items), WordTokenizer(), batch_size=8, image_size=8)
    )
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, [i not in bad_image_idx for i in range(len(items))])


# ------------------------------------------------------------------------------------------------
# Detection examples in memory.


def det_example(value: int, rects, labels, h: int = 16, w: int = 16, image_id: int = 0):
    rects = np.asarray(rects, np.float32).reshape(-1, 4)
    masks = np.zeros((len(rects), h, w), np.bool_)
    for k, (y0, x0, y1, x1) in enumerate(rects):
        if np.isfinite([y0, x0, y1, x1]).all():
            masks[k, int(max(y0, 0)) : int(max(y1, 0)), int(max(x0, 0)) : int(max(x1, 0))] = True
    return {
        "image": np.full((h, w, 3), value, np.uint8),
        "image_id": image_id,
        "boxes": rects / np.array([h, w, h, w], np.float32),
        "labels": np.asarray(labels, np.int32),
        "masks": masks,
    }


CATEGORY_MAP = {1: 0, 2: 1}


def detection_corpus():
    """(examples, planted skips, {image pixel value: expected classes} of the valid examples)."""
    valid = {}
    examples = []
    for i in range(7):
        v = 20 + 25 * i
        label = 1 + i % 2
        examples.append(det_example(v, [(2, 3, 10, 12)], [label], image_id=i))
        valid[v] = [CATEGORY_MAP[label]]
    # One valid image whose instances are mostly bad: only the first survives.
    messy_rects = [
        (2, 2, 12, 12),  # good
        (np.nan, 1, 5, 5),  # nonfinite
        (20, 1, 30, 5),  # outside the 16 x 16 image
        (9, 9, 4, 12),  # negative height
        (4, 4, 4, 9),  # zero height
        (3, 3, 9, 9),  # good box, unknown category 99
    ]
    examples.append(det_example(230, messy_rects, [2, 1, 1, 2, 1, 99], image_id=7))
    valid[230] = [CATEGORY_MAP[2]]
    good = det_example(5, [(2, 3, 10, 12)], [1])
    hostile = [
        ("undecodable_image", {**good, "image": RANDOM_BYTES}),
        ("undecodable_image", {**good, "image": truncated("PNG")}),
        ("image_too_large", {**good, "image": png_header_only(100_000, 100_000)}),
        ("zero_size_image", {**good, "image": np.zeros((0, 16, 3), np.uint8)}),
        ("image_too_small", {**good, "image": np.zeros((1, 1, 3), np.uint8)}),
        ("bad_mask_shape", {**good, "masks": np.zeros((1, 15, 16), np.bool_)}),
        ("bad_labels", {**good, "labels": np.array([1, 2], np.int32)}),
        ("missing_field", {k: v for k, v in good.items() if k != "boxes"}),
    ]
    planted = {}
    for reason, _ in hostile:
        planted[reason] = planted.get(reason, 0) + 1
    mixed = examples + [ex for _, ex in hostile]
    order = np.random.default_rng(2).permutation(len(mixed))
    return [mixed[k] for k in order], planted, valid


def served_rows(batch):
    """[(image pixel value, valid classes)] of a detection batch."""
    values = np.rint((batch["image"][:, 0, 0, 0] + 1.0) * 127.5).astype(int)
    return [(int(v), batch["classes"][r][batch["valid"][r]].tolist()) for r, v in enumerate(values)]


def test_detection_batches_count_each_planted_problem_and_serve_every_valid_example():
    examples, planted, valid = detection_corpus()
    assert len(examples) == 16
    src = ListSource(examples)
    kw = dict(
        global_batch=8,
        image_size=32,
        max_instances=4,
        seed=0,
        category_map=CATEGORY_MAP,
        scale_range=(1.0, 1.0),
        flip=False,
    )
    serial, threaded = di.DetectionBatches(src, **kw), di.DetectionBatches(src, num_workers=2, **kw)
    processes = di.DetectionBatches(src, worker_processes=2, **kw)
    rows = []
    for step in range(2):  # one epoch
        a = serial.batch(step)
        for b in (threaded.batch(step), processes.batch(step)):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        rows += served_rows(a)
    assert len(rows) == 16
    assert {v for v, _ in rows} == set(valid)  # every valid image served, no hostile one
    for v, classes in rows:
        assert classes == valid[v], v  # the messy image keeps exactly its good instance
    for batches in (serial, threaded, processes):
        assert batches.skipped == sum(planted.values()) == 8
        assert {r: n for r, n in batches.skipped_by_reason.items() if n} == planted
        assert batches.dropped == {
            "bad_box": 4,
            "unmapped_category": 1,
            "cropped_or_tiny": 0,
            "over_max_instances": 0,
        }
        assert batches.bad_boxes == {
            "nonfinite": 1,
            "negative_size": 1,
            "zero_size": 1,
            "outside_image": 1,
        }
        counts = batches.counts()
        assert {k: n for k, n in counts.items() if n} == {
            **{f"skipped/{r}": n for r, n in planted.items()},
            "dropped/bad_box": 4,
            "dropped/unmapped_category": 1,
            "bad_box/nonfinite": 1,
            "bad_box/negative_size": 1,
            "bad_box/zero_size": 1,
            "bad_box/outside_image": 1,
        }
    resumed = di.DetectionBatches(src, **kw)
    resumed.restore_counts(serial.counts())
    assert resumed.counts() == serial.counts() and resumed.skipped == 8


def test_missing_masks_and_bad_mask_dtype_are_skipped_with_their_reason():
    good = det_example(40, [(2, 3, 10, 12)], [1])
    no_masks = {k: v for k, v in good.items() if k != "masks"}
    text_masks = {**good, "masks": np.full((1, 16, 16), "x")}
    src = ListSource([good, no_masks, text_masks, good])
    batches = di.DetectionBatches(
        src, global_batch=4, image_size=16, max_instances=2, seed=0, scale_range=(1.0, 1.0)
    )
    batches.batch(0)
    assert {r: n for r, n in batches.skipped_by_reason.items() if n} == {
        "missing_masks": 1,
        "bad_mask_dtype": 1,
    }
    # Box-only training accepts the example without masks.
    box_only = di.DetectionBatches(
        ListSource([no_masks] * 2),
        global_batch=2,
        image_size=16,
        max_instances=2,
        seed=0,
        scale_range=(1.0, 1.0),
        with_masks=False,
    )
    assert box_only.batch(0)["valid"].sum() == 2 and box_only.skipped == 0


# ------------------------------------------------------------------------------------------------
# The COCO reader.


def polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_coco")
    images_dir = root / "images"
    images_dir.mkdir()
    images, annotations = [], []

    def add_image(image_id, name, data, w, h):
        if data is not None:
            (images_dir / name).write_bytes(data)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})

    def add_ann(image_id, bbox, category_id, segmentation=None):
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": bbox,
                "area": 1.0,
                "iscrowd": 0,
                "segmentation": segmentation or polygon(2, 2, 8, 8),
            }
        )

    valid = {}  # pixel value -> image id
    for k in range(6):
        image_id, v = 10 + k, 30 + 30 * k
        add_image(image_id, f"ok_{k}.png", flat_png(v, 16, 20), 20, 16)
        add_ann(image_id, [3, 2, 10, 9], 1 + k % 2, polygon(3, 2, 10, 9))
        valid[v] = image_id
    # Bad instances on a valid image (dropped, the image stays).
    add_ann(10, [float("nan"), 1, 4, 4], 1)
    add_ann(10, [40, 1, 4, 4], 1)  # outside the 20-pixel-wide image
    add_ann(10, [5, 5, -3, 4], 2)  # negative width
    add_ann(10, [5, 5, 0, 4], 2)  # zero width
    add_ann(10, [1, 1, 6, 6], 3)  # category 3: not in the training vocabulary
    # Bad images.
    planted = {"undecodable_image": 3, "image_too_large": 1, "image_too_small": 1}
    add_image(20, "truncated.jpg", truncated("JPEG"), 24, 24)
    add_image(21, "noise.jpg", RANDOM_BYTES, 24, 24)
    add_image(22, "missing.jpg", None, 24, 24)  # listed, not on disk
    add_image(23, "bomb.png", png_header_only(100_000, 100_000), 100_000, 100_000)
    add_image(24, "one_pixel.png", flat_png(9, 1, 1), 1, 1)
    # A valid image with an undecodable segmentation: the example is skipped.
    add_image(25, "bad_segm.png", flat_png(250, 16, 20), 20, 16)
    add_ann(25, [3, 2, 10, 9], 1, segmentation="not a polygon")
    planted["invalid_annotation"] = 1
    categories = [{"id": i, "name": n} for i, n in ((1, "red"), (2, "green"), (3, "blue"))]
    path = root / "instances.json"
    path.write_text(
        json.dumps({"images": images[::-1], "annotations": annotations, "categories": categories})
    )
    return {"json": str(path), "images": str(images_dir), "planted": planted, "valid": valid}


def test_coco_reader_names_the_file_of_each_bad_image(coco_files):
    src = CocoDetectionSource(coco_files["json"], coco_files["images"])
    assert src.image_ids == [10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25]
    expected = {
        20: ("truncated.jpg", "undecodable_image"),
        21: ("noise.jpg", "undecodable_image"),
        22: ("missing.jpg", "undecodable_image"),
        23: ("bomb.png", "image_too_large"),
        24: ("one_pixel.png", "image_too_small"),
        25: ("bad_segm.png", "invalid_annotation"),
    }
    for image_id, (name, reason) in expected.items():
        with pytest.raises((image_text.CorruptImageError, dex.InvalidExampleError)) as info:
            src[src.image_ids.index(image_id)]
        assert name in str(info.value) and error_reason(info.value) == reason


def test_coco_batches_count_planted_problems_and_serve_every_valid_image(coco_files):
    src = CocoDetectionSource(coco_files["json"], coco_files["images"])
    batches = di.DetectionBatches(
        src,
        global_batch=6,
        image_size=32,
        max_instances=8,
        seed=1,
        category_map=CATEGORY_MAP,
        scale_range=(1.0, 1.0),
        flip=False,
    )
    rows = served_rows(batches.batch(0)) + served_rows(batches.batch(1))
    valid = coco_files["valid"]
    assert {v for v, _ in rows} == set(valid)
    image_10 = [classes for v, classes in rows if valid[v] == 10]
    assert image_10 and all(classes == [CATEGORY_MAP[1]] for classes in image_10)
    assert {r: n for r, n in batches.skipped_by_reason.items() if n} == coco_files["planted"]
    assert batches.dropped["bad_box"] == 4 and batches.dropped["unmapped_category"] == 1
    assert batches.bad_boxes == dict.fromkeys(dex.BAD_BOX_KINDS, 1)


def test_coco_evaluation_masks_unusable_images(coco_files):
    src = CocoDetectionSource(coco_files["json"], coco_files["images"])
    batches = list(di.eval_detection_batches(src, batch_size=4, image_size=32))
    mask = np.concatenate([b["mask"] for b in batches])
    ids = np.concatenate([b["image_id"] for b in batches])
    np.testing.assert_array_equal(mask, [i < 6 for i in range(12)])
    np.testing.assert_array_equal(ids[:6], sorted(coco_files["valid"].values()))


def _write_json(path, images, annotations):
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return str(path)


def test_coco_json_problems_are_refused_at_construction_naming_file_and_id(tmp_path):
    (tmp_path / "images").mkdir()
    im = {"file_name": "a.png", "width": 8, "height": 8}
    ann = {"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 1, 2, 2]}
    dup = _write_json(tmp_path / "dup.json", [{**im, "id": 5}, {**im, "id": 5}], [ann])
    with pytest.raises(ValueError, match=re.escape(dup) + ".*image id 5 appears more than once"):
        CocoDetectionSource(dup, tmp_path / "images")
    unknown = _write_json(
        tmp_path / "cat.json", [{**im, "id": 5}], [{**ann, "id": 9, "category_id": 77}]
    )
    with pytest.raises(ValueError, match=re.escape(unknown) + ".*annotation 9.*category_id 77"):
        CocoDetectionSource(unknown, tmp_path / "images")
    dangling = _write_json(tmp_path / "img.json", [{**im, "id": 5}], [{**ann, "image_id": 6}])
    with pytest.raises(ValueError, match=re.escape(dangling) + ".*image_id 6"):
        CocoDetectionSource(dangling, tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        CocoDetectionSource(str(tmp_path / "absent.json"), tmp_path / "images")
