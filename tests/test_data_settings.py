"""The typed `data` sections (rovit_jax.data.settings): types, choices, older run configs, the
shapes world's one definition of its parameters, and the retrieval data's merge."""

from __future__ import annotations

import json

import ml_collections
import pytest

from rovit_jax import config_check as cc
from rovit_jax.config_sections import resolve_sections
from rovit_jax.data import settings, shapes_tfds
from rovit_jax.detect_config import detect_defaults
from rovit_jax.pretrain_config import pretrain_defaults
from rovit_jax.tasks import detect, pretrain


def _problems(config, classes) -> dict[str, str]:
    p = cc.Problems()
    resolve_sections(classes, config, p)
    return {key: why for key, _, why in p}


def test_every_bad_data_field_is_named_at_once():
    c = detect_defaults().to_dict()  # as read back from a run's config.json
    c["data"].update(novel_frequencies=["r", "x"], num_workers=0, with_masks=1)
    c["data"]["world"]["image_size"] = 4
    c = ml_collections.ConfigDict(c)
    with pytest.raises(cc.ConfigError) as e:
        detect.validate_config(c, check_files=False)
    assert {key for key, _, _ in e.value.problems} == {
        "data.novel_frequencies",
        "data.num_workers",
        "data.world.image_size",
        "data.with_masks",
    }
    text = str(e.value)
    assert "['x'] are not frequency groups" in text
    assert "an integer >= 16" in text  # the world's bound, stated once in WorldSettings


def test_dataset_names_come_from_one_list_per_task():
    c = pretrain_defaults()
    c.data.name = "lvis"  # a detection dataset is not image-text data
    got = _problems(c, (settings.ImageTextDataSettings,))
    assert list(got) == ["data.name"] and str(settings.PRETRAIN_DATASETS) in got["data.name"]
    d = detect_defaults()
    d.data.name = "karpathy"
    got = _problems(d, (settings.DetectionDataSettings,))
    assert list(got) == ["data.name"] and str(settings.DETECTION_DATASETS) in got["data.name"]


def test_run_configs_written_before_later_data_keys_still_resolve():
    c = json.loads(json.dumps(pretrain_defaults().to_dict()))
    for key in ("num_workers", "shard_image_key", "shard_caption_key", "train_files", "eval"):
        del c["data"][key]
    sections = pretrain.pretrain_settings(c)
    assert sections["data"].num_workers == 1 and sections["data"].train_files == ""
    assert sections["data.eval"] == settings.RetrievalDataSettings()
    d = json.loads(json.dumps(detect_defaults().to_dict()))
    del d["data"]["novel_frequencies"], d["data"]["with_masks"]
    data = detect.detection_settings(d)["data"]
    assert data.novel_frequencies == ("r",) and data.has_masks
    # A key every config has always had is required.
    del d["data"]["eval_split"]
    with pytest.raises(cc.ConfigError, match="data.eval_split"):
        detect.detection_settings(d)


def test_box_only_datasets_have_no_masks_whatever_the_flag():
    data = settings.DetectionDataSettings(name="tfds_coco", with_masks=True)
    assert not data.has_masks
    assert settings.DetectionDataSettings(name="coco", with_masks=False).has_masks is False
    assert settings.DetectionDataSettings(name="coco").has_masks


def test_evaluation_only_reads_only_the_evaluation_files(tmp_path):
    ann = tmp_path / "val.json"
    ann.write_text("{}")
    data = settings.DetectionDataSettings(
        name="lvis", eval_annotations=str(ann), eval_images=str(tmp_path)
    )
    p = cc.Problems()
    data.input_problems(p, need_train=False)
    assert not p
    data.input_problems(p)
    assert p.keys() == ["data.train_annotations", "data.train_images"]


def test_web_shard_files_may_be_a_pattern_or_a_list_of_paths():
    c = pretrain_defaults()
    c.data.unlock()
    c.data.train_files = None
    c.data.train_files = ["a-000.tfrecord", "a-001.tfrecord"]
    data = pretrain.pretrain_settings(c)["data"]
    assert data.train_files == ("a-000.tfrecord", "a-001.tfrecord")
    c.data.train_files = ["a-000.tfrecord", 3]
    got = _problems(c, (settings.ImageTextDataSettings,))
    assert list(got) == ["data.train_files"] and "list of file paths" in got["data.train_files"]


def test_retrieval_data_replaces_the_training_datas_fields():
    train = settings.ImageTextDataSettings(name="tfds", tfds_name="laion", eval_split="val")
    same, split = train.for_retrieval(settings.RetrievalDataSettings())
    assert same is train and split == "val"
    evaluated, split = train.for_retrieval(
        settings.RetrievalDataSettings(name="karpathy", annotations="k.json", images="img")
    )
    assert (evaluated.name, evaluated.annotations, evaluated.images) == (
        "karpathy",
        "k.json",
        "img",
    )
    assert evaluated.tfds_name == "" and split == "val"
    p = cc.Problems()
    evaluated.input_problems(p, prefix="data.eval")
    assert p.keys() == ["data.eval.annotations", "data.eval.images"]


def test_the_shapes_builder_takes_its_defaults_and_bounds_from_the_world_section():
    world = settings.WorldSettings()
    assert shapes_tfds.ShapesWorldConfig().name == shapes_tfds.config_name(**world.as_kwargs())
    with pytest.raises(cc.ConfigError, match="data.world.max_objects"):
        shapes_tfds.ShapesWorldConfig(max_objects=0)
    with pytest.raises(cc.ConfigError, match="unknown key"):
        settings.WorldSettings.checked(num_scenes=3)
    assert settings.WorldSettings.checked(seed=3) == settings.WorldSettings(seed=3)
