"""The paper's recipe configs run one small training and one evaluation on real-format files.

The test writes, in the datasets' own formats: img2dataset TFRecord shards, a Karpathy split
JSON, a COCO captions JSON, COCO instances / LVIS v1 / Objects365 JSONs with JPEG images, and a
SentencePiece model; then pretrains with `configs/vit_b16_224_pretrain.py:small` and finetunes /
evaluates with `lvis_detect.py`, `ov_coco_detect.py` and `objects365_transfer.py` in their small
modes on those files.
"""

import json
import math
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageDraw

from rovit_jax.config_files import load_config
from rovit_jax.data.categories import COCO_CATEGORIES
from rovit_jax.tasks import get_task
from rovit_jax.train.checkpoint import load_params
from rovit_jax.train.loop import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 225), "green": (40, 170, 60)}
NUM_IMAGES = 8


def _config(name: str, arg: str):
    return load_config(f"{name}:{arg}" if arg else name)


def _draw(rng, width: int, height: int):
    """A JPEG-able image with 1-3 filled rectangles; returns (image, [(colour, xywh)])."""
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(90, 160, 3)))
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        w, h = int(rng.integers(12, width // 2)), int(rng.integers(12, height // 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[colour])
        objects.append((colour, [float(x), float(y), float(w), float(h)]))
    return image, objects


def _polygon(xywh):
    x, y, w, h = xywh
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Writes every fixture dataset once; returns a dict of paths."""
    import tensorflow as tf

    from rovit_jax.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("real_formats")
    rng = np.random.default_rng(0)
    images_dir = root / "coco" / "val2017"
    images_dir.mkdir(parents=True)
    o365_dir = root / "objects365" / "patch0"
    o365_dir.mkdir(parents=True)
    captions, drawn = [], []
    for i in range(NUM_IMAGES):
        image, objects = _draw(rng, 80, 64)
        image.save(images_dir / f"{i + 1:012d}.jpg", quality=95)
        image.save(o365_dir / f"obj365_{i + 1}.jpg", quality=95)
        words = " and ".join(f"a {c} box" for c, _ in objects)
        captions.append(words)
        drawn.append(objects)

    # Web shards (img2dataset's TFRecord layout: "jpg", "txt", "key").
    shards = root / "shards"
    shards.mkdir()
    for s in range(2):
        with tf.io.TFRecordWriter(str(shards / f"{s:05d}.tfrecord")) as writer:
            for i in range(s, NUM_IMAGES, 2):
                blob = (images_dir / f"{i + 1:012d}.jpg").read_bytes()
                feature = {
                    "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[blob])),
                    "txt": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[captions[i].encode()])
                    ),
                    "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"%05d" % i])),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())

    # Karpathy split JSON (two sentences per image) and COCO captions JSON.
    karpathy = {
        "dataset": "flickr30k",
        "images": [
            {
                "imgid": i,
                "filename": f"{i + 1:012d}.jpg",
                "split": "test",
                "sentences": [{"raw": captions[i]}, {"raw": f"a photo: {captions[i]}"}],
            }
            for i in range(NUM_IMAGES)
        ],
    }
    (root / "karpathy.json").write_text(json.dumps(karpathy))
    coco_images = [
        {"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 80, "height": 64}
        for i in range(NUM_IMAGES)
    ]
    coco_captions = {
        "images": coco_images,
        "annotations": [
            {"id": 2 * i + k, "image_id": i + 1, "caption": c}
            for i in range(NUM_IMAGES)
            for k, c in enumerate([captions[i], f"there is {captions[i]}"])
        ],
    }
    (root / "captions.json").write_text(json.dumps(coco_captions))

    # Detection: red -> "person" (OV-COCO base), blue -> "bus" (novel), green -> "car" (base).
    coco_id = {"red": 1, "blue": 6, "green": 3}
    annotations = []
    for i, objects in enumerate(drawn):
        for colour, xywh in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": coco_id[colour],
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": 0,
                    "segmentation": _polygon(xywh),
                }
            )
    coco = {
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name} for cid, name in COCO_CATEGORIES],
    }
    (root / "instances.json").write_text(json.dumps(coco))

    lvis_id = {"red": 1, "green": 2, "blue": 3}
    lvis = {
        "images": [
            dict(
                im,
                coco_url=f"http://images.cocodataset.org/val2017/{im['file_name']}",
                neg_category_ids=[c for c in (1, 2, 3) if c not in {lvis_id[o] for o, _ in objs}],
                not_exhaustive_category_ids=[],
            )
            for im, objs in zip(coco_images, drawn)
        ],
        "annotations": [
            dict(a, category_id=lvis_id[c]) for a, c in zip(annotations, _colours(drawn))
        ],
        "categories": [
            {"id": 1, "name": "red_box", "frequency": "f"},
            {"id": 2, "name": "green_box", "frequency": "c"},
            {"id": 3, "name": "blue_box", "frequency": "r"},
        ],
    }
    (root / "lvis.json").write_text(json.dumps(lvis))

    o365 = {
        "images": [
            dict(im, file_name=f"images/v1/patch0/obj365_{im['id']}.jpg") for im in coco_images
        ],
        "annotations": [
            {k: v for k, v in dict(a, category_id=lvis_id[c]).items() if k != "segmentation"}
            for a, c in zip(annotations, _colours(drawn))
        ],
        "categories": [
            {"id": 1, "name": "red box"},
            {"id": 2, "name": "green box"},
            {"id": 3, "name": "blue box"},
        ],
    }
    (root / "objects365.json").write_text(json.dumps(o365))

    spm = train_sentencepiece(
        captions + [f"a photo: {c}" for c in captions] + ["there is a photo of one red box."],
        str(root / "spm"),
        vocab_size=64,
    )
    return {
        "root": root,
        "shards": str(shards),
        "karpathy": str(root / "karpathy.json"),
        "captions": str(root / "captions.json"),
        "coco_root": str(root / "coco"),
        "coco_images": str(images_dir),
        "instances": str(root / "instances.json"),
        "lvis": str(root / "lvis.json"),
        "objects365": str(root / "objects365.json"),
        "objects365_images": str(root / "objects365"),
        "spm": spm,
        "drawn": drawn,
    }


def _colours(drawn):
    return [c for objects in drawn for c, _ in objects]


def _pretrain_config(files, data: str):
    c = _config("vit_b16_224_pretrain", f"data={data},small")
    c.tokenizer.model_path = files["spm"]
    c.data.train_split = "test"
    c.data.eval_split = "test"
    if data == "web_shards":
        c.data.train_files = files["shards"]
        c.data.eval.name = "karpathy"
        c.data.eval.annotations = files["karpathy"]
        c.data.eval.images = files["coco_images"]
    else:
        c.data.annotations = files["captions"]
        c.data.images = files["coco_images"]
    return c


@pytest.fixture(scope="module")
def pretrained(files):
    """A `small` pretraining run on the web shards, evaluated on the Karpathy JSON."""
    workdir = str(files["root"] / "pretrain")
    config = _pretrain_config(files, "web_shards")
    result = run(config, workdir, get_task(config, workdir))
    return workdir, result


def test_pretrain_recipe_on_web_shards_with_karpathy_retrieval(pretrained):
    workdir, result = pretrained
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    metrics = result["eval"]
    # 8 images, 2 captions each: every caption ranked against every image.
    assert metrics["num_images"] == NUM_IMAGES and metrics["num_pairs"] == 2 * NUM_IMAGES
    # Recalls are counts over the 8 images and the 16 captions (no padding rows counted).
    for key, n in (("i2t_recall@1", NUM_IMAGES), ("t2i_recall@1", 2 * NUM_IMAGES)):
        hits = metrics[key] * n
        assert 0 <= hits <= n and abs(hits - round(hits)) < 1e-6, (key, metrics[key])


def test_pretrain_recipe_on_coco_captions(files, tmp_path):
    config = _pretrain_config(files, "coco_captions")
    result = run(config, str(tmp_path), get_task(config, str(tmp_path)))
    assert result["eval"]["num_images"] == NUM_IMAGES
    assert result["eval"]["num_pairs"] == 2 * NUM_IMAGES


def _detect_config(name: str, files, pretrain_workdir: str):
    c = _config(name, "small")
    c.init.pretrain_workdir = pretrain_workdir
    c.mesh = [("data", 8), ("fsdp", 1)]
    c.batch_size = 8
    c.eval.batch_size = 8
    return c


def _lvis_config(files, pretrain_workdir: str):
    c = _detect_config("lvis_detect", files, pretrain_workdir)
    c.data.train_annotations = c.data.eval_annotations = files["lvis"]
    c.data.train_images = c.data.eval_images = files["coco_root"]
    return c


@pytest.fixture(scope="module")
def lvis_run(files, pretrained):
    """The `small` LVIS recipe trained and evaluated once: (workdir, task, result)."""
    workdir = str(files["root"] / "lvis")
    c = _lvis_config(files, pretrained[0])
    task = get_task(c, workdir)
    return workdir, task, run(c, workdir, task)


def test_lvis_recipe_trains_and_evaluates_federated(lvis_run):
    workdir, task, result = lvis_run
    # base = f + c (red, green), novel = r (blue): the training vocabulary has exactly 2 names.
    assert sorted(task.base_vocabulary["category_map"]) == [1, 2]
    assert task.full_vocabulary["is_novel"][:3].tolist() == [False, False, True]
    m = result["eval"]
    for variant in ("fused", "detector_only"):
        # Every group has ground truth in the evaluated images, so no AP is undefined (-1).
        for key in ("bbox/AP", "bbox/APr", "bbox/AP_base", "segm/AP"):
            value = m[f"{variant}/{key}"]
            assert 0.0 <= value <= 1.0, (key, value)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    with open(os.path.join(workdir, "detections_fused.json")) as f:
        written = json.load(f)
    assert written["metrics"]["fused/bbox/AP"] == m["fused/bbox/AP"]


def test_ov_coco_recipe_reports_novel_ap50(files, pretrained, tmp_path):
    c = _detect_config("ov_coco_detect", files, pretrained[0])
    c.data.train_annotations = c.data.eval_annotations = files["instances"]
    c.data.train_images = c.data.eval_images = files["coco_images"]
    task = get_task(c, str(tmp_path))
    table = {cid: (name, f) for cid, name, f in task.table}
    assert len(table) == 65  # 48 base + 17 novel; the 15 others are dropped
    assert table[1][1] == "f" and table[3][1] == "f" and table[6][1] == "r"  # person, car, bus
    # Training maps only the 48 base categories; "bus" (novel) instances are dropped.
    assert len(task.base_vocabulary["category_map"]) == 48
    assert 6 not in task.base_vocabulary["category_map"]
    result = run(c, str(tmp_path), task)
    for variant in ("fused", "detector_only"):
        for key in ("bbox/AP50_novel", "bbox/AP_novel", "bbox/AP_base", "segm/AP"):
            value = result["eval"][f"{variant}/{key}"]
            assert value == -1.0 or 0.0 <= value <= 1.0, (key, value)


def test_objects365_transfer_evaluates_an_lvis_detector(files, pretrained, lvis_run, tmp_path):
    lvis_dir = lvis_run[0]

    t = _detect_config("objects365_transfer", files, pretrained[0])
    t.init.detector_workdir = lvis_dir
    t.data.eval_annotations = files["objects365"]
    t.data.eval_images = files["objects365_images"]
    workdir = str(tmp_path / "o365")
    task = get_task(t, workdir)
    result = run(t, workdir, task)
    # Evaluation only: no checkpoint written, the LVIS detector's parameters used unchanged.
    assert not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(
        os.path.join(workdir, "checkpoints")
    )
    lvis_params, _ = load_params(lvis_dir)
    same = [
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(lvis_params), jax.tree.leaves(result["state"]["params"]))
    ]
    assert all(same)
    m = result["eval"]
    assert "fused/bbox/AP" in m and "fused/segm/AP" not in m  # boxes only
    assert math.isfinite(m["fused/bbox/AP"])


def test_classifier_command_writes_lvis_and_coco_vocabularies(files, pretrained, tmp_path):
    from rovit_jax import classifier
    from rovit_jax.data import vocabularies

    for name, size, templates in (("lvis", 1203, "clip"), ("coco", 80, "vild")):
        prefix = str(tmp_path / name)
        argv = [f"--pretrain_workdir={pretrained[0]}", f"--vocabulary={name}"]
        argv += [f"--templates={templates}", f"--out={prefix}"]
        assert classifier.main(argv) == 0
        emb = np.load(prefix + ".npy")
        meta = json.loads(open(prefix + ".json").read())
        assert emb.shape[0] == size and meta["names"] == vocabularies.names(name)
        assert meta["ids"] == vocabularies.vocabulary(name).ids()
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Re-derive two LVIS rows: the normalised mean of the normalised template embeddings.
    from rovit_jax.data import sources
    from rovit_jax.detection.text_classifier import PROMPT_ENSEMBLES, clean_name

    pcfg = ml_collections.ConfigDict(
        json.loads(open(os.path.join(pretrained[0], "config.json")).read())
    )
    params, _ = load_params(pretrained[0])
    embed = classifier.make_text_embedder(pcfg, params, sources.tokenizer_for(pcfg))
    lvis = np.load(str(tmp_path / "lvis.npy"))
    for k in (0, 1202):
        name = clean_name(vocabularies.names("lvis")[k])
        z = embed([t.format(name) for t in PROMPT_ENSEMBLES["clip"]])
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        mean = z.mean(0)
        np.testing.assert_allclose(lvis[k], mean / np.linalg.norm(mean), atol=1e-5)


def test_saved_classifier_is_used_and_checked(files, pretrained, tmp_path):
    from rovit_jax import classifier

    prefix = str(tmp_path / "fixture_lvis")
    table = classifier.read_vocabulary(files["lvis"])
    emb, meta = classifier.compute(pretrained[0], table, "vild")
    classifier.save_classifier(prefix, emb, meta)
    c = _lvis_config(files, pretrained[0])
    c.text.classifier = prefix
    vocab = get_task(c, str(tmp_path / "a")).full_vocabulary
    np.testing.assert_array_equal(vocab["embeddings"][:3], emb)
    assert vocab["valid"].tolist()[:4] == [True, True, True, False]
    # A classifier of another vocabulary is refused, naming the config key.
    other = str(tmp_path / "coco")
    assert (
        classifier.main(
            [
                f"--pretrain_workdir={pretrained[0]}",
                "--vocabulary=coco",
                "--templates=single",
                f"--out={other}",
            ]
        )
        == 0
    )
    c.text.classifier = other
    with pytest.raises(ValueError, match="text.classifier"):
        _ = get_task(c, str(tmp_path / "b")).full_vocabulary
    # Missing files and unknown vocabularies: exit code 2, no traceback.
    assert (
        classifier.main(
            [f"--pretrain_workdir={pretrained[0]}", "--vocabulary=nope", f"--out={other}"]
        )
        == 2
    )
