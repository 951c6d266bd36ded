"""Typed config sections (rovit_jax.config_sections) and the detection sections built on them."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import ml_collections
import pytest

from rovit_jax import config_check as cc
from rovit_jax.config_files import load_config
from rovit_jax.config_sections import (
    Section,
    older_defaults,
    resolve_section,
    section_defaults,
    setting,
)
from rovit_jax.detect_config import detect_defaults
from rovit_jax.detection import settings
from rovit_jax.pretrain_config import pretrain_defaults
from rovit_jax.pretrain_settings import PRETRAIN_SECTIONS, pretrain_settings
from rovit_jax.tasks import detect


@dataclasses.dataclass(frozen=True)
class _Demo(Section):
    SECTION: ClassVar[str] = "demo"
    ORDERED: ClassVar = (("low", "high"),)

    mode: str = setting("a", choices=("a", "b"))
    count: int = setting(3, min_value=1)
    low: float = setting(0.2, min_value=0.0, max_value=1.0)
    high: float = setting(0.8, min_value=0.0, max_value=1.0)
    sizes: tuple[float, ...] = setting((1.0,), min_value=0.0, min_exclusive=True, nonempty=True)
    temperature: float | None = setting(None, min_value=0.0, min_exclusive=True)
    flag: bool = setting(True, older=False)
    copy: float = setting(0.5, older_from="demo.low")
    area: tuple[float, float] = setting(
        (0.1, 1.0), min_value=0.0, max_value=1.0, min_exclusive=True, ordered=True
    )


def _config(**demo):
    """A config as a run's config.json reads back (values of any type, as the user wrote them)."""
    return ml_collections.ConfigDict({"demo": {**section_defaults(_Demo).to_dict(), **demo}})


def _resolve(config):
    p = cc.Problems()
    return resolve_section(_Demo, config, p), {k: why for k, _, why in p}


def test_defaults_round_trip_and_values_are_typed():
    got, problems = _resolve(_config())
    assert problems == {} and got == _Demo()
    c = _config(count=5, sizes=[1, 2], temperature=2, area=[0.5, 1])  # as JSON / the CLI give
    got, _ = _resolve(c)
    assert got.sizes == (1.0, 2.0) and type(got.sizes[0]) is float and got.area == (0.5, 1.0)
    assert got.temperature == 2.0 and type(got.temperature) is float and got.count == 5
    # An optional field is a FieldReference of its type: the command line can set it.
    assert section_defaults(_Demo).get_ref("temperature").get_type() is float


def test_every_problem_is_named_with_its_key():
    c = _config(mode="c", count=0, sizes=[], low=0.9, high=0.4, flag=1, temperature=-1.0)
    got, problems = _resolve(c)
    assert got is None
    assert set(problems) == {
        "demo.mode",
        "demo.count",
        "demo.sizes",
        "demo.temperature",
        "demo.flag",
        "demo.low",
    }
    assert problems["demo.mode"] == "choose one of ('a', 'b')"
    assert problems["demo.count"] == "must be an integer >= 1"
    assert "non-empty list" in problems["demo.sizes"]
    assert problems["demo.temperature"] == "must be a finite number > 0.0, or None"
    assert problems["demo.low"] == "must be <= demo.high = 0.4"
    # A bad field of a pair skips the ordering check instead of comparing against a default.
    _, problems = _resolve(_config(low="x", high=0.1))
    assert set(problems) == {"demo.low"}
    # bools are not integers, 1.0 is not "1.0"
    _, problems = _resolve(_config(count=True, mode=1.0))
    assert set(problems) == {"demo.count", "demo.mode"}
    for area in [(0.6, 0.5), (0.0, 0.5), (0.5, 1.5), (0.1, 0.2, 0.3), "0.1,0.2"]:
        _, problems = _resolve(_config(area=area))
        assert problems == {
            "demo.area": "must be a pair (low, high) of finite numbers > 0.0 and <= 1.0 "
            "with low <= high"
        }, area


def test_a_section_built_directly_refuses_values_outside_its_choices():
    assert _Demo(mode="b").mode == "b"
    with pytest.raises(ValueError, match=r"`demo.mode` = 'c': choose one of \('a', 'b'\)"):
        _Demo(mode="c")
    with pytest.raises(ValueError, match="infer.fusion"):
        settings.InferSettings(fusion="geometric")


def test_missing_fields_take_older_values_or_are_reported():
    c = _config(low=0.3)
    del c.demo["flag"], c.demo["copy"]
    got, problems = _resolve(c)
    assert problems == {} and got.flag is False and got.copy == 0.3
    assert older_defaults(_Demo) == {"demo.flag": False}
    del c.demo["count"]
    _, problems = _resolve(c)
    assert problems == {"demo.count": "the key is missing from the config"}


def test_detection_defaults_are_the_typed_sections():
    sections = settings.detection_settings(detect_defaults())
    for cls in settings.DETECTION_SECTIONS:
        assert sections[cls.SECTION] == cls(), cls.SECTION
        built = detect_defaults()[cls.SECTION].to_dict()
        own = {f.name for f in dataclasses.fields(cls)}  # a subsection (data.world) aside
        assert {k: v for k, v in built.items() if k in own} == section_defaults(cls).to_dict()
        assert set(built) - own <= {"world"}
    # The task's compat table is the sections' older values, so the two cannot drift apart.
    assert detect.PRE_AUTHORS_DEFAULTS["rpn.box_coding"] == "log"
    assert detect.PRE_AUTHORS_DEFAULTS is settings.OLDER_DEFAULTS


def test_pretraining_defaults_are_the_typed_sections():
    sections = pretrain_settings(pretrain_defaults())
    for cls in PRETRAIN_SECTIONS:
        assert sections[cls.SECTION] == cls(), cls.SECTION
    shipped = pretrain_settings(load_config("vit_b16_224_pretrain"))
    assert shipped["pp"].crop_scale == (0.9, 1.0) and shipped["loss"].kind == "focal"


@pytest.mark.parametrize("spec", ["shapes_detect", "lvis_detect", "ov_coco_detect"])
def test_shipped_detection_configs_resolve(spec):
    config = load_config(spec)
    cfg = detect.rcnn_config(config)
    assert cfg.roi.batch_per_image == config.roi.batch_per_image
    assert cfg.infer.vlm_temperature == config.infer.vlm_temperature
    assert cfg.rpn.aspect_ratios == tuple(config.rpn.aspect_ratios)
    hash(cfg)  # a static argument of jitted functions


def test_rcnn_config_raises_with_every_problem():
    c = detect_defaults()
    c.rpn.objectness = "iou"
    c.roi.fg_iou = 1.5
    c.infer.vlm_window_size = 0
    with pytest.raises(cc.ConfigError) as e:
        detect.rcnn_config(c)
    assert [k for k, _, _ in e.value.problems] == [
        "rpn.objectness",
        "roi.fg_iou",
        "infer.vlm_window_size",
    ]


@dataclasses.dataclass(frozen=True)
class _Top(Section):
    NAME: ClassVar[str] = "top"

    steps: int = setting(10, min_value=0)
    rules: tuple = setting((("a", 1),))  # structure checked elsewhere: only a list


@dataclasses.dataclass(frozen=True)
class _Inner(Section):
    SECTION: ClassVar[str] = "outer.inner"

    name: str = setting("ok", validate=lambda v: None if v.islower() else int("not lower"))


def test_top_level_and_dotted_sections_and_validators():
    from rovit_jax.config_sections import add_sections, resolve_sections

    c = add_sections(ml_collections.ConfigDict(), (_Top, _Inner))
    assert c.steps == 10 and c.rules == (("a", 1),) and c.outer.inner.name == "ok"
    problems = cc.Problems()
    got = resolve_sections((_Top, _Inner), c, problems)
    assert got == {"top": _Top(), "outer.inner": _Inner()} and not problems
    c = ml_collections.ConfigDict({"steps": -1, "rules": "x", "outer": {"inner": {"name": "UP"}}})
    problems = cc.Problems()
    got = resolve_sections((_Top, _Inner), c, problems)
    assert got == {"top": None, "outer.inner": None}
    keys = {key: why for key, _, why in problems}
    assert set(keys) == {"steps", "rules", "outer.inner.name"}
    assert "invalid literal" in keys["outer.inner.name"]  # the validator's own reason
    # JSON gives nested lists back; the structure-checked field holds nested tuples.
    c = ml_collections.ConfigDict({"steps": 3, "rules": [["b", 2]]})
    assert resolve_sections((_Top,), c, cc.Problems())["top"].rules == (("b", 2),)


def test_run_settings_name_every_bad_key():
    from rovit_jax.run_config import run_problems

    c = pretrain_defaults()
    with c.ignore_type():
        c.seed, c.prefetch, c.compute_dtype, c.guard.policy = 1.5, -1, "float16", "ignore"
        c.sharding_rules = ((".*", "everywhere"),)
    problems = cc.Problems()
    assert run_problems(problems, c) is None
    keys = sorted(problems.keys())
    assert keys == ["compute_dtype", "guard.policy", "prefetch", "seed", "sharding_rules[0]"]
