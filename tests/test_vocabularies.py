"""Built-in vocabularies, the CLIP prompt ensemble, clean_name and the input-pipeline benchmark."""

import hashlib
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import xla_flags

from rovit_jax.data import vocabularies
from rovit_jax.data.categories import CategoryTable
from rovit_jax.detection.text_classifier import (
    PROMPT_ENSEMBLES,
    build_text_classifier,
    clean_name,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# COCO 2017 ids 1..90 without the ten unused ones.
COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
OV_COCO_NOVEL = set(
    "airplane bus cat dog cow elephant umbrella tie snowboard skateboard cup knife cake couch "
    "keyboard sink scissors".split()
)


# ---- LVIS v1 -----------------------------------------------------------------------------------


def test_lvis_v1_counts_ids_and_frequency_groups():
    table = vocabularies.vocabulary("lvis")
    assert isinstance(table, CategoryTable)
    assert len(table) == 1203
    assert table.ids() == list(range(1, 1204))
    assert len(set(table.names())) == 1203
    groups = table.frequency_groups()
    assert set(groups) == {"f", "c", "r"}
    assert (len(groups["f"]), len(groups["c"]), len(groups["r"])) == (405, 461, 337)
    assert sorted(groups["f"] + groups["c"] + groups["r"]) == list(range(1, 1204))
    # The open-vocabulary LVIS split: rare = novel, frequent + common = base.
    assert table.novel_ids() == groups["r"]
    assert len(table.base_ids()) == 866


@pytest.mark.parametrize(
    "cid, name, frequency",
    [
        (1, "aerosol_can", "c"),
        (3, "airplane", "f"),
        (13, "applesauce", "r"),
        (46, "Band_Aid", "c"),
        (136, "bow_(weapon)", "r"),
        (138, "bow-tie", "f"),
        (698, "monitor_(computer_equipment) computer_monitor", "f"),
        (793, "person", "f"),
        (853, "pug-dog", "r"),
        (1112, "traffic_light", "f"),
        (1193, "wolf", "r"),
        (1203, "zucchini", "c"),
    ],
)
def test_lvis_v1_known_categories(cid, name, frequency):
    category = vocabularies.LVIS_V1.by_id()[cid]
    assert (category.name, category.frequency) == (name, frequency)


def test_lvis_v1_names_match_the_list_shipped_with_tensorflow_datasets():
    # tensorflow-datasets keeps the LVIS v1 class names in category-id order (label = id - 1).
    spec = importlib.util.find_spec("tensorflow_datasets")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "lvis", "classes.txt")
    with open(path, encoding="utf-8") as f:
        reference = [line for line in f.read().split("\n") if line]
    assert vocabularies.names("lvis") == reference


# ---- COCO, OV-COCO, Objects365 -----------------------------------------------------------------


def test_coco80_has_the_official_ids_in_order():
    table = vocabularies.vocabulary("coco")
    assert len(table) == 80
    assert table.ids() == [i for i in range(1, 91) if i not in COCO_UNUSED_IDS]
    by_id = table.by_id()
    assert (by_id[1].name, by_id[72].name, by_id[90].name) == ("person", "tv", "toothbrush")
    assert all(c.frequency == "" for c in table)


def test_ov_coco_is_48_base_and_17_novel_disjoint_coco_categories():
    table = vocabularies.vocabulary("ov_coco")
    base, novel = table.base_ids(), table.novel_ids()
    assert (len(base), len(novel)) == (48, 17)
    assert not set(base) & set(novel)
    assert set(base) | set(novel) == set(table.ids())
    assert set(table.ids()) <= set(vocabularies.COCO80.ids())
    assert {table.name_of(i) for i in novel} == OV_COCO_NOVEL


def test_objects365_v2_names_and_ids():
    table = vocabularies.vocabulary("objects365")
    assert len(table) == 365
    assert table.ids() == list(range(1, 366))
    assert len(set(table.names())) == 365
    by_id = table.by_id()
    # The dataset's own spellings are kept (slips and trailing spaces included).
    assert by_id[1].name == "Person"
    assert by_id[38].name == "Moniter/TV"
    assert by_id[365].name == "Table Tennis "
    assert all(c.frequency == "" for c in table)


def test_vocabulary_lookup_and_errors():
    assert vocabularies.vocabulary(" LVIS ") is vocabularies.LVIS_V1
    for name in vocabularies.VOCABULARY_NAMES:
        assert vocabularies.names(name) == vocabularies.vocabulary(name).names()
    with pytest.raises(ValueError, match="'lvis_v2'.*objects365"):
        vocabularies.vocabulary("lvis_v2")


# ---- prompt ensembles --------------------------------------------------------------------------


def test_clip_ensemble_is_the_published_80_templates():
    clip = PROMPT_ENSEMBLES["clip"]
    assert len(clip) == 80 and len(set(clip)) == 80
    assert all(t.count("{}") == 1 and "{" not in t.replace("{}", "") for t in clip)
    assert clip[0] == "a bad photo of a {}." and clip[1] == "a photo of many {}."
    assert clip[-1] == "a tattoo of the {}."
    # The 7 templates CLIP's forward selection kept, all part of the 80.
    selected = {
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    }
    assert selected <= set(clip)
    # The other ensembles are unchanged.
    assert PROMPT_ENSEMBLES["single"] == ("a photo of a {}.",)
    assert len(PROMPT_ENSEMBLES["vild"]) == 14 and PROMPT_ENSEMBLES["vild"][0] == "a photo of a {}."


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("traffic_light", "traffic light"),
        ("bow_(weapon)", "bow weapon"),
        ("Band_Aid", "band aid"),
        (
            "monitor_(computer_equipment) computer_monitor",
            "monitor computer equipment computer monitor",
        ),
        ("Cabinet/shelf", "cabinet shelf"),
        ("Tape Measur/ Ruler", "tape measur ruler"),
        ("Table Tennis ", "table tennis"),
        ("bow-tie", "bow-tie"),
        ("Formula 1 ", "formula 1"),
        ("person", "person"),
    ],
)
def test_clean_name_rule(raw, cleaned):
    assert clean_name(raw) == cleaned


def test_clean_name_on_every_built_in_name():
    for name in vocabularies.VOCABULARY_NAMES:
        for raw in vocabularies.names(name):
            words = clean_name(raw)
            assert words and not re.search(r"[_/()]|\s\s|^\s|\s$|[A-Z]", words), (raw, words)
            if not re.search(r"[_/()A-Z]|\s\s|^\s|\s$", raw):
                assert words == raw  # names without those characters are left alone


def _fake_embed(texts: list[str]) -> np.ndarray:
    """Deterministic unit vectors from a hash of each text: [N, 8]."""
    rows = []
    for t in texts:
        digest = hashlib.sha256(t.encode()).digest()
        v = np.frombuffer(digest, dtype=np.uint8)[:8].astype(np.float64) - 127.5
        rows.append(v / np.linalg.norm(v))
    return np.asarray(rows, np.float32)


def test_build_text_classifier_with_clip_ensemble_matches_numpy():
    raw = ["traffic_light", "bow_(weapon)", "Cabinet/shelf"]
    words = ["traffic light", "bow weapon", "cabinet shelf"]
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return _fake_embed(texts)

    emb, valid = build_text_classifier(raw, embed, templates=PROMPT_ENSEMBLES["clip"])
    assert len(calls) == 1 and len(calls[0]) == 3 * 80
    assert emb.shape == (16, 8) and emb.dtype == np.float32
    np.testing.assert_array_equal(valid, np.arange(16) < 3)
    for k, w in enumerate(words):
        per_template = _fake_embed([t.replace("{}", w) for t in PROMPT_ENSEMBLES["clip"]])
        mean = per_template.astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(emb[k], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(emb[3:], 0.0)


# ---- the input-pipeline benchmark --------------------------------------------------------------


def test_input_pipeline_benchmark_quick_smoke_run():
    env = dict(os.environ)
    # One device (compile time dominates the two tiny train steps).
    env["XLA_FLAGS"] = xla_flags(1)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "input_pipeline.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,  # generous: a smoke run, timed only by benchmarks themselves
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # Four pipeline rows (two detection canvases, two pretraining sizes) with positive rates.
    # Row: label, px, batch, timed images, images/s on 1 thread, images/s with prefetch.
    row = r"^(detection|pretraining) .*?\s(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$"
    pipeline_rows = re.findall(row, out, re.M)
    assert len(pipeline_rows) == 4, out
    assert {int(r[1]) for r in pipeline_rows} == {1024, 128, 224, 32}  # --quick: tiny configs
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in pipeline_rows)
    # Two trainer rows whose ratio is pipeline img/s over needed img/s.
    # Row: config, variant, batch, px, step s, needs img/s, pipeline img/s, ratio "x".
    need = r"^(shapes_\w+:tiny)\s.*?([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$"
    need_rows = re.findall(need, out, re.M)
    assert [r[0] for r in need_rows] == ["shapes_pretrain:tiny", "shapes_detect:tiny"], out
    for _, step_s, needs, have, ratio in need_rows:
        assert float(step_s) > 0 and float(needs) > 0
        assert float(ratio) == pytest.approx(float(have) / float(needs), rel=0.02, abs=0.01)
