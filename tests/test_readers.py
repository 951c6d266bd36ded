"""Readers for real datasets, checked on tiny fixtures written here in the real formats."""

import io
import json
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from rovit_jax.data import categories as cat_lib
from rovit_jax.data import detection_example as dex
from rovit_jax.data import detection_input as di
from rovit_jax.data.coco import (
    CocoCaptionsSource,
    CocoDetectionSource,
    TfdsCocoDetectionSource,
    ov_coco_split,
)
from rovit_jax.data.flickr30k import KarpathyCaptionsSource
from rovit_jax.data.image_text import CorruptImageError, decode_image
from rovit_jax.data.lvis import LvisDetectionSource
from rovit_jax.data.objects365 import Objects365DetectionSource
from rovit_jax.data.web_shards import (
    WebShardsImageTextSource,
    expand_shards,
    host_shard_files,
    index_tfrecord,
    parse_example,
)
from rovit_jax.evaluation.detection import evaluate_lvis

# The COCO 2017 detection categories (instances_val2017.json), written out independently.
COCO80 = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
]  # fmt: skip
OV_NOVEL = """airplane bus cat dog cow elephant umbrella tie snowboard skateboard cup knife cake
couch keyboard sink scissors""".split()


# ------------------------------------------------------------------------------------------
# Fixture writers.


def drawn_image(h, w, seed):
    """A small RGB image with a gradient and a rectangle, so decoding errors would show."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    img[..., 2] = rng.integers(0, 255)
    im = Image.fromarray(img)
    ImageDraw.Draw(im).rectangle([w // 4, h // 4, w // 2, h // 2], fill=(250, 20, 20))
    return np.asarray(im)


def save(path, array, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    with open(path, "rb") as f:
        return f.read()


def uncompressed_rle(mask):
    """COCO's uncompressed RLE: column-major run lengths starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    runs, current, count = [], 0, 0
    for v in flat:
        if v == current:
            count += 1
        else:
            runs.append(count)
            current, count = v, 1
    runs.append(count)
    return {"size": list(mask.shape), "counts": runs}


@pytest.fixture
def coco_fixture(tmp_path):
    """Three images (ids out of order in the JSON), polygon / RLE / crowd annotations."""
    image_dir = tmp_path / "val2017"
    arrays = {7: drawn_image(48, 64, 0), 19: drawn_image(40, 40, 1), 42: drawn_image(32, 48, 2)}
    save(str(image_dir / "000000000007.png"), arrays[7])
    save(str(image_dir / "000000000019.jpg"), arrays[19], "JPEG")
    save(str(image_dir / "000000000042.png"), arrays[42])
    rle_mask = np.zeros((48, 64), np.uint8)
    rle_mask[2:10, 30:45] = 1
    compressed = mask_utils.encode(np.asfortranarray(rle_mask))
    compressed["counts"] = compressed["counts"].decode("ascii")
    crowd_mask = np.zeros((48, 64), np.uint8)
    crowd_mask[30:40, 0:8] = 1
    data = {
        "info": {"description": "tiny"},
        "images": [
            {"id": 42, "file_name": "000000000042.png", "height": 32, "width": 48},
            {"id": 7, "file_name": "000000000007.png", "height": 48, "width": 64},
            {"id": 19, "file_name": "000000000019.jpg", "height": 40, "width": 40},
        ],
        "categories": [
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
        "annotations": [
            {
                "id": 101,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [10.0, 5.0, 20.0, 20.0],
                "area": 400.0,
                "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]],
            },
            {
                "id": 102,
                "image_id": 7,
                "category_id": 18,
                "iscrowd": 0,
                "bbox": [30.0, 2.0, 15.0, 8.0],
                "area": 120.0,
                "segmentation": compressed,
            },
            {
                "id": 103,
                "image_id": 7,
                "category_id": 3,
                "iscrowd": 1,
                "bbox": [0.0, 30.0, 8.0, 10.0],
                "area": 80.0,
                "segmentation": uncompressed_rle(crowd_mask),
            },
            {
                "id": 104,
                "image_id": 42,
                "category_id": 3,
                "iscrowd": 0,
                "bbox": [4.5, 3.25, 30.0, 20.5],
                "area": 300.0,
                "segmentation": [[4.5, 3.25, 20, 3.25, 20, 15], [25, 10, 34.5, 10, 34.5, 23.75]],
            },
        ],
    }
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return str(path), str(image_dir), data, arrays


# ------------------------------------------------------------------------------------------
# Categories and the OV-COCO split.


def test_ov_coco_split_constants():
    names = {n for _, n in COCO80}
    base, novel = set(cat_lib.OV_COCO_BASE), set(cat_lib.OV_COCO_NOVEL)
    assert len(cat_lib.OV_COCO_BASE) == len(base) == 48
    assert len(cat_lib.OV_COCO_NOVEL) == len(novel) == 17
    assert not base & novel
    assert base | novel <= names
    assert novel == set(OV_NOVEL)
    assert len(names - base - novel) == 15
    assert list(cat_lib.COCO_CATEGORIES) == COCO80


def test_category_table():
    table = cat_lib.CategoryTable.from_coco_json(
        {
            "categories": [
                {"id": 9, "name": "zebra crossing", "frequency": "r"},
                {"id": 2, "name": "apple", "frequency": "f"},
                {"id": 5, "name": "kite", "frequency": "c"},
                {"id": 7, "name": "thing"},
            ]
        }
    )
    assert table.ids() == [2, 5, 7, 9]  # id order
    assert table.names() == ["apple", "kite", "thing", "zebra crossing"]
    assert table.base_ids() == [2, 5, 7]
    assert table.novel_ids() == [9]
    assert table.novel_ids(("c", "r")) == [5, 9]
    assert table.frequency_groups() == {"f": [2], "c": [5], "r": [9], "": [7]}
    assert table.as_tuples()[0] == (2, "apple", "f")
    assert dex.base_category_map(table.frequency_groups()) == {2: 0, 5: 1}
    with pytest.raises(ValueError, match="more than once"):
        cat_lib.CategoryTable((cat_lib.Category(1, "a"), cat_lib.Category(1, "b")))
    with pytest.raises(ValueError, match="'x'"):
        cat_lib.CategoryTable((cat_lib.Category(1, "a", "x"),))
    with pytest.raises(ValueError, match="'categories'"):
        cat_lib.CategoryTable.from_coco_json({"images": []})
    with pytest.raises(TypeError):
        table.base_ids("r")


def test_ov_coco_split_on_json_table(tmp_path):
    # Official ids, listed in shuffled order with a non-COCO extra category.
    cats = [{"id": i, "name": n} for i, n in reversed(COCO80)] + [{"id": 200, "name": "x"}]
    table = ov_coco_split(cat_lib.CategoryTable.from_coco_json({"categories": cats}))
    by_name = {n: i for i, n in COCO80}
    assert len(table) == 65
    assert set(table.novel_ids()) == {by_name[n] for n in OV_NOVEL}
    assert len(table.base_ids()) == 48
    assert by_name["airplane"] in table.novel_ids() and by_name["person"] in table.base_ids()
    assert by_name["traffic light"] not in table  # in neither split
    assert table.ids() == sorted(table.ids())
    assert ov_coco_split().ids() == table.ids()  # default: official COCO ids
    with pytest.raises(ValueError, match="airplane"):
        ov_coco_split(cat_lib.CategoryTable.from_coco_json({"categories": cats[:40]}))


# ------------------------------------------------------------------------------------------
# COCO detection.


def test_coco_detection_values(coco_fixture):
    path, image_dir, data, arrays = coco_fixture
    source = CocoDetectionSource(path, image_dir)
    assert len(source) == 3 and source.image_ids == [7, 19, 42]
    assert source.categories.ids() == [1, 3, 18]
    assert source.categories.names() == ["person", "car", "dog"]

    ex = source[0]
    assert ex["image_id"] == 7
    np.testing.assert_array_equal(ex["image"], arrays[7])  # PNG: lossless
    # Hand conversion: (y / H, x / W, (y + h) / H, (x + w) / W) with H = 48, W = 64; the crowd
    # annotation 103 is left out.
    expected = np.array([[5 / 48, 10 / 64, 25 / 48, 30 / 64], [2 / 48, 30 / 64, 10 / 48, 45 / 64]])
    np.testing.assert_allclose(ex["boxes"], expected, rtol=1e-6)
    assert ex["boxes"].dtype == np.float32 and ex["labels"].dtype == np.int32
    np.testing.assert_array_equal(ex["labels"], [1, 18])

    coco = COCO(path)
    for k, ann_id in enumerate([101, 102]):
        np.testing.assert_array_equal(ex["masks"][k], coco.annToMask(coco.anns[ann_id]) > 0)
    assert ex["masks"].dtype == np.bool_ and ex["masks"].shape == (2, 48, 64)

    empty = source[1]  # image 19: no annotations, kept as an empty example
    assert empty["image_id"] == 19 and empty["boxes"].shape == (0, 4)
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, 40, 40)
    with Image.open(os.path.join(image_dir, "000000000019.jpg")) as im:
        np.testing.assert_array_equal(empty["image"], np.asarray(im.convert("RGB")))

    two_polygons = source[2]
    np.testing.assert_allclose(
        two_polygons["boxes"], [[3.25 / 32, 4.5 / 48, 23.75 / 32, 34.5 / 48]], rtol=1e-6
    )
    np.testing.assert_array_equal(two_polygons["masks"][0], coco.annToMask(coco.anns[104]) > 0)

    # Every example passes the pipeline's own format check.
    for i in range(len(source)):
        dex.validate_example(source[i])


def test_coco_crowd_categories_and_ground_truth(coco_fixture):
    path, image_dir, data, _ = coco_fixture
    coco = COCO(path)
    with_crowd = CocoDetectionSource(path, image_dir, include_crowd=True)
    ex = with_crowd[0]
    np.testing.assert_array_equal(ex["labels"], [1, 18, 3])
    np.testing.assert_allclose(ex["boxes"][2], [30 / 48, 0.0, 40 / 48, 8 / 64], rtol=1e-6)
    np.testing.assert_array_equal(ex["masks"][2], coco.annToMask(coco.anns[103]) > 0)
    assert with_crowd.num_crowd(0) == 1

    cars_only = CocoDetectionSource(path, image_dir, categories=[3], with_masks=False)
    assert "masks" not in cars_only[0]
    assert cars_only[0]["labels"].size == 0  # the only car of image 7 is a crowd
    np.testing.assert_array_equal(cars_only[2]["labels"], [3])
    assert cars_only.categories.names() == ["car"]
    with pytest.raises(ValueError, match=r"\[5\]"):
        CocoDetectionSource(path, image_dir, categories=[3, 5])

    subset = CocoDetectionSource(path, image_dir, image_ids=[42, 7])
    assert subset.image_ids == [7, 42]
    gt = subset.ground_truth()
    assert [im["id"] for im in gt["images"]] == [7, 42]
    assert sorted(a["id"] for a in gt["annotations"]) == [101, 102, 103, 104]  # crowd kept
    assert [c["id"] for c in gt["categories"]] == [1, 3, 18]
    assert gt["images"][0] == {k: v for k, v in data["images"][1].items()}


def test_coco_batches_from_source(coco_fixture):
    path, image_dir, _, _ = coco_fixture
    source = CocoDetectionSource(path, image_dir)
    batches = di.DetectionBatches(
        source,
        global_batch=3,
        image_size=32,
        max_instances=4,
        seed=0,
        category_map={1: 0, 3: 1, 18: 2},
        scale_range=(1.0, 1.0),
        flip=False,
    )
    batch = batches.batch(0)
    assert batch["image"].shape == (3, 32, 32, 3) and batch["masks"].shape == (3, 4, 8, 8)
    assert batches.skipped == 0
    # Images 7, 19, 42 hold 2, 0, 1 non-crowd instances; the epoch visits each once.
    assert sorted(batch["valid"].sum(axis=1).tolist()) == [0, 1, 2]
    assert set(batch["classes"][batch["valid"]].tolist()) == {0, 1, 2}


def test_coco_errors(coco_fixture, tmp_path):
    path, image_dir, data, _ = coco_fixture
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetectionSource(str(tmp_path / "nope.json"), image_dir)
    with pytest.raises(FileNotFoundError, match="no_dir"):
        CocoDetectionSource(path, str(tmp_path / "no_dir"))
    for key in ("images", "annotations", "categories"):
        broken = tmp_path / f"no_{key}.json"
        broken.write_text(json.dumps({k: v for k, v in data.items() if k != key}))
        with pytest.raises(ValueError, match=f"'{key}'") as err:
            CocoDetectionSource(str(broken), image_dir)
        assert broken.name in str(err.value)
    bad_cat = dict(
        data, annotations=data["annotations"] + [dict(data["annotations"][0], id=9, category_id=77)]
    )
    (tmp_path / "bad_cat.json").write_text(json.dumps(bad_cat))
    with pytest.raises(ValueError, match="category_id 77"):
        CocoDetectionSource(str(tmp_path / "bad_cat.json"), image_dir)
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        CocoDetectionSource(str(tmp_path / "garbage.json"), image_dir)

    # A missing or broken image file surfaces on access as CorruptImageError naming the file.
    source = CocoDetectionSource(path, image_dir)
    os.remove(os.path.join(image_dir, "000000000042.png"))
    with pytest.raises(CorruptImageError, match="000000000042.png"):
        source[2]
    with open(os.path.join(image_dir, "000000000019.jpg"), "wb") as f:
        f.write(b"not an image")
    with pytest.raises(CorruptImageError, match="000000000019.jpg"):
        source[1]
    # The batcher substitutes such examples and counts them.
    batches = di.DetectionBatches(
        source, global_batch=3, image_size=16, max_instances=2, seed=1, mask_stride=4
    )
    batches.batch(0)
    assert batches.skipped == 2


def test_coco_json_size_mismatch_is_corrupt(coco_fixture):
    path, image_dir, _, _ = coco_fixture
    save(os.path.join(image_dir, "000000000007.png"), drawn_image(20, 20, 3))
    with pytest.raises(CorruptImageError, match="64x48"):
        CocoDetectionSource(path, image_dir)[0]


# ------------------------------------------------------------------------------------------
# tfds coco/2017.

TFDS_EXAMPLES = [
    {
        "image": drawn_image(20 + i, 30, 10 + i),
        "image/filename": f"{i:012d}.jpg",
        "image/id": 500 - i,
        "objects": {
            "area": [10, 20, 30],
            "bbox": np.array(
                [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.25, 0.5, 0.75, 1.0]], np.float32
            ),
            "id": [1, 2, 3],
            "is_crowd": [False, True, False],
            "label": [i, 16, 79],
        },
    }
    for i in range(3)
]


def _tfds_records(features, decoders):
    """What tfds's array_record data source returns: each example serialized and parsed back."""
    return [
        features.deserialize_example_np(features.serialize_example(ex), decoders=decoders)
        for ex in TFDS_EXAMPLES
    ]


def _check_tfds_example(ex, raw, image):
    np.testing.assert_array_equal(ex["image"], image)
    assert ex["image_id"] == raw["image/id"]
    keep = ~np.asarray(raw["objects"]["is_crowd"])
    np.testing.assert_array_equal(ex["boxes"], raw["objects"]["bbox"][keep])
    expected_ids = [COCO80[k][0] for k in np.asarray(raw["objects"]["label"])[keep]]
    np.testing.assert_array_equal(ex["labels"], expected_ids)
    assert ex["labels"].dtype == np.int32


def test_tfds_coco_with_mock_data():
    def as_data_source_fn(self, split, decoders=None, **kwargs):
        return _tfds_records(self.info.features, decoders)

    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source_fn
    ):
        source = TfdsCocoDetectionSource("coco/2017", "validation", data_dir="unused")
        # coco/2017 stores JPEG: the reference pixels are tfds's own decoding.
        decoded = tfds.builder("coco/2017").as_data_source("validation")
        assert len(source) == 3
        assert source.categories.names()[16] == "dog"
        for i in range(3):
            _check_tfds_example(source[i], TFDS_EXAMPLES[i], decoded[i]["image"])
        # Label 0 -> person (1), 79 -> toothbrush (90).
        np.testing.assert_array_equal(source[0]["labels"], [1, 90])
        dex.validate_example(source[0])


class TinyCocoTfrecord(tfds.core.GeneratorBasedBuilder):
    """coco/2017's feature spec, prepared as TFRecord (tfds's default format)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="png"),
                    "image/filename": tfds.features.Text(),
                    "image/id": np.int64,
                    "objects": tfds.features.Sequence(
                        {
                            "area": np.int64,
                            "bbox": tfds.features.BBoxFeature(),
                            "id": np.int64,
                            "is_crowd": np.bool_,
                            "label": tfds.features.ClassLabel(names=[n for _, n in COCO80]),
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i, ex in enumerate(TFDS_EXAMPLES):
            yield i, ex


def test_tfds_coco_tfrecord_preparation(tmp_path):
    builder = TinyCocoTfrecord(data_dir=str(tmp_path), file_format="tfrecord")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    source = TfdsCocoDetectionSource(builder, "validation")
    # Same order as tfds's own tf.data reader of the split.
    order = [int(ex["image/id"]) for ex in tfds.as_numpy(builder.as_dataset("validation"))]
    assert [source[i]["image_id"] for i in range(len(source))] == order
    by_id = {ex["image/id"]: ex for ex in TFDS_EXAMPLES}
    for i in range(len(source)):
        ex = source[i]
        _check_tfds_example(ex, by_id[ex["image_id"]], by_id[ex["image_id"]]["image"])  # PNG
    assert len(TfdsCocoDetectionSource(builder, "validation[1:]")) == 2


# ------------------------------------------------------------------------------------------
# LVIS.


@pytest.fixture
def lvis_fixture(tmp_path):
    root = tmp_path / "coco"
    arrays = {1: drawn_image(30, 40, 4), 2: drawn_image(36, 36, 5), 3: drawn_image(24, 32, 6)}
    save(str(root / "train2017" / "000000000001.jpg"), arrays[1], "PNG")  # PNG bytes, .jpg name
    save(str(root / "val2017" / "000000000002.jpg"), arrays[2], "PNG")
    save(str(root / "val2017" / "000000000003.jpg"), arrays[3], "PNG")
    url = "http://images.cocodataset.org/{}/{:012d}.jpg"
    data = {
        "images": [
            {
                "id": 3,
                "coco_url": url.format("val2017", 3),
                "height": 24,
                "width": 32,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            },
            {
                "id": 1,
                "coco_url": url.format("train2017", 1),
                "height": 30,
                "width": 40,
                "neg_category_ids": [12, 30],
                "not_exhaustive_category_ids": [5],
            },
            {
                "id": 2,
                "coco_url": url.format("val2017", 2),
                "height": 36,
                "width": 36,
                "neg_category_ids": [5],
                "not_exhaustive_category_ids": [],
            },
        ],
        "categories": [
            {"id": 5, "name": "aerosol can", "frequency": "c", "synset": "a.n.01"},
            {"id": 12, "name": "alligator", "frequency": "r", "synset": "b.n.01"},
            {"id": 30, "name": "apple", "frequency": "f", "synset": "c.n.01"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 5,
                "bbox": [2.0, 3.0, 10.0, 12.0],
                "area": 90.0,
                "segmentation": [[2, 3, 12, 3, 12, 15, 2, 15]],
            },
            {
                "id": 2,
                "image_id": 2,
                "category_id": 12,
                "bbox": [5.0, 6.0, 20.0, 10.0],
                "area": 150.0,
                "segmentation": [[5, 6, 25, 6, 15, 16]],
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 30,
                "bbox": [0.0, 20.0, 8.0, 16.0],
                "area": 128.0,
                "segmentation": [[0, 20, 8, 20, 8, 36, 0, 36]],
            },
        ],
    }
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(data))
    return str(path), str(root), data, arrays


def test_lvis_reader(lvis_fixture, tmp_path):
    path, root, data, arrays = lvis_fixture
    source = LvisDetectionSource(path, root)
    assert source.image_ids == [1, 2, 3]
    assert source.categories.as_tuples() == [
        (5, "aerosol can", "c"),
        (12, "alligator", "r"),
        (30, "apple", "f"),
    ]
    assert source.categories.base_ids() == [5, 30] and source.categories.novel_ids() == [12]
    assert source.federated(1) == ([12, 30], [5])
    assert source.federated(2) == ([5], [])
    with pytest.raises(KeyError, match="99"):
        source.federated(99)

    coco = COCO(path)
    ex = source[1]
    np.testing.assert_array_equal(ex["image"], arrays[2])
    np.testing.assert_array_equal(ex["labels"], [12, 30])
    np.testing.assert_allclose(
        ex["boxes"], [[6 / 36, 5 / 36, 16 / 36, 25 / 36], [20 / 36, 0, 36 / 36, 8 / 36]], rtol=1e-6
    )
    for k, ann_id in enumerate([2, 3]):
        np.testing.assert_array_equal(ex["masks"][k], coco.annToMask(coco.anns[ann_id]) > 0)
    assert source[2]["labels"].size == 0

    # A flat folder of images works too (found by file name).
    flat = tmp_path / "flat"
    for sub in ("train2017", "val2017"):
        for name in os.listdir(os.path.join(root, sub)):
            os.makedirs(flat, exist_ok=True)
            os.rename(os.path.join(root, sub, name), flat / name)
    np.testing.assert_array_equal(LvisDetectionSource(path, str(flat))[0]["image"], arrays[1])


def test_lvis_ground_truth_evaluates(lvis_fixture):
    path, root, _, _ = lvis_fixture
    source = LvisDetectionSource(path, root, image_ids=[2, 1])
    gt = source.ground_truth()
    assert [im["id"] for im in gt["images"]] == [1, 2]
    assert gt["images"][0]["neg_category_ids"] == [12, 30]
    assert sorted(a["id"] for a in gt["annotations"]) == [1, 2, 3]
    # Boxes read back from the examples, as detections, give AP 1 on this ground truth.
    dets = []
    for i in range(len(source)):
        ex = source[i]
        h, w = ex["image"].shape[:2]
        for (y0, x0, y1, x1), label in zip(ex["boxes"] * [h, w, h, w], ex["labels"]):
            dets.append(
                {
                    "image_id": ex["image_id"],
                    "category_id": int(label),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": 0.9,
                }
            )
    metrics = evaluate_lvis(gt, dets)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["APr"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------
# Objects365.


def test_objects365_patch_folders(tmp_path):
    image_dir = tmp_path / "train"
    arrays = [drawn_image(20, 30, 7), drawn_image(24, 24, 8), drawn_image(16, 20, 9)]
    save(str(image_dir / "patch0" / "objects365_v1_00000001.jpg"), arrays[0], "PNG")
    save(str(image_dir / "patch1" / "objects365_v2_00000002.jpg"), arrays[1], "PNG")
    save(str(image_dir / "objects365_v2_00000003.jpg"), arrays[2], "PNG")
    v1, v2 = "images/v1/patch0/objects365_v1_", "images/v2/patch9/objects365_v2_"
    data = {
        "images": [
            {"id": 1, "file_name": f"{v1}00000001.jpg", "height": 20, "width": 30},
            {"id": 2, "file_name": "patch1/objects365_v2_00000002.jpg", "height": 24, "width": 24},
            {"id": 3, "file_name": f"{v2}00000003.jpg", "height": 16, "width": 20},
        ],
        "categories": [{"id": 1, "name": "Person"}, {"id": 2, "name": "Sneakers"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [3, 2, 9, 8], "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 24, 12], "iscrowd": 0},
        ],
    }
    path = tmp_path / "zhiyuan_objv2_val.json"
    path.write_text(json.dumps(data))
    source = Objects365DetectionSource(str(path), str(image_dir))
    assert source.categories.as_tuples() == [(1, "Person", ""), (2, "Sneakers", "")]
    for i in range(3):
        ex = source[i]
        np.testing.assert_array_equal(ex["image"], arrays[i])
        assert "masks" not in ex
    np.testing.assert_allclose(source[0]["boxes"], [[2 / 20, 3 / 30, 10 / 20, 12 / 30]], rtol=1e-6)
    np.testing.assert_array_equal(source[0]["labels"], [2])
    np.testing.assert_allclose(source[1]["boxes"], [[0, 0, 0.5, 1]], rtol=1e-6)
    os.remove(image_dir / "patch1" / "objects365_v2_00000002.jpg")
    with pytest.raises(CorruptImageError, match="patch1/objects365_v2_00000002.jpg"):
        source[1]


# ------------------------------------------------------------------------------------------
# Captions: Karpathy split and COCO captions.

NON_ASCII = "Ein Mädchen läuft über die Straße — café, 東京 🙂"


@pytest.fixture
def karpathy_fixture(tmp_path):
    image_dir = tmp_path / "flickr30k-images"
    files = {}
    for imgid, name in [(3, "300.jpg"), (0, "100.jpg"), (1, "200.jpg"), (2, "50.jpg")]:
        files[name] = save(str(image_dir / name), drawn_image(16, 24, imgid), "JPEG")

    def sentences(imgid, n=5):
        return [
            {"raw": f"image {imgid} caption {k} ", "tokens": [], "sentid": 10 * imgid + k}
            for k in range(n)
        ]

    images = [
        {"filename": "300.jpg", "imgid": 3, "split": "test", "sentences": sentences(3)},
        {"filename": "100.jpg", "imgid": 0, "split": "test", "sentences": sentences(0)},
        {"filename": "200.jpg", "imgid": 1, "split": "train", "sentences": sentences(1, 2)},
        {"filename": "50.jpg", "imgid": 2, "split": "test", "sentences": sentences(2)},
    ]
    images[1]["sentences"][2]["raw"] = NON_ASCII
    data = {"dataset": "flickr30k", "images": images}
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path), str(image_dir), files


def test_karpathy_pairs_and_groups(karpathy_fixture):
    path, image_dir, files = karpathy_fixture
    source = KarpathyCaptionsSource(path, image_dir, split="test")
    assert source.image_ids == [0, 2, 3] and source.num_images == 3 and len(source) == 15
    np.testing.assert_array_equal(source.retrieval_groups(), np.repeat([0, 1, 2], 5))
    captions = source.captions()
    assert captions[2] == NON_ASCII
    assert captions[5] == "image 2 caption 0"  # stripped
    for i in (0, 2, 7, 14):
        ex = source[i]
        assert ex["caption"] == captions[i]
    assert source[2]["image"] == files["100.jpg"]
    assert source[7]["image"] == files["50.jpg"]
    assert source[14]["image"] == files["300.jpg"]
    decode_image(source[0]["image"])

    grouped = KarpathyCaptionsSource(path, image_dir, split="test", grouped=True)
    assert len(grouped) == 3
    assert grouped[0]["captions"][2] == NON_ASCII and grouped[0]["caption"] == captions[0]
    assert grouped[2]["image"] == files["300.jpg"]
    # Each caption's group points at an image whose sentences contain it.
    groups = grouped.retrieval_groups()
    for t, caption in enumerate(grouped.captions()):
        assert caption in grouped[int(groups[t])]["captions"]

    both = KarpathyCaptionsSource(path, image_dir, split=("train", "test"))
    assert both.image_ids == [0, 1, 2, 3] and len(both) == 17
    with pytest.raises(ValueError, match="restval"):
        KarpathyCaptionsSource(path, image_dir, split="restval")
    os.remove(os.path.join(image_dir, "50.jpg"))
    with pytest.raises(CorruptImageError, match="50.jpg"):
        source[5]


def test_karpathy_filepath(tmp_path):
    blob = save(str(tmp_path / "coco" / "val2014" / "COCO_val2014_1.jpg"), drawn_image(8, 8, 0))
    data = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_1.jpg",
                "imgid": 0,
                "split": "val",
                "sentences": [{"raw": "a cat"}],
            }
        ],
    }
    (tmp_path / "k.json").write_text(json.dumps(data))
    source = KarpathyCaptionsSource(str(tmp_path / "k.json"), str(tmp_path / "coco"), split="val")
    assert source[0] == {"image": blob, "caption": "a cat"}


def test_coco_captions(tmp_path):
    image_dir = tmp_path / "train2017"
    blobs = {
        i: save(str(image_dir / f"{i}.jpg"), drawn_image(10, 12, i), "JPEG") for i in (5, 9, 11)
    }
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in (9, 11, 5)],
        "annotations": [
            {"id": 1, "image_id": 9, "caption": "A dog on grass."},
            {"id": 2, "image_id": 5, "caption": NON_ASCII},
            {"id": 3, "image_id": 9, "caption": " Two dogs. "},
            {"id": 4, "image_id": 5, "caption": "Second caption of five."},
        ],
    }
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    first = CocoCaptionsSource(str(path), str(image_dir))
    assert first.image_ids == [5, 9] and len(first) == 2  # image 11 has no caption
    assert first[0] == {"image": blobs[5], "caption": NON_ASCII}
    assert first[1] == {"image": blobs[9], "caption": "A dog on grass."}
    every = CocoCaptionsSource(str(path), str(image_dir), all_captions=True)
    assert [every[i]["caption"] for i in range(len(every))] == [
        NON_ASCII,
        "Second caption of five.",
        "A dog on grass.",
        "Two dogs.",
    ]
    np.testing.assert_array_equal(every.text_to_image(), [0, 0, 1, 1])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoCaptionsSource(str(tmp_path / "missing.json"), str(image_dir))


# ------------------------------------------------------------------------------------------
# Web TFRecord shards.


def web_example(image, caption_bytes, key):
    feature = {
        "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption_bytes])),
        "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
        "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[24, -3])),
        "score": tf.train.Feature(float_list=tf.train.FloatList(value=[0.25, 1.5])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.fixture
def web_fixture(tmp_path):
    """Two img2dataset-style shards, the second written first (order must come from names)."""
    shards = {"00001.tfrecord": [], "00000.tfrecord": []}
    blobs = {}
    for shard, n in (("00001.tfrecord", 2), ("00000.tfrecord", 3)):
        with tf.io.TFRecordWriter(str(tmp_path / shard)) as writer:
            for j in range(n):
                key = f"{shard[:5]}{j:04d}"
                buf = io.BytesIO()
                Image.fromarray(drawn_image(12, 16, j)).save(buf, format="JPEG")
                caption = f"caption {key}".encode()
                if key == "000000001":
                    caption = NON_ASCII.encode("utf-8")
                if key == "000010000":
                    caption = b"caf\xe9 \xff bad utf-8"
                writer.write(web_example(buf.getvalue(), caption, key))
                shards[shard].append(key)
                blobs[key] = (buf.getvalue(), caption)
    return tmp_path, shards, blobs


def test_web_shards_values_and_order(web_fixture):
    root, shards, blobs = web_fixture
    source = WebShardsImageTextSource(str(root / "*.tfrecord"))
    assert source.files == [str(root / "00000.tfrecord"), str(root / "00001.tfrecord")]
    assert source.shard_sizes == [3, 2] and len(source) == 5
    keys = shards["00000.tfrecord"] + shards["00001.tfrecord"]
    for i, key in enumerate(keys):
        ex = source[i]
        assert ex["key"] == key
        assert ex["image"] == blobs[key][0]
        if key != "000010000":
            assert ex["caption"] == blobs[key][1].decode("utf-8")
    assert source[1]["caption"] == NON_ASCII
    assert source.undecodable_captions == 1
    assert source[3]["caption"] == "caf\ufffd \ufffd bad utf-8"
    assert source.undecodable_captions == 1  # counted once per example
    assert source.locate(4) == (str(root / "00001.tfrecord"), 1)
    decode_image(source[4]["image"])

    # Other ways to name the same shards; a thread pool gives the same index.
    for spec in (str(root), str(root / "{00000..00001}.tfrecord"), source.files[::-1]):
        other = WebShardsImageTextSource(spec, num_workers=2)
        assert other.files == source.files
        assert [other[i]["key"] for i in range(5)] == keys


def test_tfrecord_index_and_example_parser(web_fixture):
    root, _, _ = web_fixture
    path = str(root / "00000.tfrecord")
    index = index_tfrecord(path)
    with open(path, "rb") as f:
        raw = f.read()
    reference = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    assert [raw[o : o + n] for o, n in index] == reference
    parsed = parse_example(reference[0])
    proto = tf.train.Example.FromString(reference[0])
    assert parsed["jpg"] == list(proto.features.feature["jpg"].bytes_list.value)
    assert parsed["width"] == [24, -3]
    assert parsed["score"] == [0.25, 1.5]


def test_web_shards_errors_and_host_split(web_fixture, tmp_path):
    root, _, _ = web_fixture
    with pytest.raises(FileNotFoundError, match="nothing-"):
        WebShardsImageTextSource(str(root / "nothing-*.tfrecord"))
    with pytest.raises(FileNotFoundError, match="00002.tfrecord"):
        expand_shards(str(root / "{00000..00002}.tfrecord"))
    # Corrupt length CRC and truncation are reported with the file name.
    path = root / "00000.tfrecord"
    raw = bytearray(path.read_bytes())
    bad = root / "bad.tfrecord"
    bad.write_bytes(bytes(raw[:8]) + struct.pack("<I", 12345) + bytes(raw[12:]))
    with pytest.raises(ValueError, match="bad.tfrecord"):
        index_tfrecord(str(bad))
    cut = root / "cut.tfrecord"
    cut.write_bytes(bytes(raw[:-5]))
    with pytest.raises(ValueError, match="cut.tfrecord.*past the end"):
        index_tfrecord(str(cut))
    # A record without the caption feature is an unusable example naming shard and record.
    odd = tmp_path / "odd" / "x.tfrecord"
    odd.parent.mkdir()
    with tf.io.TFRecordWriter(str(odd)) as writer:
        feature = {"jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))}
        writer.write(
            tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
        )
    with pytest.raises(CorruptImageError, match="x.tfrecord record 0.*'txt'"):
        WebShardsImageTextSource(str(odd))[0]

    files = [f"shard-{i:03d}.tfrecord" for i in range(7)]
    for count in (1, 2, 3, 7):
        parts = [host_shard_files(files, i, count) for i in range(count)]
        assert sorted(f for p in parts for f in p) == files  # covering, no duplicates
        assert all(not set(a) & set(b) for k, a in enumerate(parts) for b in parts[k + 1 :])
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [host_shard_files(files, i, count) for i in range(count)]
    with pytest.raises(ValueError, match="8 hosts"):
        host_shard_files(files, 0, 8)
    source = WebShardsImageTextSource(str(root / "0000*.tfrecord"))
    assert source.host_shard(1, 2) == [str(root / "00001.tfrecord")]
