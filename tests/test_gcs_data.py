"""Dataset readers on files in a bucket read exactly what they read from the same files on disk.

Each test writes a tiny dataset in its real format on local disk (the writers of test_readers),
uploads the same bytes to a local GCS server (the `gcs_bucket` fixture of conftest.py) with
`paths.write_bytes`, and reads both copies with the project's readers: same examples, same shard
lists, same token ids, and the same error naming the culprit when a file is missing. Nothing is
mocked: the bucket copy goes through gcsfs, as in production.
"""

import json
import os
import uuid

import numpy as np
import pytest
import test_readers as readers
from conftest import copy_tree
from test_readers import NON_ASCII, drawn_image, save

from rovit_jax import paths
from rovit_jax.data import tokenizer as tk
from rovit_jax.data.__main__ import main as data_cli
from rovit_jax.data.coco import CocoCaptionsSource, CocoDetectionSource
from rovit_jax.data.flickr30k import KarpathyCaptionsSource
from rovit_jax.data.image_text import CorruptImageError
from rovit_jax.data.lvis import LvisDetectionSource
from rovit_jax.data.web_shards import WebShardsImageTextSource, expand_shards, index_tfrecord

# The datasets of test_readers, written in their real formats under the test's tmp_path.
coco_fixture = readers.coco_fixture
lvis_fixture = readers.lvis_fixture
karpathy_fixture = readers.karpathy_fixture
web_fixture = readers.web_fixture


@pytest.fixture
def mirror(gcs_bucket, tmp_path):
    """(local root, bucket root): a fresh bucket folder standing for `tmp_path`; call
    `copy_tree(local, remote)` once the local files are written."""
    return str(tmp_path), f"{gcs_bucket}/data_{uuid.uuid4().hex[:8]}"


def same_error(make, local: str, remote: str, error: type[Exception]) -> str:
    """`make(root)` raises `error` for both roots with the same message (up to the root);
    returns the bucket's message."""
    with pytest.raises(error) as on_disk:
        make(local)
    with pytest.raises(error) as in_bucket:
        make(remote)
    assert str(in_bucket.value) == str(on_disk.value).replace(local, remote)
    assert remote in str(in_bucket.value)
    return str(in_bucket.value)


def assert_same_examples(a, b) -> None:
    """Every example of sources `a` and `b` is equal (arrays, bytes, strings and ints)."""
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert sorted(x) == sorted(y)
        for key in x:
            if isinstance(x[key], np.ndarray):
                assert x[key].dtype == y[key].dtype
                np.testing.assert_array_equal(x[key], y[key])
            else:
                assert x[key] == y[key], (i, key)


# ------------------------------------------------------------------------------------------
# Web TFRecord shards.


def test_web_shards_from_a_bucket(web_fixture, mirror):
    local, remote = mirror
    copy_tree(local, f"{remote}/shards")
    on_disk = WebShardsImageTextSource(f"{local}/*.tfrecord")
    # Every way of naming the shards expands to the same sorted list.
    expected = [f"{remote}/shards/00000.tfrecord", f"{remote}/shards/00001.tfrecord"]
    for spec in (
        f"{remote}/shards",
        f"{remote}/shards/*.tfrecord",
        f"{remote}/shards/{{00000..00001}}.tfrecord",
        expected[::-1],
    ):
        assert expand_shards(spec) == expected
    for workers in (1, 2):
        in_bucket = WebShardsImageTextSource(f"{remote}/shards", num_workers=workers)
        assert in_bucket.files == expected
        assert in_bucket.shard_sizes == on_disk.shard_sizes == [3, 2]
        assert_same_examples(on_disk, in_bucket)
        assert in_bucket.undecodable_captions == on_disk.undecodable_captions == 1
    assert in_bucket[1]["caption"] == NON_ASCII
    for name in ("00000.tfrecord", "00001.tfrecord"):
        np.testing.assert_array_equal(
            index_tfrecord(f"{remote}/shards/{name}"), index_tfrecord(f"{local}/{name}")
        )


def test_web_shard_errors_name_the_url(web_fixture, mirror):
    local, remote = mirror
    copy_tree(local, remote)
    cases = [
        (lambda r: expand_shards(f"{r}/nothing-*.tfrecord"), FileNotFoundError, "nothing-"),
        (lambda r: expand_shards(f"{r}/{{00000..00002}}.tfrecord"), FileNotFoundError, "00002"),
        (lambda r: expand_shards([f"{r}/00000.tfrecord", f"{r}/gone.tfrecord"]), FileNotFoundError, "gone"),
        (lambda r: index_tfrecord(f"{r}/gone.tfrecord"), FileNotFoundError, "gone.tfrecord"),
    ]  # fmt: skip
    for make, error, culprit in cases:
        assert culprit in same_error(make, local, remote, error)
    # A truncated shard: the message names the file and where the framing breaks.
    raw = paths.read_bytes(f"{remote}/00000.tfrecord")
    for root in (local, remote):
        paths.write_bytes(f"{root}/cut/cut.tfrecord", raw[:-5])
    assert "past the end" in same_error(
        lambda r: index_tfrecord(f"{r}/cut/cut.tfrecord"), local, remote, ValueError
    )
    # An object store has no folders to walk: wildcards above the file name are refused.
    with pytest.raises(ValueError, match="last path component"):
        expand_shards(f"{remote}/*/00000.tfrecord")
    # A shard gone after indexing: the example is unusable, naming shard and record.
    source = WebShardsImageTextSource(f"{remote}/00001.tfrecord")
    paths.remove(f"{remote}/00001.tfrecord")
    with pytest.raises(CorruptImageError, match=f"{remote}/00001.tfrecord record 1"):
        source[1]


# ------------------------------------------------------------------------------------------
# COCO-format detection.


def test_coco_detection_from_a_bucket(coco_fixture, mirror):
    path, image_dir, _, arrays = coco_fixture
    local, remote = mirror
    copy_tree(local, remote)
    on_disk = CocoDetectionSource(path, image_dir)
    in_bucket = CocoDetectionSource(f"{remote}/instances_val2017.json", f"{remote}/val2017")
    assert in_bucket.image_ids == on_disk.image_ids == [7, 19, 42]
    assert in_bucket.categories == on_disk.categories
    assert in_bucket.ground_truth() == on_disk.ground_truth()
    assert_same_examples(on_disk, in_bucket)
    np.testing.assert_array_equal(in_bucket[0]["image"], arrays[7])
    assert in_bucket.image_path(2) == f"{remote}/val2017/000000000042.png"

    def source(root, json_name="instances_val2017.json", images="val2017"):
        return CocoDetectionSource(f"{root}/{json_name}", f"{root}/{images}")

    assert "missing.json" in same_error(
        lambda r: source(r, json_name="missing.json"), local, remote, FileNotFoundError
    )
    assert "no_images" in same_error(
        lambda r: source(r, images="no_images"), local, remote, FileNotFoundError
    )
    for root in (local, remote):
        paths.write_text(f"{root}/broken.json", '{"images": [')
    assert "not valid JSON" in same_error(
        lambda r: source(r, json_name="broken.json"), local, remote, ValueError
    )
    for root in (local, remote):
        paths.remove(f"{root}/val2017/000000000042.png")
    assert "000000000042.png" in same_error(
        lambda r: source(r)[2], local, remote, CorruptImageError
    )


def test_lvis_image_lookup_in_a_bucket(lvis_fixture, mirror):
    path, root, _, _ = lvis_fixture
    local, remote = mirror
    copy_tree(local, remote)
    on_disk = LvisDetectionSource(path, root)
    in_bucket = LvisDetectionSource(f"{remote}/lvis_v1_val.json", f"{remote}/coco")
    # "train2017/x.jpg" from coco_url is found under the COCO root, in a bucket as on disk.
    assert in_bucket.image_path(0) == f"{remote}/coco/train2017/000000000001.jpg"
    assert in_bucket.ground_truth() == on_disk.ground_truth()
    assert_same_examples(on_disk, in_bucket)
    assert in_bucket.federated(1) == on_disk.federated(1)


# ------------------------------------------------------------------------------------------
# Captions: Karpathy split and COCO captions.


def test_karpathy_from_a_bucket(karpathy_fixture, mirror):
    path, image_dir, _ = karpathy_fixture
    local, remote = mirror
    copy_tree(local, remote)
    for grouped in (False, True):
        on_disk = KarpathyCaptionsSource(path, image_dir, split="test", grouped=grouped)
        in_bucket = KarpathyCaptionsSource(
            f"{remote}/dataset_flickr30k.json", f"{remote}/flickr30k-images", grouped=grouped
        )
        assert in_bucket.captions() == on_disk.captions()
        np.testing.assert_array_equal(in_bucket.retrieval_groups(), on_disk.retrieval_groups())
        assert_same_examples(on_disk, in_bucket)
    assert "missing.json" in same_error(
        lambda r: KarpathyCaptionsSource(f"{r}/missing.json", f"{r}/flickr30k-images"),
        local,
        remote,
        FileNotFoundError,
    )
    for root in (local, remote):
        paths.remove(f"{root}/flickr30k-images/50.jpg")
    assert "50.jpg" in same_error(
        lambda r: KarpathyCaptionsSource(f"{r}/dataset_flickr30k.json", f"{r}/flickr30k-images")[5],
        local,
        remote,
        CorruptImageError,
    )


def test_coco_captions_from_a_bucket(mirror):
    local, remote = mirror
    for i in (5, 9):
        save(os.path.join(local, "train2017", f"{i}.jpg"), drawn_image(10, 12, i), "JPEG")
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in (9, 5)],
        "annotations": [
            {"id": 1, "image_id": 9, "caption": "A dog on grass."},
            {"id": 2, "image_id": 5, "caption": NON_ASCII},
            {"id": 3, "image_id": 9, "caption": " Two dogs. "},
        ],
    }
    with open(os.path.join(local, "captions.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    copy_tree(local, remote)

    def source(root):
        return CocoCaptionsSource(f"{root}/captions.json", f"{root}/train2017", all_captions=True)

    assert_same_examples(source(local), source(remote))
    assert source(remote).captions() == [NON_ASCII, "A dog on grass.", "Two dogs."]
    for root in (local, remote):
        paths.remove(f"{root}/train2017/9.jpg")
    assert "9.jpg" in same_error(lambda r: source(r)[1], local, remote, CorruptImageError)


# ------------------------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_trained_into_and_loaded_from_a_bucket(mirror):
    from rovit_jax.data.settings import ImageTextDataSettings
    from rovit_jax.data.sources import text_tokenizer
    from rovit_jax.pretrain_settings import TokenizerSettings

    local, remote = mirror
    corpus = [f"a {c} {s} on a plain background" for c in ("red", "blue") for s in ("disc", "box")]
    model = tk.train_sentencepiece(corpus * 10, f"{remote}/spm/caps", vocab_size=64)
    assert model == f"{remote}/spm/caps.model"
    assert paths.listdir(f"{remote}/spm") == ["caps.model", "caps.vocab"]
    with open(os.path.join(local, "caps.model"), "wb") as f:
        f.write(paths.read_bytes(model))
    on_disk = tk.SentencePieceTokenizer(os.path.join(local, "caps.model"), max_len=8)
    in_bucket = tk.SentencePieceTokenizer(model, max_len=8)
    texts = ["A red disc on a plain background", "two BLUE boxes", ""]
    np.testing.assert_array_equal(in_bucket.encode(texts), on_disk.encode(texts))
    assert in_bucket.vocab_size == on_disk.vocab_size
    assert "gone.model" in same_error(
        lambda r: tk.SentencePieceTokenizer(f"{r}/gone.model", max_len=8),
        local,
        remote,
        FileNotFoundError,
    )

    def from_config(model_path):
        settings = {
            "data": ImageTextDataSettings(name="web_shards", train_files="unused"),
            "tokenizer": TokenizerSettings(model_path=model_path, max_len=8, vocab_size=64),
        }
        return text_tokenizer(settings)

    np.testing.assert_array_equal(from_config(model).encode(texts), on_disk.encode(texts))
    with pytest.raises(FileNotFoundError, match=f"tokenizer.model_path`: no file {remote}/x"):
        from_config(f"{remote}/x.model")


# ------------------------------------------------------------------------------------------
# The dataset checker CLI.


def cli_fields(capsys, *argv) -> tuple[int, dict[str, str], str]:
    code = data_cli(["check", *argv])
    out, err = capsys.readouterr()
    return code, dict(line.split(": ", 1) for line in out.splitlines() if ": " in line), err


def test_data_cli_reads_and_renders_to_a_bucket(coco_fixture, mirror, capsys):
    local, remote = mirror
    copy_tree(local, f"{remote}/in")
    results = {}
    for root, data in ((local, local), (remote, f"{remote}/in")):
        code, fields, err = cli_fields(
            capsys, "--format", "coco", "--annotations", f"{data}/instances_val2017.json",
            "--images", f"{data}/val2017", "--render", "3", "--out", f"{root}/out",
        )  # fmt: skip
        assert code == 0, err
        rendered = fields.pop("rendered")
        assert rendered == f"3 -> {root}/out"
        names = paths.listdir(f"{root}/out")
        results[root] = fields, {n: paths.read_bytes(f"{root}/out/{n}") for n in names}
    assert results[remote] == results[local]  # same counts, same PNG bytes
    assert len(results[remote][1]) == 3
    code, _, err = cli_fields(
        capsys, "--format", "coco", "--annotations", f"{remote}/in/missing.json",
        "--images", f"{remote}/in/val2017",
    )  # fmt: skip
    assert code == 2 and f"{remote}/in/missing.json" in err
