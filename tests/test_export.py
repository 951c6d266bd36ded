"""Detector export: the TF SavedModel (jax2tf) and the jax.export artifact agree with the predictor."""

import json
import os
import unicodedata

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERIES = ["purple thing", "red thing"]  # not training category names: scored as novel everywhere


@pytest.fixture(scope="module")
def predictor(run_dir):
    from rovit_jax.inference import Predictor

    p = Predictor.from_checkpoint(run_dir)
    assert not any(q in p.base_names for q in QUERIES) and len(p.base_names) > 0
    return p


@pytest.fixture(scope="module")
def images():
    """Three scenes of different sizes (64 x 64, 128 x 128, 96 x 128)."""
    from rovit_jax.data import shapes_world

    scenes = [
        shapes_world.render_scene(np.random.default_rng(s), n)["image"]
        for s, n in ((1, 64), (2, 128), (3, 128))
    ]
    scenes[2] = np.ascontiguousarray(scenes[2][:96])
    return scenes


@pytest.fixture(scope="module")
def inputs(predictor, images):
    """Serving inputs: 4 canvases (3 images + one blank, the predictor's batch bucket)."""
    from rovit_jax.data.detection_input import eval_detection_batches

    source = [{"image": im, "image_id": i} for i, im in enumerate(images)]
    (batch,) = eval_detection_batches(source, batch_size=4, image_size=predictor.image_size)
    clf = predictor.query_classifier(QUERIES)
    assert clf["embeddings"].shape[0] == 16 and clf["is_novel"][:2].all()
    return dict(
        images=batch["image"],
        info=batch["image_info"],
        text_embeddings=clf["embeddings"],
        text_valid=clf["valid"],
    )


@pytest.fixture(scope="module")
def reference(predictor, images):
    return predictor.predict(images, QUERIES, score_threshold=0.0, max_detections=1000)


def _original(out, info, j):
    """Image j of serving outputs -> (boxes in original pixels, scores, classes, masks), by score."""
    h, w, scale = (float(v) for v in info[j][:3])
    keep = np.flatnonzero(np.asarray(out["valid"][j]))
    keep = keep[np.argsort(-np.asarray(out["scores"][j])[keep], kind="stable")]
    boxes = np.asarray(out["boxes"][j], np.float64)[keep] / scale
    boxes = np.clip(boxes, 0, [h, w, h, w])
    return boxes, np.asarray(out["scores"][j])[keep], np.asarray(out["classes"][j])[keep], keep


def _assert_same_detections(out, info, reference):
    from rovit_jax.detection.postprocess import paste_masks

    for j, det in enumerate(reference):
        boxes, scores, classes, keep = _original(out, info, j)
        assert len(scores) == len(det) > 0
        np.testing.assert_array_equal(classes, det.labels)
        np.testing.assert_allclose(scores, det.scores, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(boxes, det.boxes, rtol=1e-4, atol=1e-3)
        h, w = det.image_size
        masks = paste_masks(np.asarray(out["masks"][j])[keep], boxes, h, w)
        assert (masks != det.masks).mean() < 1e-3


def _tokenize(sp_model: str, meta: dict, texts: list[str]) -> np.ndarray:
    """Tokens by the conventions the export's JSON states, with sentencepiece itself."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    out = np.full((len(texts), meta["max_len"]), meta["pad_id"], np.int32)
    for i, text in enumerate(texts):
        ids = [meta["bos_id"]] + sp.encode(unicodedata.normalize("NFKC", text).lower())
        out[i, : len(ids)] = ids[: meta["max_len"]]
    return out


def test_saved_model_matches_the_predictor(run_dir, predictor, inputs, reference, tmp_path):
    import tensorflow as tf

    from rovit_jax.export import export_saved_model

    out_dir = str(tmp_path / "saved_model")
    meta = export_saved_model(run_dir, out_dir, max_queries=16)
    model = tf.saved_model.load(out_dir)
    serve = model.signatures["serving_default"]
    out = serve(
        images=tf.constant(inputs["images"][:3]),  # any batch size: 3 here
        text_embeddings=tf.constant(inputs["text_embeddings"]),
        text_valid=tf.constant(inputs["text_valid"]),
    )
    out = {k: v.numpy() for k, v in out.items()}
    assert out["boxes"].shape == (3, int(predictor.run.config.infer.max_detections), 4)
    assert out["masks"].shape[2:] == (28, 28)
    _assert_same_detections(out, inputs["info"], reference)

    # Beside it: what users need to embed queries without JAX.
    with open(os.path.join(out_dir, "rovit_export.json")) as f:
        assert json.load(f) == json.loads(json.dumps(meta))
    text = meta["text"]
    assert len(text["vocabulary"]) == predictor.tokenizer.vocab_size
    assert meta["inputs"]["images"]["shape"] == [
        "batch",
        predictor.image_size,
        predictor.image_size,
        3,
    ]
    tokens = _tokenize(os.path.join(out_dir, text["sentencepiece_model"]), text, QUERIES)
    emb = model.signatures["embed_text"](tokens=tf.constant(tokens))["embeddings"].numpy()
    np.testing.assert_allclose(emb, predictor.embed_texts(QUERIES), atol=1e-5)


def test_jax_export_round_trips(run_dir, predictor, inputs, reference, tmp_path):
    import jax.numpy as jnp

    from rovit_jax.export import load_jax_export
    from rovit_jax.export.__main__ import main

    path = str(tmp_path / "detector.jax")
    assert main(["--checkpoint", run_dir, "--format", "jax", "--out", path]) == 0
    detect = load_jax_export(path)
    args = [jnp.asarray(inputs[k]) for k in ("images", "text_embeddings", "text_valid")]
    out = jax.device_get(detect(*args))
    # The function before export, on the same inputs (the predictor's compiled batch of 4).
    direct = jax.device_get(
        jax.jit(predictor.detection_function())(
            predictor.detector_params,
            predictor.vlm_params,
            *args,
            jnp.asarray(inputs["text_valid"]),
        )
    )
    np.testing.assert_array_equal(out["valid"], direct["valid"])
    valid = out["valid"]
    np.testing.assert_array_equal(out["classes"][valid], direct["classes"][valid])
    np.testing.assert_allclose(out["scores"], direct["scores"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["boxes"], direct["boxes"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["masks"], direct["masks"], atol=1e-5)
    _assert_same_detections({k: v[:3] for k, v in out.items()}, inputs["info"], reference)
    with open(path + ".json") as f:
        meta = json.load(f)
    assert meta["parameters"] == "baked in as constants"
    assert meta["inputs"]["text_embeddings"]["shape"] == [16, predictor.embed_dim]


def test_export_bad_input(run_dir, tmp_path):
    from rovit_jax.export import load_jax_export
    from rovit_jax.export.__main__ import main

    with pytest.raises(FileNotFoundError, match="nothing.jax"):
        load_jax_export(str(tmp_path / "nothing.jax"))
    junk = tmp_path / "junk.jax"
    junk.write_bytes(b"not an artifact")
    with pytest.raises(ValueError, match="junk.jax"):
        load_jax_export(str(junk))
    out = str(tmp_path / "x.jax")
    pretrain = os.path.join(run_dir, "pretrain")
    assert main(["--checkpoint", pretrain, "--format", "jax", "--out", out]) == 2
    assert (
        main(["--checkpoint", run_dir, "--format", "jax", "--out", out, "--max_queries", "0"]) == 2
    )
    assert not os.path.exists(out)
