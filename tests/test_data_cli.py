"""The dataset checker CLI (`python -m rovit_jax.data check`) on tiny fixtures written here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from rovit_jax.data.__main__ import main


def write_image(path, h, w, colour=(40, 120, 200)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(path, format="PNG")


def run(capsys, *argv):
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return code, fields, err


@pytest.fixture
def coco_files(tmp_path):
    images = tmp_path / "images"
    write_image(str(images / "a.png"), 40, 60)
    write_image(str(images / "b.png"), 30, 30)
    write_image(str(images / "c.png"), 20, 50)
    data = {
        "images": [
            {"id": 3, "file_name": "c.png", "height": 20, "width": 50},
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "b.png", "height": 30, "width": 30},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 8, 20, 16],
                "iscrowd": 0,
                "segmentation": [[10, 8, 30, 8, 30, 24, 10, 24]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 60, 40],
                "iscrowd": 1,
                "segmentation": [[0, 0, 60, 0, 60, 40, 0, 40]],
            },
            {
                "id": 3,
                "image_id": 3,
                "category_id": 1,
                "bbox": [5, 5, 10, 10],
                "iscrowd": 0,
                "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]],
            },
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(path), str(images)


def test_coco_counts_and_render(coco_files, tmp_path, capsys):
    ann, images = coco_files
    out_dir = tmp_path / "out"
    code, fields, err = run(
        capsys, "--format", "coco", "--annotations", ann, "--images", images,
        "--render", "2", "--out", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    assert fields["images"] == "3"
    assert fields["instances"] == "2"  # the crowd annotation is not a target
    assert fields["crowd_instances_excluded"] == "1"
    assert fields["categories"] == "2"
    assert fields["categories_without_instances"] == "1"  # airplane
    assert fields["images_without_annotations"] == "1"  # image 2
    assert fields["frequency unknown"] == "categories=2 instances=2"
    assert fields["decode_failures"] == "0 of first 3"
    assert fields["rendered"].startswith("2 ")
    # Two evenly spread samples: the first and last images by id (1 and 3).
    files = sorted(os.listdir(out_dir))
    assert files == ["coco_000000_id1.png", "coco_000002_id3.png"]
    with Image.open(out_dir / files[0]) as im:
        up = 256 // 60  # small images are upscaled
        assert im.size == (60 * up, 40 * up)
        pixels = np.asarray(im.convert("RGB"))
    # The box [x=10, y=8, w=20, h=16] is outlined: its top edge, mid-way, is drawn over.
    assert tuple(pixels[8 * up, 20 * up]) != (40, 120, 200)
    assert tuple(pixels[2, 2]) == (40, 120, 200)  # background untouched


def test_decode_failures_are_reported_not_fatal(coco_files, capsys):
    ann, images = coco_files
    with open(os.path.join(images, "b.png"), "wb") as f:
        f.write(b"\x89PNG broken")
    os.remove(os.path.join(images, "c.png"))
    code, fields, _ = run(capsys, "--format", "coco", "--annotations", ann, "--images", images)
    assert code == 0
    assert fields["decode_failures"] == "2 of first 3"
    assert "b.png" in fields["first_failure"]


def test_missing_input_exits_2_naming_the_file(coco_files, tmp_path, capsys):
    _, images = coco_files
    missing = str(tmp_path / "instances_missing.json")
    # Through the module entry point, as a user runs it.
    proc = subprocess.run(
        [sys.executable, "-m", "rovit_jax.data", "check", "--format", "coco"]
        + ["--annotations", missing, "--images", images],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "instances_missing.json" in lines[0]
    code, _, err = run(capsys, "--format", "lvis", "--images", images)
    assert code == 2 and "--annotations" in err
    code, _, err = run(capsys, "--format", "coco", "--annotations", missing, "--images", images)
    assert code == 2 and missing in err


def test_lvis_frequency_groups(tmp_path, capsys):
    write_image(str(tmp_path / "coco" / "val2017" / "000000000001.jpg"), 20, 20)
    data = {
        "images": [
            {
                "id": 1,
                "coco_url": "http://images.cocodataset.org/val2017/000000000001.jpg",
                "height": 20,
                "width": 20,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            }
        ],
        "categories": [
            {"id": 1, "name": "a", "frequency": "f"},
            {"id": 2, "name": "b", "frequency": "r"},
            {"id": 3, "name": "c", "frequency": "r"},
        ],
        "annotations": [
            {"id": k, "image_id": 1, "category_id": c, "bbox": [1, 1, 5, 5], "segmentation": s}
            for k, c, s in [
                (1, 1, [[1, 1, 6, 1, 6, 6]]),
                (2, 2, [[1, 1, 6, 1, 6, 6]]),
                (3, 2, [[2, 2, 7, 2, 7, 7]]),
            ]
        ],
    }
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    code, fields, err = run(
        capsys, "--format", "lvis", "--annotations", str(tmp_path / "lvis.json"),
        "--images", str(tmp_path / "coco"),
    )  # fmt: skip
    assert code == 0, err
    assert fields["frequency f"] == "categories=1 instances=1"
    assert "frequency c" not in fields  # empty groups are not listed
    assert fields["frequency r"] == "categories=2 instances=2"
    assert fields["instances"] == "3" and fields["categories_without_instances"] == "1"


def test_karpathy_counts_and_caption_render(tmp_path, capsys):
    write_image(str(tmp_path / "imgs" / "1.jpg"), 30, 40)
    write_image(str(tmp_path / "imgs" / "2.jpg"), 30, 40)
    images = [
        {"filename": f"{i}.jpg", "imgid": i, "split": "test", "sentences": [{"raw": f"s{i}{k}"} for k in range(n)]}
        for i, n in ((1, 5), (2, 3))
    ]  # fmt: skip
    (tmp_path / "k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    out_dir = tmp_path / "out"
    code, fields, err = run(
        capsys, "--format", "karpathy", "--annotations", str(tmp_path / "k.json"),
        "--images", str(tmp_path / "imgs"), "--render", "1", "--out", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    assert fields["images"] == "2" and fields["captions"] == "8"
    assert fields["captions_per_image"] == "min=3 max=5"
    with Image.open(out_dir / os.listdir(out_dir)[0]) as im:
        assert im.width == 40 and im.height > 30  # the caption band below the image


def test_web_shards_counts(tmp_path, capsys):
    import io

    for shard, captions in (("b.tfrecord", [b"ok", b"\xff\xfe"]), ("a.tfrecord", [b"fine"])):
        with tf.io.TFRecordWriter(str(tmp_path / shard)) as writer:
            for caption in captions:
                buf = io.BytesIO()
                Image.new("RGB", (8, 8)).save(buf, format="JPEG")
                feature = {
                    "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()])),
                    "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption])),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
    code, fields, err = run(capsys, "--format", "web", "--images", str(tmp_path))
    assert code == 0, err
    assert fields["shards"] == "2" and fields["examples"] == "3"
    assert fields["decode_failures"] == "0 of first 3"
    assert fields["non_utf8_captions"] == "1 of first 3"


def test_shapes_world_counts(tmp_path, capsys):
    world = "image_size=32,num_train=4,num_validation=2,num_test=2,max_objects=2,seed=3"
    code, fields, err = run(
        capsys, "--format", "shapes", "--images", str(tmp_path), "--world", world, "--split", "test"
    )
    assert code == 0, err
    from rovit_jax.data import shapes_tfds

    builder = shapes_tfds.shapes_builder(
        str(tmp_path), image_size=32, num_train=4, num_validation=2, num_test=2, max_objects=2,
        seed=3,
    )  # fmt: skip
    records = builder.as_data_source("test")
    labels = [np.asarray(records[i]["objects"]["label"]) for i in range(len(records))]
    assert fields["images"] == "2"
    assert fields["instances"] == str(sum(len(x) for x in labels))
    assert fields["categories"] == str(len(builder.info.metadata["categories"]))
    groups = {g: set(ids) for g, ids in builder.info.metadata["frequency_groups"].items()}
    rare = sum(int(label in groups["r"]) for x in labels for label in x.tolist())
    assert fields["frequency r"] == f"categories={len(groups['r'])} instances={rare}"
    code, _, err = run(capsys, "--format", "shapes", "--images", str(tmp_path), "--world", "bad")
    assert code == 2 and "bad" in err
