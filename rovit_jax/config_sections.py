"""Typed config sections: one frozen dataclass per section holds its fields' defaults, allowed
values and checks.

A section class names its ConfigDict section in `SECTION` and declares each field with
`setting(default, ...)`:

  @dataclasses.dataclass(frozen=True)
  class RoISettings(Section):
      SECTION: ClassVar[str] = "roi"
      fg_iou: float = setting(0.5, min_value=0.0, max_value=1.0)
      background_weight: float = setting(0.9, min_value=0.0, older=1.0)

From that one definition come:
  * `section_defaults(cls)`: the ConfigDict section a `*_defaults()` function puts in a config
    (fields typed `X | None` become FieldReferences of X, so the command line can set them);
  * `resolve_section(cls, config, problems)`: the typed value of `config.<SECTION>`, read once at
    start. Each field is checked by its annotation (int, float, bool, str, tuple[int, ...],
    tuple[float, ...], tuple[str, ...], a pair tuple[float, float], (regex, factor) rules
    tuple[tuple[str, float], ...], optionally `| None`), its `choices`, its bounds and (`regex`)
    that its strings compile, then the section's `ORDERED` pairs; every problem is added to
    `problems` with its dotted key, so validation still reports all of them at once;
  * `older_defaults(cls)`: `older` values, those a run config written before a field existed was
    trained and evaluated with. A field without one is required in every config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import ml_collections

from rovit_jax import config_check as cc

__all__ = [
    "Section",
    "add_sections",
    "older_defaults",
    "redefault",
    "resolve_section",
    "resolve_sections",
    "resolved_sections",
    "section_defaults",
    "setting",
]

_NO_OLDER = object()


def setting(
    default: Any,
    *,
    choices: Sequence[Any] = (),
    min_value: float | None = None,
    max_value: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
    nonempty: bool = False,
    ordered: bool = False,
    regex: bool = False,
    validate: Callable[[Any], Any] | None = None,
    older: Any = _NO_OLDER,
    older_from: str | None = None,
) -> Any:
    """A section field: its default, allowed values, bounds and the value older run configs
    that lack it were run with (`older`, or the value of the key `older_from`).

    A field annotated bare `tuple` is only required to be a list (its nested lists become
    tuples): its structure has a validator of its own (the mesh and sharding rules,
    `run_config.run_problems`). A field annotated `object` takes any value (lists become
    tuples) and relies on `validate` (a path or a list of paths, `data.train_files`).

    Bounds apply to a number, to each element of a tuple, or to each rule's factor; `nonempty`
    to tuples of any length (`tuple[float, ...]`); `ordered` to pairs (`tuple[float, float]`):
    low <= high; `regex` to strings (`tuple[str, ...]`): each must compile. The strings of
    (regex, factor) rules are always regexes. `validate(value)`, called on a value of the right
    type, raises ValueError / TypeError / KeyError with the reason where the value is refused
    (a model variant's name, parsed by the module that owns the variants).
    """
    meta = dict(
        choices=tuple(choices),
        min_value=min_value,
        max_value=max_value,
        min_exclusive=min_exclusive,
        max_exclusive=max_exclusive,
        nonempty=nonempty,
        ordered=ordered,
        regex=regex,
        validate=validate,
        older=older,
        older_from=older_from,
    )
    return dataclasses.field(default=default, metadata=meta)


def redefault(cls: type, name: str, default: Any) -> Any:
    """Field `name` of section `cls` with another default (same checks and older value): for a
    subclass whose task starts from other values (`DetectOptimSettings.lr`)."""
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return dataclasses.field(default=default, metadata=f.metadata)


class Section:
    """Base of typed sections: `SECTION` names the ConfigDict section ("" for the config's top
    level, as the run settings; `NAME` then names it in a resolved dict); `ORDERED` lists field
    pairs (low, high) that must satisfy low <= high (checked where both fields are valid)."""

    SECTION: ClassVar[str] = ""
    NAME: ClassVar[str] = ""
    ORDERED: ClassVar[tuple[tuple[str, str], ...]] = ()

    @classmethod
    def key(cls, name: str) -> str:
        """The dotted config key of field `name`."""
        return f"{cls.SECTION}.{name}" if cls.SECTION else name

    @classmethod
    def section_name(cls) -> str:
        """This section's key in the dict `resolve_sections` returns."""
        return cls.SECTION or cls.NAME

    @classmethod
    def checked(cls, **values: Any) -> Any:
        """`cls` from field values (the others at their defaults), checked as `resolve_section`
        checks a config's section: a ConfigError names each bad (or unknown) key."""
        names = [f.name for f in dataclasses.fields(cls)]
        problems = cc.Problems()
        for name in values:
            if name not in names:
                problems.add(cls.key(name), values[name], f"unknown key; the keys are {names}")
        problems.raise_if_any()
        tree: dict[str, Any] = {
            f.name: values.get(f.name, f.default) for f in dataclasses.fields(cls)
        }
        for part in reversed(cls.SECTION.split(".") if cls.SECTION else []):
            tree = {part: tree}
        section = resolve_section(cls, tree, problems)
        problems.raise_if_any()
        return section

    def __post_init__(self) -> None:
        # Built directly (not through resolve_section), a value outside its choices would
        # otherwise fall through a mode switch silently.
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices", ())
            value = getattr(self, f.name)
            if choices and not any(type(value) is type(c) and value == c for c in choices):
                raise ValueError(
                    f"config key `{self.key(f.name)}` = {value!r}: choose one of {choices}"
                )


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """{field: (base type, optional)} from the annotations of `cls`'s dataclass fields."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name in (f.name for f in dataclasses.fields(cls)):
        hint = hints[name]
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
        if optional:
            (hint,) = [a for a in args if a is not type(None)]
        out[name] = (hint, optional)
    return out


def section_defaults(cls: type[Section]) -> ml_collections.ConfigDict:
    """The ConfigDict section of `cls`'s defaults."""
    d = ml_collections.ConfigDict()
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        base, optional = types_[f.name]
        if optional:
            field_type = typing.get_origin(base) or base
            d[f.name] = ml_collections.FieldReference(f.default, field_type=field_type)
        else:
            d[f.name] = f.default
    return d


def older_defaults(cls: type[Section]) -> dict[str, Any]:
    """{dotted key: value} of the fields that older run configs may lack (`older=`)."""
    return {
        cls.key(f.name): f.metadata["older"]
        for f in dataclasses.fields(cls)
        if f.metadata["older"] is not _NO_OLDER
    }


def _compiles(pattern: Any) -> bool:
    try:
        re.compile(pattern)
    except (re.error, TypeError):
        return False
    return True


def _element_ok(value: Any, base: Any, m: dict) -> bool:
    if base is str:
        return isinstance(value, str) and (not m["regex"] or _compiles(value))
    if typing.get_origin(base) is tuple:  # a (regex, factor) rule
        return (
            cc.is_list(value)
            and len(value) == 2
            and isinstance(value[0], str)
            and _compiles(value[0])
            and _element_ok(value[1], float, m)
        )
    if base is int:
        ok = cc.is_int(value)
    elif base is float:
        ok = cc.is_number(value) and math.isfinite(float(value))
    else:
        return False
    return ok and cc.in_range(
        float(value), m["min_value"], m["max_value"], m["min_exclusive"], m["max_exclusive"]
    )


def _as_type(value: Any, base: Any) -> Any:
    """An element already checked by `_element_ok`, as `base` (rules become tuples)."""
    if typing.get_origin(base) is tuple:
        return (str(value[0]), float(value[1]))
    return base(value)


def _need(base: type, optional: bool, m: dict) -> str:
    bounds = cc.range_text(m["min_value"], m["max_value"], m["min_exclusive"], m["max_exclusive"])
    bounds = f" {bounds}" if bounds else ""
    if base is tuple:
        text = "a list"
    elif typing.get_origin(base) is tuple:
        (elem,) = {a for a in typing.get_args(base) if a is not Ellipsis}
        if typing.get_origin(elem) is tuple:
            text = f"a list of (regex, factor) pairs, factors finite numbers{bounds}"
            return "must be " + text + (", or None" if optional else "")
        noun = {int: "integers", str: "strings", float: "finite numbers"}[elem]
        if elem is str and m["regex"]:
            noun = "regexes"
        if Ellipsis in typing.get_args(base):
            text = "a " + ("non-empty " if m["nonempty"] else "") + f"list of {noun}{bounds}"
        else:
            order = " with low <= high" if m["ordered"] else ""
            text = f"a pair (low, high) of {noun}{bounds}{order}"
    elif base is int:
        text = f"an integer{bounds}"
    elif base is float:
        text = f"a finite number{bounds}"
    elif base is bool:
        text = "True or False"
    else:
        text = "a string"
    return "must be " + text + (", or None" if optional else "")


def _frozen(value: Any) -> Any:
    """Nested lists (as JSON gives them back) as nested tuples."""
    return tuple(_frozen(v) for v in value) if cc.is_list(value) else value


def _checked(value: Any, base: type, optional: bool, m: dict) -> tuple[bool, Any]:
    """(ok, the value as the field's type)."""
    if value is None:
        return optional, None
    if base is object:  # any value; its `validate` checks it
        return True, _frozen(value)
    if base is tuple:  # structure checked by its own validator (`setting`'s docstring)
        return cc.is_list(value), _frozen(value) if cc.is_list(value) else value
    if m["choices"]:
        # Type and value, so that True does not pass for 1, nor 1.0 for "1.0".
        return any(type(value) is type(c) and value == c for c in m["choices"]), value
    if typing.get_origin(base) is tuple:
        (elem,) = {a for a in typing.get_args(base) if a is not Ellipsis}
        args = typing.get_args(base)
        ok = (
            cc.is_list(value)
            and not (m["nonempty"] and len(value) == 0)
            and (Ellipsis in args or len(value) == len(args))
            and all(_element_ok(v, elem, m) for v in value)
        )
        if ok and m["ordered"]:
            ok = value[0] <= value[1]
        return ok, tuple(_as_type(v, elem) for v in value) if ok else value
    if base is bool:
        return isinstance(value, bool), value
    if base is str:
        return isinstance(value, str), value
    ok = _element_ok(value, base, m)
    return ok, base(value) if ok else value


def resolve_section(cls: type[Section], config: Any, problems: cc.Problems) -> Section | None:
    """`config.<cls.SECTION>` as a checked `cls`, or None with its problems added."""
    values: dict[str, Any] = {}
    ok = True
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        key = cls.key(f.name)
        m = f.metadata
        if m["older_from"] is not None:
            fallback = cc.config_get(config, m["older_from"])
        elif m["older"] is not _NO_OLDER:
            fallback = m["older"]
        else:
            fallback = cc.MISSING
        value = cc.config_get(config, key, fallback)
        if value is cc.MISSING:
            problems.add(key, value, "the key is missing from the config")
            ok = False
            continue
        base, optional = types_[f.name]
        good, value = _checked(value, base, optional, m)
        if not good:
            why = f"choose one of {m['choices']}" if m["choices"] else _need(base, optional, m)
            problems.add(key, value, why)
            ok = False
            continue
        if m["validate"] is not None and value is not None:
            try:
                m["validate"](value)
            except (ValueError, TypeError, KeyError) as e:
                problems.add(key, value, str(e))
                ok = False
                continue
        values[f.name] = value
    for low, high in cls.ORDERED:
        if low in values and high in values and values[low] > values[high]:
            problems.add(cls.key(low), values[low], f"must be <= {cls.key(high)} = {values[high]}")
            ok = False
    return cls(**values) if ok else None


def add_sections(config: Any, classes: Sequence[type[Section]]) -> Any:
    """Puts the default section of each of `classes` into `config` (in place; returns it); a
    top-level section's fields go to the config's top level, a dotted section ("model.image")
    inside its parent (list the parent's class first)."""
    for cls in classes:
        if cls.SECTION:
            # A dotted section ("model.image") goes inside its parent, made if missing.
            *parents, name = cls.SECTION.split(".")
            parent = config
            for p in parents:
                if p not in parent:
                    parent[p] = ml_collections.ConfigDict()
                parent = parent[p]
            parent[name] = section_defaults(cls)
        else:
            for name, value in section_defaults(cls).items(preserve_field_references=True):
                config[name] = value
    return config


def resolve_sections(
    classes: Sequence[type[Section]], config: Any, problems: cc.Problems
) -> dict[str, Any]:
    """{section: typed settings, or None where that section has problems (added to
    `problems`)} for each of `classes`."""
    return {cls.section_name(): resolve_section(cls, config, problems) for cls in classes}


def resolved_sections(classes: Sequence[type[Section]], config: Any) -> dict[str, Any]:
    """{section: typed settings} for each of `classes`; ConfigError listing every problem."""
    problems = cc.Problems()
    sections = resolve_sections(classes, config, problems)
    problems.raise_if_any()
    return sections
