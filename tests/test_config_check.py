"""Config validation: every problem listed in one error, paths checked, mesh checked without jax."""

import os

import ml_collections
import pytest

from rovit_jax import config_check as cc
from rovit_jax import paths
from rovit_jax.config_files import load_config
from rovit_jax.detect_config import detect_defaults
from rovit_jax.pretrain_config import pretrain_defaults
from rovit_jax.tasks import detect, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shipped(module: str, arg=None) -> ml_collections.ConfigDict:
    return load_config(f"{module}:{arg}" if arg else module)


def _raised(fn, config) -> cc.ConfigError:
    with pytest.raises(cc.ConfigError) as info:
        fn(config)
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working
    return info.value


# ---- the collector ------------------------------------------------------------------------------
def test_problems_collects_and_raises_once_listing_every_problem():
    p = cc.Problems()
    p.raise_if_any()  # nothing yet: no error
    assert p.check(True, "a", 1, "fine") and not p
    p.add("loss.kind", "hinge", "unknown loss")
    assert not p.check(False, "batch_size", -3, "must be positive")
    p.add("cpe.scale", (0.0, 1.0), "bad range")
    assert len(p) == 3 and p.keys() == ["loss.kind", "batch_size", "cpe.scale"]
    with pytest.raises(cc.ConfigError) as info:
        p.raise_if_any()
    lines = str(info.value).splitlines()
    assert lines[0] == "3 config problems:"
    assert lines[1:] == [
        "  config key `loss.kind` = 'hinge': unknown loss",
        "  config key `batch_size` = -3: must be positive",
        "  config key `cpe.scale` = (0.0, 1.0): bad range",
    ]
    assert [k for k, _, _ in info.value.problems] == ["loss.kind", "batch_size", "cpe.scale"]


def test_single_problem_keeps_the_one_line_format():
    p = cc.Problems()
    p.add("remat", "some", "choose one of ('none', 'full', 'dots')")
    with pytest.raises(ValueError) as info:
        p.raise_if_any()
    assert str(info.value) == "config key `remat` = 'some': choose one of ('none', 'full', 'dots')"


def test_long_values_are_shortened_in_messages():
    line = cc.problem_line("optim.frozen", ["x" * 50] * 20, "why")
    assert line.startswith("config key `optim.frozen` = ['xxx") and line.endswith("...: why")
    assert len(line) < 200


def test_typed_getters_refuse_wrong_types_and_ranges():
    # (Pairs and lists of a typed section: tests/test_config_sections.py.)
    c = ml_collections.ConfigDict({"n": True, "m": 3, "x": float("nan"), "y": 0.5, "s": 7})
    p = cc.Problems()
    assert cc.check_int(p, c, "n") is None  # a bool is not an integer
    assert cc.check_int(p, c, "m", min_value=4) is None
    assert cc.check_number(p, c, "x") is None  # NaN
    assert cc.check_number(p, c, "y", min_value=0.0, max_value=1.0) == 0.5
    assert cc.check_str(p, c, "s") is None
    assert cc.check_int(p, c, "absent.key") is None
    assert p.keys() == ["n", "m", "x", "s", "absent.key"]
    assert "missing" in p.lines()[-1]
    assert cc.check_int(p, c, "absent", default=5) == 5 and len(p) == 5


# ---- the tasks' validate_config -----------------------------------------------------------------
def test_defaults_and_shipped_shapes_configs_have_no_problems():
    pretrain.validate_config(pretrain_defaults())
    detect.validate_config(detect_defaults())
    for arg in (None, "tiny"):
        pretrain.validate_config(_shipped("shapes_pretrain", arg))
        detect.validate_config(_shipped("shapes_detect", arg))  # nested pretraining config too


def test_pretrain_config_with_several_problems_lists_all_of_them():
    c = pretrain_defaults()
    c.loss.kind = "hinge"
    c.loss.alpha = 1.5
    c.pp.image_size = 100  # patch 16 does not divide it
    c.cpe.scale = (0.0, 1.0)
    c.model.text.pool_type = "cls"
    c.batch_size = 0
    c.remat = "some"
    c.optim.schedule = "step"
    e = _raised(pretrain.validate_config, c)
    keys = [k for k, _, _ in e.problems]
    expected = [
        "loss.kind",
        "loss.alpha",
        "pp.image_size",
        "cpe.scale",
        "model.text.pool_type",
        "batch_size",
        "remat",
        "optim.schedule",
    ]
    assert sorted(keys) == sorted(expected)
    lines = str(e).splitlines()
    assert lines[0] == f"{len(expected)} config problems:" and len(lines) == len(expected) + 1
    for key, value in [("loss.kind", "'hinge'"), ("pp.image_size", "100"), ("batch_size", "0")]:
        assert any(f"`{key}` = {value}:" in line for line in lines), key
    # The reason of a cross-field problem names the other key.
    assert any("model.image.variant='B/16'" in line for line in lines)


def test_logical_axis_rules_are_checked():
    c = pretrain_defaults()
    c.logical_axis_rules = (("embed", "fsdp"), ("width", "fsdp"), ("mlp", "tensor"), "mlp")
    e = _raised(pretrain.validate_config, c)
    got = {k: why for k, _, why in e.problems}
    assert sorted(got) == [f"logical_axis_rules[{i}]" for i in (1, 2, 3)]
    assert "embed" in got["logical_axis_rules[1]"]  # the known names are listed
    assert "fsdp" in got["logical_axis_rules[2]"]  # and the mesh's axes


def test_pretrain_wrong_types_are_reported_not_crashed_on():
    d = pretrain_defaults().to_dict()  # a plain dict: ConfigDict would refuse type changes
    d["pp"]["image_size"] = "224"
    d["cpe"]["up_size"] = None
    d["loss"]["gamma"] = [1.0]
    d["model"]["image"]["variant"] = "B16"
    d["eval"]["recall_ks"] = ()
    e = _raised(pretrain.validate_config, ml_collections.ConfigDict(d))
    assert sorted(k for k, _, _ in e.problems) == sorted(
        ["pp.image_size", "cpe.up_size", "loss.gamma", "model.image.variant", "eval.recall_ks"]
    )


def test_pretrain_paths_needed_by_the_dataset(tmp_path, gcs_bucket):
    c = pretrain_defaults()
    c.data.name = "coco_captions"
    c.data.annotations = str(tmp_path / "missing.json")
    c.data.images = ""
    c.tokenizer.model_path = ""
    e = _raised(pretrain.validate_config, c)
    by_key = {k: why for k, _, why in e.problems}
    assert set(by_key) == {"data.annotations", "data.images", "tokenizer.model_path"}
    assert "no such file" in by_key["data.annotations"]
    assert "required for data.name='coco_captions'" in by_key["data.images"]
    # Once the files exist (and the tokenizer lives on a remote filesystem) nothing is left.
    (tmp_path / "captions.json").write_text("{}")
    (tmp_path / "images").mkdir()
    c.data.annotations = str(tmp_path / "captions.json")
    c.data.images = str(tmp_path / "images")
    c.tokenizer.model_path = f"{gcs_bucket}/check/spm.model"  # in a bucket: checked there too
    paths.write_bytes(c.tokenizer.model_path, b"not read by validation")
    pretrain.validate_config(c)
    for missing in (str(tmp_path / "spm.model"), f"{gcs_bucket}/check/none.model"):
        c.tokenizer.model_path = missing
        (problem,) = _raised(pretrain.validate_config, c).problems
        assert problem[:2] == ("tokenizer.model_path", missing)
        assert "no such file" in problem[2]
    # web shards need their files and an evaluation dataset.
    w = pretrain_defaults()
    w.data.name = "web_shards"
    w.tokenizer.model_path = f"{gcs_bucket}/check/spm.model"
    assert sorted(k for k, _, _ in _raised(pretrain.validate_config, w).problems) == [
        "data.eval.name",
        "data.train_files",
    ]


def test_detect_config_with_several_problems_lists_all_of_them(tmp_path):
    c = detect_defaults()
    c.data.name = "lvis"  # needs four paths, none given
    c.data.eval_annotations = str(tmp_path / "lvis_v1_val.json")  # given but missing
    c.det.image_size = 1000  # not divisible by 2**5
    c.det.mask_stride = 3
    c.rpn.objectness = "iou"
    c.infer.w_novel = 2.0
    c.infer.vlm_temperature = -1.0
    c.text.templates = "nope"
    c.rpn.bg_iou = 0.9  # above fg_iou 0.7
    e = _raised(detect.validate_config, c)
    by_key = {k: why for k, _, why in e.problems}
    assert set(by_key) == {
        "data.eval_annotations",
        "data.eval_images",
        "data.train_annotations",
        "data.train_images",
        "det.image_size",
        "det.mask_stride",
        "rpn.objectness",
        "infer.w_novel",
        "infer.vlm_temperature",
        "text.templates",
        "rpn.bg_iou",
    }
    assert "no such file" in by_key["data.eval_annotations"]
    assert "data.name='lvis'" in by_key["data.train_images"]
    assert "det.max_level" in by_key["det.image_size"]
    assert "rpn.fg_iou" in by_key["rpn.bg_iou"]


def test_detect_reports_nested_pretraining_problems_with_a_prefix():
    c = _shipped("shapes_detect", "tiny")
    c.pretrain.loss.kind = "hinge"
    c.pretrain.pp.image_size = 30
    c.det.max_instances = 0
    e = _raised(detect.validate_config, c)
    assert sorted(k for k, _, _ in e.problems) == [
        "det.max_instances",
        "pretrain.loss.kind",
        "pretrain.pp.image_size",
    ]
    empty = detect_defaults()
    empty.init.run_pretraining = True  # but no pretraining config
    assert [k for k, _, _ in _raised(detect.validate_config, empty).problems] == ["pretrain"]


def test_evaluation_only_dataset_with_training_steps_is_refused(tmp_path):
    (tmp_path / "o365.json").write_text("{}")
    (tmp_path / "images").mkdir()
    c = detect_defaults()
    c.data.name = "objects365"
    c.data.eval_annotations = str(tmp_path / "o365.json")
    c.data.eval_images = str(tmp_path / "images")
    c.total_steps = 0
    detect.validate_config(c)
    c.total_steps = 10
    (problem,) = _raised(detect.validate_config, c).problems
    assert problem[0] == "data.name" and "evaluation only" in problem[2]


# ---- the mesh, without building one --------------------------------------------------------------
def _mesh_config(mesh, batch_size=64, eval_batch=32):
    return ml_collections.ConfigDict(
        {"mesh": mesh, "batch_size": batch_size, "eval": {"batch_size": eval_batch}}
    )


def test_check_mesh_accepts_fitting_meshes():
    cc.check_mesh(_mesh_config([("data", -1), ("fsdp", 1)]), num_devices=8)
    cc.check_mesh(_mesh_config([("data", 2), ("fsdp", 4)]), num_devices=8)
    cc.check_mesh(_mesh_config([("data", 2), ("fsdp", 2), ("model", 2)]), 8, num_processes=2)


def test_check_mesh_lists_every_misfit(monkeypatch):
    import jax

    from rovit_jax.train import mesh as mesh_lib

    def refuse(*args, **kwargs):
        raise AssertionError("check_mesh must not touch devices or build a mesh")

    monkeypatch.setattr(mesh_lib, "make_mesh", refuse)
    monkeypatch.setattr(jax, "devices", refuse)

    # 3 x 1 does not use 8 devices.
    with pytest.raises(ValueError, match=r"multiply to 3, but there are 8 devices"):
        cc.check_mesh(_mesh_config([("data", 3), ("fsdp", 1)]), num_devices=8)
    # -1 cannot absorb 8 devices over a fixed axis of 3.
    with pytest.raises(ValueError, match="8 devices cannot be split"):
        cc.check_mesh(_mesh_config([("data", -1), ("fsdp", 3)]), num_devices=8)
    # Fits, but both batch sizes are not divisible by the 8 batch shards: two problems at once.
    with pytest.raises(cc.ConfigError) as info:
        cc.check_mesh(_mesh_config([("data", 4), ("fsdp", 2)], 12, 20), num_devices=8)
    assert [k for k, _, _ in info.value.problems] == ["batch_size", "eval.batch_size"]
    assert "8 batch shards" in str(info.value)
    # Structural problems are all reported.
    with pytest.raises(cc.ConfigError) as info:
        cc.check_mesh(_mesh_config([("data", -1), ("data", -1), ("model", 0)]), num_devices=8)
    text = str(info.value)
    for part in ("duplicate axis names", "['fsdp'] are required", ">= 1, or -1", "at most one"):
        assert part in text, part
    # Hosts: the batch must also split evenly over processes.
    with pytest.raises(cc.ConfigError, match="3 hosts") as info:
        mesh = [("data", 2), ("fsdp", 1), ("model", 3)]  # 2 batch shards: 8 and 4 fit them
        cc.check_mesh(_mesh_config(mesh, 8, 4), 6, num_processes=3)
    assert [k for k, _, _ in info.value.problems] == ["batch_size", "eval.batch_size"]
    with pytest.raises(ValueError, match="num_devices"):
        cc.check_mesh(_mesh_config([("data", -1), ("fsdp", 1)]), num_devices=0)


def test_mesh_structure_is_part_of_validate_config():
    c = pretrain_defaults()
    c.mesh = [("data", -1), ("model", -1)]
    keys = [k for k, _, _ in _raised(pretrain.validate_config, c).problems]
    assert keys == ["mesh", "mesh"]  # fsdp axis missing; two -1 sizes
