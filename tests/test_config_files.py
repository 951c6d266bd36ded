"""The one config loader: shipped names, paths, run config.json files, dotted overrides, errors."""

import dataclasses
import glob
import json
import os

import ml_collections
import pytest

from rovit_jax import config_files
from rovit_jax.config_files import apply_overrides, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_shipped_config_loads_by_name_and_by_path_without_touching_sys_path():
    files = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
    assert config_files.CONFIG_DIR == os.path.join(REPO, "configs")
    loaded = 0
    for path in files:
        with open(path) as f:
            source = f.read()
        name = os.path.basename(path)[:-3]
        assert "sys.path" not in source, f"{name} edits sys.path"
        if "def get_config" not in source:
            continue  # a helper module (detect_recipe), loaded by its siblings
        by_name, by_path = load_config(name), load_config(path)
        assert by_name.to_dict() == by_path.to_dict(), name
        loaded += 1
    assert loaded >= 6


def test_arguments_and_overrides():
    tiny = load_config("shapes_detect:tiny")
    assert tiny.total_steps == 4 and load_config("shapes_detect").total_steps == 1600
    assert load_config("configs/shapes_detect.py:steps=5").total_steps == 5
    c = load_config(
        "shapes_detect:tiny",
        **{
            "optim.lr": 3e-3,
            "batch_size": 6,
            "infer.vlm_temperature": None,  # a FieldReference of float
            "det.global_blocks": (0,),
            "optim.lr_mults": [],  # list -> another list
            "roi.box_loss_weight": 2,  # int into a float field
        },
    )
    assert c.optim.lr == 3e-3 and c.batch_size == 6 and c.infer.vlm_temperature is None
    assert tuple(c.det.global_blocks) == (0,) and list(c.optim.lr_mults) == []
    assert c.roi.box_loss_weight == 2
    # The nested pretraining config is untouched by detection overrides.
    assert c.pretrain.optim.lr == tiny.pretrain.optim.lr


def test_run_config_json_round_trips(tmp_path):
    config = load_config("shapes_pretrain:tiny")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    # Tuples come back as lists from JSON; compare through JSON on both sides.
    loaded = load_config(str(path))
    assert json.loads(json.dumps(loaded.to_dict())) == json.loads(path.read_text())
    assert load_config(str(path), **{"optim.lr": 0.5}).optim.lr == 0.5
    with pytest.raises(ValueError, match="takes no argument"):
        load_config(f"{path}:tiny")


def test_errors_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_config"):
        load_config("no_such_config")
    not_a_config = tmp_path / "helper.py"
    not_a_config.write_text("X = 1\n")
    with pytest.raises(ValueError, match="helper.py has no get_config"):
        load_config(str(not_a_config))
    with pytest.raises(KeyError, match="`nope.lr`: no block `nope`"):
        load_config("shapes_pretrain:tiny", **{"nope.lr": 1.0})
    with pytest.raises(KeyError, match="`optim.lr.x`: `optim.lr` is not a block"):
        apply_overrides(load_config("shapes_pretrain:tiny"), {"optim.lr.x": 1.0})


def test_sibling_configs_load_by_path_from_anywhere(tmp_path, monkeypatch):
    # A user's config next to a copy of a shipped one builds on it, from any working directory.
    for name in ("shapes_pretrain", "shapes_detect"):
        with open(os.path.join(REPO, "configs", name + ".py")) as f:
            (tmp_path / f"{name}.py").write_text(f.read())
    (tmp_path / "mine.py").write_text(
        "from rovit_jax.config_files import load_sibling\n"
        "base = load_sibling(__file__, 'shapes_detect')\n"
        "def get_config(arg=None):\n"
        "    c = base.get_config('tiny')\n"
        "    c.batch_size = 8\n"
        "    return c\n"
    )
    monkeypatch.chdir(tmp_path.parent)
    c = load_config(str(tmp_path / "mine.py"))
    assert isinstance(c, ml_collections.ConfigDict) and c.batch_size == 8
    assert c.pretrain.total_steps == load_config("shapes_detect:tiny").pretrain.total_steps


def test_run_settings_have_one_default_shared_by_both_tasks():
    from rovit_jax.detect_config import detect_defaults
    from rovit_jax.detection.settings import DetectRunSettings
    from rovit_jax.pretrain_config import pretrain_defaults
    from rovit_jax.run_config import RunSettings, run_settings

    # Both tasks' defaults are the typed run settings; only steps, batch and checkpoint period
    # differ.
    assert run_settings(pretrain_defaults()) == RunSettings()
    assert dataclasses.asdict(run_settings(detect_defaults())) == dataclasses.asdict(
        DetectRunSettings()
    )
    differ = {
        f.name
        for f in dataclasses.fields(RunSettings)
        if getattr(RunSettings(), f.name) != getattr(DetectRunSettings(), f.name)
    }
    assert differ == {"total_steps", "batch_size", "checkpoint_every"}
    # An older run's config without the field reads the same default everywhere.
    old = load_config("shapes_pretrain:tiny")
    with old.unlocked():
        del old["fsdp_min_size"], old["prefetch"], old["guard"]
    run = run_settings(old)
    assert run.fsdp_min_size == 2**14 and run.prefetch == 2
    from rovit_jax.tasks import pretrain

    pretrain.validate_config(old)  # missing run settings are not problems
