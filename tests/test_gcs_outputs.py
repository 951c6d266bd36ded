"""Exports, weight interchange, prediction and result files with a bucket as input and output.

Each output is written once to a local folder and once to `gs://` (a local GCS emulator, the
`gcs_bucket` fixture in conftest.py, reached through gcsfs as in production; nothing is
mocked), and both must hold the same bytes (the same arrays where a writer is not
byte-for-byte deterministic). Inputs read from the bucket must give what their
local copies give. No test may leave a local folder named "gs:" behind (a URL handed to `open`).
The run is the tiny detector of conftest.py's `run_dir`.
"""

import io
import json
import os
import uuid
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from rovit_jax import paths

QUERIES = ["red circle", "blue star"]


@pytest.fixture(scope="module")
def root(gcs_bucket):
    """A folder of this module's own in the shared bucket."""
    return f"{gcs_bucket}/outputs-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def no_local_url_folders():
    """Fails a test that wrote a URL to the local disk (it would show up as a "gs:" folder)."""
    yield
    assert not [name for name in os.listdir() if name.startswith("gs:")]


def _same_files(
    local_dir: str, remote_dir: str, names: list[str], skip: Sequence[str] = ()
) -> None:
    """Both folders hold exactly `names`, with identical bytes (but for those in `skip`)."""
    assert paths.listdir(local_dir) == paths.listdir(remote_dir) == sorted(names)
    for name in set(names) - set(skip):
        local = os.path.join(local_dir, name)
        remote = os.path.join(remote_dir, name)
        assert paths.read_bytes(remote) == paths.read_bytes(local), name


def test_jax_export_writes_the_bucket_like_a_local_folder(run_dir, root, tmp_path):
    from rovit_jax.export import load_jax_export
    from rovit_jax.export.__main__ import main

    remote_dir = f"{root}/jax_export"
    for folder in (str(tmp_path), remote_dir):
        out = os.path.join(folder, "detector.jax")
        assert main(["--checkpoint", run_dir, "--format", "jax", "--out", out]) == 0
    names = ["detector.jax", "detector.jax.json", "detector.jax.tokenizer.model"]
    _same_files(str(tmp_path), remote_dir, names)
    assert callable(load_jax_export(f"{remote_dir}/detector.jax"))  # deserialized from the bucket
    with pytest.raises(FileNotFoundError, match="missing.jax"):
        load_jax_export(f"{remote_dir}/missing.jax")


def test_saved_model_export_uploads_its_folder(run_dir, root, tmp_path):
    import tensorflow as tf

    from rovit_jax.export import export_saved_model
    from rovit_jax.export.saved_model import METADATA_NAME

    local_dir, remote_dir = str(tmp_path / "local"), f"{root}/saved_model"
    meta = export_saved_model(run_dir, local_dir, max_queries=4)
    assert export_saved_model(run_dir, remote_dir, max_queries=4) == meta
    files = _walk(remote_dir)
    assert files == _walk(local_dir)  # files only: a bucket has no empty folders
    assert "saved_model.pb" in files and "variables/variables.index" in files
    # Download every object; the copy must load, with the local export's variables.
    copy_dir = str(tmp_path / "copy")
    for rel in files:
        paths.write_bytes(os.path.join(copy_dir, rel), paths.read_bytes(f"{remote_dir}/{rel}"))
    for rel in (METADATA_NAME, meta["text"]["sentencepiece_model"]):
        assert paths.read_bytes(os.path.join(copy_dir, rel)) == paths.read_bytes(
            os.path.join(local_dir, rel)
        )
    got, want = (
        tf.train.load_checkpoint(os.path.join(d, "variables", "variables"))
        for d in (copy_dir, local_dir)
    )
    names = sorted(want.get_variable_to_shape_map())
    assert sorted(got.get_variable_to_shape_map()) == names and len(names) > 10
    for name in names:
        np.testing.assert_array_equal(got.get_tensor(name), want.get_tensor(name), err_msg=name)
    model = tf.saved_model.load(copy_dir)
    assert set(model.signatures) == {"serving_default", "embed_text"}


def _walk(folder: str, prefix: str = "") -> list[str]:
    """Paths (relative to `folder`) of every file below it."""
    out = []
    for name in paths.listdir(folder):
        full = os.path.join(folder, name)
        if paths.isdir(full):
            out += _walk(full, f"{prefix}{name}/")
        else:
            out.append(prefix + name)
    return out


def test_interop_export_and_import_through_the_bucket(run_dir, root, tmp_path):
    from rovit_jax.config_files import load_config
    from rovit_jax.interop import import_timm, read_export
    from rovit_jax.interop.__main__ import main
    from rovit_jax.interop.towers import flatten

    pretrain = os.path.join(run_dir, "pretrain")
    remote_dir = f"{root}/towers"
    for out in (str(tmp_path / "towers"), remote_dir):
        assert main(["export", "--checkpoint", pretrain, "--out", out]) == 0
    towers = ["image_tower.safetensors", "text_tower.safetensors"]
    local_dir = str(tmp_path / "towers")
    _same_files(local_dir, remote_dir, [*towers, "text_tower.json", "timm_kwargs.json"], towers)
    for name in towers:  # same tensors and metadata (safetensors orders its metadata at random)
        local_tensors, local_meta = read_export(os.path.join(local_dir, name))
        tensors, meta = read_export(f"{remote_dir}/{name}")
        assert meta == local_meta and tensors.keys() == local_tensors.keys()
        for key, value in tensors.items():
            np.testing.assert_array_equal(value, local_tensors[key])

    # The bucket's image tower imported back, by the library and by the command line.
    config_path = os.path.join(pretrain, "config.json")
    config = load_config(config_path)
    weights = f"{remote_dir}/{towers[0]}"
    params, report = import_timm(weights, config)
    expected, _ = import_timm(os.path.join(local_dir, towers[0]), config)
    for key, value in flatten(expected).items():
        np.testing.assert_array_equal(flatten(params)[key], value)
    workdir = f"{root}/imported"  # a pretraining workdir in the bucket, orbax's arrays included
    argv = ["import", "--from", "timm", "--weights", weights, "--config", config_path]
    assert main([*argv, "--out", workdir]) == 0
    saved = paths.read_json(f"{workdir}/import_report.json")  # the command adds notes
    expected_report = json.loads(json.dumps(report.to_dict()))
    assert saved.pop("notes")[: len(report.notes)] == expected_report.pop("notes")
    assert saved == expected_report
    text = paths.read_text(f"{workdir}/import_report.txt")
    assert text.splitlines()[0] == str(report).splitlines()[0]
    assert paths.read_json(f"{workdir}/config.json") == json.loads(config.to_json_best_effort())
    assert paths.listdir(f"{workdir}/checkpoints") == ["0"]
    with pytest.raises(FileExistsError, match=f"{workdir}/checkpoints already holds"):
        main([*argv, "--out", workdir])  # refused before any weight is read


def _scene(seed: int) -> bytes:
    """A 128 px shapes scene as PNG bytes."""
    from rovit_jax.data import shapes_world

    image = shapes_world.render_scene(np.random.default_rng(seed), 128)["image"]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_reads_images_from_and_writes_outputs_to_the_bucket(run_dir, root, tmp_path):
    from rovit_jax import predict

    scenes = {"a.png": _scene(6), "b.png": _scene(7)}
    results = {}
    for base in (str(tmp_path), f"{root}/predict"):
        for name, data in scenes.items():
            paths.write_bytes(f"{base}/images/{name}", data)
        argv = ["--checkpoint", run_dir, "--image", f"{base}/images", "--out", f"{base}/drawn"]
        argv += ["--query", QUERIES[0], "--query", QUERIES[1], "--json", f"{base}/dets.json"]
        assert predict.main([*argv, "--threshold", "0"]) == 0
        results[base] = paths.read_json(f"{base}/dets.json")
    (local, local_result), (remote, result) = results.items()
    assert result["checkpoint"] == local_result["checkpoint"] == run_dir
    assert [r["image"] for r in result["images"]] == [f"{remote}/images/{n}" for n in scenes]
    assert [r["rendered"] for r in result["images"]] == [f"{remote}/drawn/{n}" for n in scenes]
    for got, want in zip(result["images"], local_result["images"]):
        assert len(got["scores"]) > 0
        for key in ("boxes", "scores", "labels", "names", "masks", "height", "width"):
            assert got[key] == want[key], key
    _same_files(f"{local}/drawn", f"{remote}/drawn", list(scenes))


def test_retrieval_from_a_bucket_folder_and_its_cache(run_dir, root, tmp_path):
    from rovit_jax.inference import Predictor

    predictor = Predictor.from_checkpoint(run_dir)
    scenes = {"a.png": _scene(8), "b.png": _scene(9), "notes.txt": b"not an image"}
    remote = f"{root}/gallery"
    for base in (str(tmp_path), remote):
        for name, data in scenes.items():
            paths.write_bytes(f"{base}/{name}", data)
    top = predictor.retrieve(remote, QUERIES[0], k=5)
    local_top = predictor.retrieve(str(tmp_path), QUERIES[0], k=5)
    assert [os.path.basename(p) for p, _ in top] == [os.path.basename(p) for p, _ in local_top]
    assert {p for p, _ in top} == {f"{remote}/a.png", f"{remote}/b.png"}
    np.testing.assert_allclose([s for _, s in top], [s for _, s in local_top], atol=1e-6)

    # Cached per object version: asking again embeds nothing, a rewritten object again.
    embedded = predictor.images_embedded
    assert predictor.retrieve(remote, QUERIES[0], k=5) == top
    assert predictor.images_embedded == embedded
    paths.write_bytes(f"{remote}/b.png", scenes["a.png"])
    scores = dict(predictor.retrieve(remote, QUERIES[0], k=5))
    assert predictor.images_embedded == embedded + 1
    assert scores[f"{remote}/b.png"] == pytest.approx(scores[f"{remote}/a.png"], abs=1e-6)


def test_classifier_and_detection_results_in_the_bucket(root, tmp_path):
    from rovit_jax.classifier import load_classifier, read_vocabulary, save_classifier
    from rovit_jax.evaluation.detection import load_ground_truth, write_results

    remote = f"{root}/files"
    embeddings = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    meta = {"names": ["cat", "dog", "émeu"], "templates": "clip"}
    for base in (str(tmp_path), remote):
        save_classifier(f"{base}/clf", embeddings, meta)
        got, got_meta = load_classifier(f"{base}/clf.npy")
        np.testing.assert_array_equal(got, embeddings)
        assert got_meta == meta
        write_results(f"{base}/eval/results.json", {"AP": np.float64(0.25)}, [{"id": np.int64(1)}])
        paths.write_text(f"{base}/names.txt", "cat\n\ndog\n")
    assert paths.listdir(remote) == ["clf.json", "clf.npy", "eval", "names.txt"]
    for name in ("clf.json", "clf.npy", "eval/results.json"):
        assert paths.read_bytes(f"{remote}/{name}") == (tmp_path / name).read_bytes(), name
    assert load_ground_truth(f"{remote}/eval/results.json")["metrics"] == {"AP": 0.25}
    assert read_vocabulary(f"{remote}/names.txt").names() == ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_classifier(f"{remote}/missing")


def test_file_version_changes_when_a_bucket_object_is_rewritten(root):
    """The predictor's image-embedding cache is keyed on it: a same-size rewrite within the same
    second must still count as a change."""
    path = f"{root}/version/image.png"
    paths.write_bytes(path, b"one")
    first = paths.version(path)
    assert paths.version(path) == first
    paths.write_bytes(path, b"two")
    assert paths.version(path) != first and paths.version(path)[0] == 3
