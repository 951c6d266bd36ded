"""Predictor (images + free-text queries -> detections, embeddings, retrieval) and the predict CLI.

The run is a tiny shapes detection workdir (configs/shapes_detect.py:tiny) with its pretraining
run, as training leaves them; see `build_tiny_detector_run`.
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERIES = ["red circle", "blue star"]


@pytest.fixture(scope="module")
def predictor(run_dir):
    from rovit_jax.inference import Predictor

    return Predictor.from_checkpoint(run_dir)


@pytest.fixture(scope="module")
def images(run_dir):
    """Two 64 px test scenes of the run's world and one 96 x 128 (H x W) scene."""
    from rovit_jax.data import shapes_tfds, shapes_world

    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    builder = shapes_tfds.shapes_builder(
        os.path.join(os.path.dirname(run_dir), "tfds"), **cfg.data.world
    )
    source = builder.as_data_source("test")
    scene = shapes_world.render_scene(np.random.default_rng(3), 128)["image"][:96]
    return [np.asarray(source[i]["image"]) for i in range(2)] + [np.ascontiguousarray(scene)]


class CompileCounter:
    """Counts XLA backend compiles (jax.monitoring), independently of the predictor's counter."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def _check_detections(det, image, queries, threshold):
    h, w = image.shape[:2]
    assert det.image_size == (h, w)
    n = len(det)
    assert det.boxes.shape == (n, 4) and det.scores.shape == (n,) and det.labels.shape == (n,)
    assert np.all(det.boxes >= 0)
    assert np.all(det.boxes[:, [0, 2]] <= h) and np.all(det.boxes[:, [1, 3]] <= w)
    assert np.all(det.boxes[:, 2] >= det.boxes[:, 0]) and np.all(det.boxes[:, 3] >= det.boxes[:, 1])
    assert np.all((det.labels >= 0) & (det.labels < len(queries)))
    assert det.names == [queries[i] for i in det.labels]
    assert np.all(det.scores >= threshold) and np.all(np.diff(det.scores) <= 0)
    assert det.masks.shape == (n, h, w) and det.masks.dtype == bool


def test_batch_predictions_are_valid_and_equal_one_by_one(predictor, images):
    batch = predictor.predict(images, QUERIES, score_threshold=0.0)
    assert isinstance(batch, list) and len(batch) == 3
    assert sum(len(d) for d in batch) > 0
    for det, image in zip(batch, images):
        _check_detections(det, image, QUERIES, 0.0)
        # Masks lie inside their (pixel-rounded) boxes.
        for box, mask in zip(det.boxes, det.masks):
            ys, xs = np.nonzero(mask)
            if len(ys):
                assert ys.min() >= np.floor(box[0]) and ys.max() < np.ceil(box[2]) + 1
                assert xs.min() >= np.floor(box[1]) and xs.max() < np.ceil(box[3]) + 1
    for det, image in zip(batch, images):
        one = predictor.predict(image, QUERIES, score_threshold=0.0)
        assert not isinstance(one, list)
        assert len(one) == len(det)
        np.testing.assert_array_equal(one.labels, det.labels)
        np.testing.assert_allclose(one.scores, det.scores, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(one.boxes, det.boxes, atol=1e-2)
        assert (one.masks != det.masks).mean() < 1e-3


def test_same_bucket_does_not_recompile(predictor, images):
    predictor.predict(images, QUERIES, score_threshold=0.5)  # batch bucket 4, vocabulary 16
    before = predictor.num_compiles
    with CompileCounter() as counter:
        # 4 images (same bucket as 3) and 3 queries (same vocabulary bucket as 2).
        out = predictor.predict(images + images[:1], QUERIES + ["green square"])
    assert len(out) == 4
    assert counter.count == 0
    assert predictor.num_compiles == before
    with CompileCounter() as counter:  # the counter does see a compile
        jax.jit(lambda x: x * 3 + 1)(np.arange(5.0))
    assert counter.count == 1


def test_boxes_are_in_original_pixels(predictor, images):
    small = images[0]
    big = np.asarray(Image.fromarray(small).resize((128, 128), Image.BILINEAR))
    a = predictor.predict(small, QUERIES, score_threshold=0.0, max_detections=5)
    b = predictor.predict(big, QUERIES, score_threshold=0.0, max_detections=5)
    assert len(a) == len(b) == 5
    assert b.masks.shape == (5, 128, 128) and a.masks.shape == (5, 64, 64)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(b.boxes, 2 * a.boxes, atol=2.0)


def test_max_detections_and_threshold(predictor, images):
    full = predictor.predict(images[2], QUERIES, score_threshold=0.0)
    top = predictor.predict(images[2], QUERIES, score_threshold=0.0, max_detections=3)
    assert len(top) == min(3, len(full))
    np.testing.assert_allclose(top.scores, full.scores[:3])
    cut = float(np.median(full.scores))
    high = predictor.predict(images[2], QUERIES, score_threshold=cut)
    assert len(high) == int((full.scores >= cut).sum())


def test_text_embeddings_match_the_task_embedder(predictor):
    from rovit_jax.detection.text_classifier import PROMPT_ENSEMBLES

    texts = ["red circle", "a photo of two blue stars.", "green"]
    emb = predictor.embed_texts(texts)
    assert emb.shape == (3, predictor.embed_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # The detection task's own embedder (its tokenizer built from the dataset, batch of 256).
    reference = predictor.task.text_embedder(texts)
    np.testing.assert_allclose(emb, reference, atol=2e-5)
    # Queries go through the run's prompt ensemble: mean of template embeddings, normalised.
    templates = PROMPT_ENSEMBLES[predictor.run.config.text.templates]
    clf = predictor.query_classifier(["Blue Star"])
    ref = predictor.task.text_embedder([t.format("blue star") for t in templates]).mean(0)
    np.testing.assert_allclose(clf["embeddings"][0], ref / np.linalg.norm(ref), atol=2e-5)
    assert clf["valid"].tolist() == [True] + [False] * (len(clf["valid"]) - 1)
    assert clf["is_novel"][0] == ("blue star" not in predictor.base_names)


def test_image_embeddings_and_retrieval(predictor, images, tmp_path):
    from rovit_jax.data.image_text import preprocess_image

    emb = predictor.embed_images(images)
    assert emb.shape == (3, predictor.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    size = int(predictor.run.pretrain_config.pp.image_size)
    pixels = np.stack(
        [preprocess_image(im, None, size=size, crop_scale=None, flip=False) for im in images]
    )
    model = predictor.two_tower
    embed = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.embed_images))
    ref = embed(predictor.run.pretrain_params, pixels)
    np.testing.assert_allclose(emb, np.asarray(ref), atol=2e-5)

    folder = tmp_path / "gallery"
    folder.mkdir()
    paths = []
    for i, im in enumerate(images + [images[0][:, ::-1]]):
        path = folder / f"img{i}.png"
        Image.fromarray(np.ascontiguousarray(im)).save(path)
        paths.append(str(path))
    (folder / "notes.txt").write_text("not an image")
    top = predictor.retrieve(str(folder), "red circle", k=3)
    assert len(top) == 3
    assert all(p in paths for p, _ in top) and len({p for p, _ in top}) == 3
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True)
    sims = predictor.embed_images(paths) @ predictor.embed_texts(["red circle"])[0]
    np.testing.assert_allclose(scores, np.sort(sims)[::-1][:3], atol=1e-5)
    assert predictor.retrieve(paths[:2], "red circle", k=5)[0][0] in paths[:2]

    # Cached per file: a second query embeds no image; a changed file is embedded again.
    before = predictor.images_embedded
    predictor.retrieve(str(folder), "blue star", k=2)
    assert predictor.images_embedded == before
    Image.fromarray(images[1]).save(paths[0])
    os.utime(paths[0], ns=(1, 1))
    new = dict(predictor.retrieve(str(folder), "blue star", k=4))
    assert predictor.images_embedded == before + 1
    expected = predictor.embed_images(images[1]) @ predictor.embed_texts(["blue star"])[0]
    np.testing.assert_allclose(new[paths[0]], expected[0], atol=1e-5)


def test_bad_inputs_have_clear_messages(predictor, images, run_dir, tmp_path):
    from rovit_jax.inference import CheckpointKindError, ImageError, Predictor

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageError, match="broken.png"):
        predictor.predict(str(broken), QUERIES)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        predictor.predict([images[0], str(tmp_path / "missing.jpg")], QUERIES)
    with pytest.raises(ImageError, match="uint8"):
        predictor.predict(images[0].astype(np.float32), QUERIES)
    with pytest.raises(ValueError, match="at least one query"):
        predictor.predict(images[0], [])
    with pytest.raises(ValueError, match="list of strings"):
        predictor.predict(images[0], "red circle")
    long_query = " ".join(["red circle"] * 20)
    with pytest.raises(
        ValueError, match=r"(?s)red circle red circle.*at most 32 tokens.*truncated"
    ):
        predictor.predict(images[0], ["star", long_query])
    with pytest.raises(ValueError, match="at most 32 tokens"):
        predictor.embed_texts([long_query])

    # A pretraining run embeds and retrieves, but does not detect.
    pretrained = Predictor.from_checkpoint(os.path.join(run_dir, "pretrain"))
    assert pretrained.kind == "pretrain"
    np.testing.assert_allclose(
        pretrained.embed_texts(["red circle"]), predictor.embed_texts(["red circle"]), atol=1e-6
    )
    with pytest.raises(CheckpointKindError, match="pretraining checkpoint.*detector run"):
        pretrained.predict(images[0], QUERIES)

    with pytest.raises(CheckpointKindError, match="not a training run"):
        Predictor.from_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Predictor.from_checkpoint(str(tmp_path / "nowhere"))
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "config.json").write_text(json.dumps({"task": "pretrain"}))
    with pytest.raises(FileNotFoundError, match="no usable checkpoint"):
        Predictor.from_checkpoint(str(empty_run))


def test_the_attention_kernel_is_a_load_option(run_dir, predictor):
    """`attention` (exports pass "einsum") reaches the towers, the detector's backbone and the
    frozen towers of score fusion, and changes no value."""
    from rovit_jax.inference import Predictor

    xla = Predictor.from_checkpoint(run_dir, attention="xla")
    assert xla.two_tower.text["attention"] == xla.two_tower.image["attention"] == "xla"
    assert xla.task.model.backbone["attention"] == "xla"
    assert xla.task.frozen_vlm.two_tower.image["attention"] == "xla"
    assert predictor.task.model.backbone["attention"] == "auto"  # the run's setting
    np.testing.assert_allclose(
        xla.embed_texts(QUERIES), predictor.embed_texts(QUERIES), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="attention must be one of"):
        Predictor.from_checkpoint(run_dir, attention="flash")


def _scene(path, seed=5):
    from rovit_jax.data import shapes_world

    image = shapes_world.render_scene(np.random.default_rng(seed), 128)["image"]
    Image.fromarray(image).save(path)
    return image


def test_cli_writes_png_and_json(run_dir, predictor, tmp_path, monkeypatch):
    from pycocotools import mask as mask_utils

    from rovit_jax import predict
    from rovit_jax.inference import Predictor

    # The command's own loading is exercised by the bad-input tests below; here it reuses the
    # loaded run (and its compiled batch buckets) to keep the test fast.
    loaded = []

    def from_checkpoint(cls, workdir, **kwargs):
        loaded.append((workdir, kwargs))
        return predictor

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(from_checkpoint))
    image = _scene(tmp_path / "scene.png")
    # The three best detections (a drawing of every one of the tiny detector's detections could
    # cover the whole image, and the check below that most of it is not repainted would fail).
    threshold = float(predictor.predict(image, QUERIES, score_threshold=0.0).scores[2])
    out, js = tmp_path / "out.png", tmp_path / "out.json"
    argv = ["--checkpoint", run_dir, "--image", str(tmp_path / "scene.png"), "--out", str(out)]
    argv += ["--query", QUERIES[0], "--query", QUERIES[1], "--json", str(js)]
    argv += ["--threshold", repr(threshold)]
    assert predict.main(argv) == 0
    assert loaded == [(run_dir, dict(step=None, fusion=True, image_size=None))]
    record = json.loads(js.read_text())["images"][0]
    expected = predictor.predict(image, QUERIES, score_threshold=threshold)
    assert 1 <= len(expected) <= 3
    assert record["image"] == str(tmp_path / "scene.png") and len(record["scores"]) == len(expected)
    np.testing.assert_allclose(record["boxes"], expected.boxes, atol=1e-2)
    np.testing.assert_allclose(record["scores"], expected.scores, rtol=1e-4, atol=1e-6)
    assert record["labels"] == expected.labels.tolist() and record["names"] == expected.names
    for rle, mask in zip(record["masks"], expected.masks):
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)

    # The drawing: the input at 4x (512 px), changed along the best box's top edge.
    drawn = np.asarray(Image.open(out).convert("RGB"))
    plain = np.asarray(Image.fromarray(image).resize((512, 512), Image.NEAREST))
    assert drawn.shape == plain.shape
    y0, x0, y1, x1 = (4 * expected.boxes[0]).round().astype(int)
    edge = (slice(min(y0, 511), min(y0, 511) + 1), slice(x0, max(x1, x0 + 1)))
    assert (np.abs(drawn[edge].astype(int) - plain[edge]).sum(-1) > 0).mean() > 0.9
    assert (np.abs(drawn.astype(int) - plain).sum(-1) == 0).mean() > 0.2  # not repainted

    # A folder (and another image): one PNG per image in --out, one JSON for all.
    folder = tmp_path / "folder"
    folder.mkdir()
    _scene(folder / "a.png", 6)
    _scene(folder / "b.png", 7)
    argv = ["--checkpoint", run_dir, "--image", str(folder), "--image", str(tmp_path / "scene.png")]
    argv += ["--query", "star", "--out", str(tmp_path / "many"), "--json", str(tmp_path / "m.json")]
    assert predict.main(argv) == 0
    assert sorted(os.listdir(tmp_path / "many")) == ["a.png", "b.png", "scene.png"]
    assert len(json.loads((tmp_path / "m.json").read_text())["images"]) == 3


def test_cli_bad_input_exits_2_with_one_line(run_dir, tmp_path):
    from rovit_jax import predict

    image = tmp_path / "scene.png"
    _scene(image)
    cmd = [sys.executable, "-m", "rovit_jax.predict", "--checkpoint", run_dir]
    cmd += [
        "--image",
        str(tmp_path / "missing.png"),
        "--query",
        "star",
        "--out",
        str(tmp_path / "o.png"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: image file or folder not found: {tmp_path / 'missing.png'}"
    )

    base = ["--image", str(image), "--out", str(tmp_path / "o.png")]
    long_query = " ".join(["blue star"] * 20)
    assert predict.main(["--checkpoint", run_dir, "--query", long_query] + base) == 2
    assert (
        predict.main(["--checkpoint", os.path.join(run_dir, "pretrain"), "--query", "x"] + base)
        == 2
    )
    assert predict.main(["--checkpoint", str(tmp_path), "--query", "x"] + base) == 2
    assert not (tmp_path / "o.png").exists()


def test_init_pretrain_step_picks_the_pretraining_checkpoint(run_dir, tmp_path):
    """`init.pretrain_step` names the pretraining checkpoint a detector starts from; the loaded
    run (what Predictor fuses with) reads that checkpoint too, not the pretraining run's latest."""
    import shutil

    from conftest import _save_run

    from rovit_jax.runs import load_run, read_run_config
    from rovit_jax.tasks.detect import DetectTask
    from rovit_jax.train.checkpoint import load_params

    det = tmp_path / "det"
    shutil.copytree(run_dir, det)
    pretrain = det / "pretrain"
    first, first_step = load_params(str(pretrain))
    later = jax.tree.map(lambda x: np.asarray(x) + 1.0, first)
    _save_run(str(pretrain), read_run_config(str(pretrain)), later, first_step + 8)

    def leaves_equal(a, b):
        return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))

    assert leaves_equal(load_run(str(det)).pretrain_params, later)  # default: the latest
    config = read_run_config(str(det))
    config.init.pretrain_step = first_step
    config.init.pretrain_workdir = str(pretrain)
    with open(det / "config.json", "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    loaded = load_run(str(det))
    assert loaded.pretrain_step == first_step and leaves_equal(loaded.pretrain_params, first)
    config.init.run_pretraining = False
    task = DetectTask(ml_collections.ConfigDict(config.to_dict()), str(det), check_files=False)
    assert leaves_equal(task.pretrained.params, first)
