"""Config validation that reports every problem at once.

A long run should not fail on its fifth config mistake after the first four were fixed one launch
at a time. Validators therefore collect problems in a `Problems` and raise once:

  problems = Problems()
  size = check_int(problems, config, "pp.image_size", min_value=1)
  check_choice(problems, config, "loss.kind", ("focal", "sigmoid", "softmax"))
  problems.raise_if_any()  # one ConfigError (a ValueError) listing every problem, one per line

Each line reads "config key `<key>` = <value>: <why>". The `check_*` helpers read a dotted key,
add a problem instead of raising when the value has the wrong type or range, and return the
usable value or None, so checks that depend on it (divisibility, cross-field bounds) are skipped
rather than crashing on a bad type. Cross-field problems name the other key in their reason.

`check_mesh(config, num_devices)` reports, without building a mesh or compiling anything, when
`config.mesh` does not fit the device count or a batch is not divisible by the batch shards.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rovit_jax import paths
from rovit_jax.train.mesh import BATCH_AXES

# Reprs of offending values are cut to this many characters (a config list can be long).
_MAX_VALUE_REPR = 120


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


class ConfigError(ValueError):
    """A config has one or more problems; `problems` lists them as (key, value, why)."""

    def __init__(self, message: str, problems: Sequence[tuple[str, Any, str]]):
        super().__init__(message)
        self.problems = list(problems)


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a hostile object's __repr__ must not hide the real problem
        text = f"<{type(value).__name__}>"
    if len(text) > _MAX_VALUE_REPR:
        text = text[: _MAX_VALUE_REPR - 3] + "..."
    return text


def problem_line(key: str, value: Any, why: str) -> str:
    """The one-line description of a problem: "config key `key` = value: why"."""
    return f"config key `{key}` = {_short_repr(value)}: {why}"


class Problems:
    """Collects config problems; `raise_if_any` raises one ConfigError listing all of them."""

    def __init__(self) -> None:
        self._items: list[tuple[str, Any, str]] = []

    def add(self, key: str, value: Any, why: str) -> None:
        """Records that config key `key` (dotted) with value `value` is wrong because `why`."""
        self._items.append((str(key), value, str(why)))

    def check(self, ok: bool, key: str, value: Any, why: str) -> bool:
        """Adds the problem unless `ok`; returns `ok`."""
        if not ok:
            self.add(key, value, why)
        return bool(ok)

    def extend(self, other: Iterable[tuple[str, Any, str]], prefix: str = "") -> None:
        """Adds (key, value, why) triples, e.g. a nested config's, with `prefix` on each key."""
        for key, value, why in other:
            self.add(prefix + key, value, why)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[tuple[str, Any, str]]:
        return iter(list(self._items))

    def keys(self) -> list[str]:
        """The offending keys, in the order their problems were found."""
        return [key for key, _, _ in self._items]

    def lines(self) -> list[str]:
        return [problem_line(*item) for item in self._items]

    def message(self) -> str:
        """One line for a single problem; a count and one indented line per problem otherwise."""
        lines = self.lines()
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} config problems:\n" + "\n".join(f"  {line}" for line in lines)

    def raise_if_any(self) -> None:
        """Raises ConfigError (a ValueError) listing every problem, or returns if there is none."""
        if self._items:
            raise ConfigError(self.message(), self._items)


# ----------------------------------------------------------------------------------------------
# Reading keys.


def config_get(config: Any, key: str, default: Any = MISSING) -> Any:
    """The value at dotted `key` of a (nested) ConfigDict or mapping; `default` if absent."""
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError, IndexError):
            return default
    return node


def is_int(value: Any) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """An int or float (numpy's too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def range_text(min_value: Any, max_value: Any, min_exclusive: bool, max_exclusive: bool) -> str:
    """The bounds in words, e.g. "> 0.0 and <= 1.0" ("" without bounds)."""
    parts = []
    if min_value is not None:
        parts.append(f"{'>' if min_exclusive else '>='} {min_value}")
    if max_value is not None:
        parts.append(f"{'<' if max_exclusive else '<='} {max_value}")
    return " and ".join(parts)


def in_range(
    value: float, min_value: Any, max_value: Any, min_exclusive: bool, max_exclusive: bool
) -> bool:
    """Whether `value` lies within the bounds (None = unbounded on that side)."""
    if min_value is not None and (value <= min_value if min_exclusive else value < min_value):
        return False
    if max_value is not None and (value >= max_value if max_exclusive else value > max_value):
        return False
    return True


def _lookup(problems: Problems, config: Any, key: str, default: Any) -> Any:
    value = config_get(config, key, default)
    if value is MISSING:
        problems.add(key, value, "the key is missing from the config")
    return value


def check_int(
    problems: Problems,
    config: Any,
    key: str,
    *,
    min_value: int | None = None,
    max_value: int | None = None,
    default: Any = MISSING,
) -> int | None:
    """The integer at `key` (bools refused) within [min_value, max_value], or None + a problem."""
    value = _lookup(problems, config, key, default)
    if value is MISSING:
        return None
    bounds = range_text(min_value, max_value, False, False)
    need = "an integer" + (f" {bounds}" if bounds else "")
    if not is_int(value) or not in_range(int(value), min_value, max_value, False, False):
        problems.add(key, value, f"must be {need}")
        return None
    return int(value)


def check_number(
    problems: Problems,
    config: Any,
    key: str,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
    allow_none: bool = False,
    default: Any = MISSING,
) -> float | None:
    """The finite number at `key` within the bounds, or None + a problem (None allowed if asked)."""
    value = _lookup(problems, config, key, default)
    if value is MISSING or (allow_none and value is None):
        return None
    bounds = range_text(min_value, max_value, min_exclusive, max_exclusive)
    need = (
        "a finite number" + (f" {bounds}" if bounds else "") + (", or None" if allow_none else "")
    )
    if (
        not is_number(value)
        or not math.isfinite(float(value))
        or not in_range(float(value), min_value, max_value, min_exclusive, max_exclusive)
    ):
        problems.add(key, value, f"must be {need}")
        return None
    return float(value)


def check_bool(problems: Problems, config: Any, key: str, *, default: Any = MISSING) -> bool | None:
    """The bool at `key`, or None + a problem."""
    value = _lookup(problems, config, key, default)
    if value is MISSING:
        return None
    if not isinstance(value, (bool, np.bool_)):
        problems.add(key, value, "must be True or False")
        return None
    return bool(value)


def check_choice(
    problems: Problems,
    config: Any,
    key: str,
    choices: Sequence[Any],
    *,
    why: str | None = None,
    default: Any = MISSING,
) -> Any | None:
    """The value at `key` if it is one of `choices` (same type too), or None + a problem."""
    value = _lookup(problems, config, key, default)
    if value is MISSING:
        return None
    # Compare type and value so that True does not pass for 1, nor 1.0 for "1.0".
    if not any(type(value) is type(c) and value == c for c in choices):
        problems.add(key, value, why or f"choose one of {tuple(choices)}")
        return None
    return value


def check_str(
    problems: Problems,
    config: Any,
    key: str,
    *,
    nonempty: bool = False,
    why: str | None = None,
    default: Any = MISSING,
) -> str | None:
    """The string at `key` (None counts as ""), or None + a problem."""
    value = _lookup(problems, config, key, default)
    if value is MISSING:
        return None
    if value is None:
        value = ""
    if not isinstance(value, str):
        problems.add(key, value, "must be a string")
        return None
    if nonempty and not value.strip():
        problems.add(key, value, why or "must not be empty")
        return None
    return value


def _check_regex(problems: Problems, key: str, pattern: Any) -> bool:
    if not isinstance(pattern, str):
        problems.add(key, pattern, "must be a regular expression (a string)")
        return False
    try:
        re.compile(pattern)
    except re.error as e:
        problems.add(key, pattern, f"is not a valid regular expression ({e})")
        return False
    return True


def check_path(
    problems: Problems,
    config: Any,
    key: str,
    *,
    kind: str,
    needed_for: str,
    must_exist: bool = True,
) -> str | None:
    """`path_problems` on the value of `key` in `config` ("" when absent)."""
    value = config_get(config, key, "")
    return path_problems(
        problems, key, value, kind=kind, needed_for=needed_for, must_exist=must_exist
    )


def path_problems(
    problems: Problems,
    key: str,
    value: Any,
    *,
    kind: str,
    needed_for: str,
    must_exist: bool = True,
) -> str | None:
    """Checks that config key `key`'s `value` names a path: set, and an existing file or
    directory, local or in a bucket (through rovit_jax.paths, as the readers will open it).
    Returns the path, or None with the problem added.

    Args:
      kind: "file" or "dir".
      needed_for: what needs the path, quoted in the problem (e.g. "data.name='lvis'").
      must_exist: check that it exists (a store that cannot be reached is a problem too).
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    if value is None or (isinstance(value, str) and not value.strip()):
        problems.add(key, value, f"is required for {needed_for}")
        return None
    if not isinstance(value, (str, os.PathLike)):
        problems.add(key, value, f"must be a path (a string), needed for {needed_for}")
        return None
    path = os.fspath(value)
    if must_exist:
        try:
            exists = paths.isfile(path) if kind == "file" else paths.isdir(path)
        except Exception as e:  # noqa: BLE001 - any failure to reach the store is reported alike
            problems.add(key, value, f"cannot be checked ({type(e).__name__}: {e})")
            return None
        if not exists:
            what = "file" if kind == "file" else "directory"
            problems.add(key, value, f"no such {what} (needed for {needed_for})")
            return None
    return path


# ----------------------------------------------------------------------------------------------
# Settings shared by every task.


def is_list(value: Any) -> bool:
    """A list or tuple (not a string)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def sharding_rules_problems(problems: Problems, rules: Sequence[Any]) -> None:
    """Adds a problem for each of `sharding_rules` (a list) that is not a (regex, spec) pair."""
    for i, rule in enumerate(rules):
        key = f"sharding_rules[{i}]"
        if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
            problems.add(key, rule, "must be a (regex, spec) pair")
            continue
        pattern, spec = rule
        _check_regex(problems, key, pattern)
        if not _valid_spec(spec):
            problems.add(
                key,
                rule,
                "spec must be 'replicate', 'fsdp' or a tuple of mesh axis names / None per "
                "dimension",
            )


def logical_axis_rules_problems(problems: Problems, rules: Sequence[Any], mesh: Any = None) -> None:
    """Adds a problem for each of `logical_axis_rules` (a list) that is not a (known logical
    axis, mesh axis of `mesh` or None) pair."""
    from rovit_jax.models.logical_axes import LOGICAL_AXES

    key = "logical_axis_rules"
    try:
        mesh_names = {str(name) for name, _ in mesh} | set(BATCH_AXES)  # required anyway
    except (TypeError, ValueError):  # a malformed mesh is reported by mesh_problems
        mesh_names = None
    for i, rule in enumerate(rules):
        if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
            problems.add(f"{key}[{i}]", rule, "must be a (logical axis name, mesh axis) pair")
            continue
        name, axis = rule
        problems.check(
            name in LOGICAL_AXES, f"{key}[{i}]", rule, f"logical axis must be one of {LOGICAL_AXES}"
        )
        if axis is not None and mesh_names is not None:
            problems.check(
                axis in mesh_names,
                f"{key}[{i}]",
                rule,
                f"mesh axis must be None or one of `mesh`'s axes {sorted(mesh_names)}",
            )


def _valid_spec(spec: Any) -> bool:
    if isinstance(spec, str):
        return spec in ("replicate", "fsdp")
    if not isinstance(spec, Sequence):
        return False
    for axis in spec:
        if axis is None or isinstance(axis, str):
            continue
        if isinstance(axis, Sequence) and all(isinstance(a, str) for a in axis):
            continue
        return False
    return True


# ----------------------------------------------------------------------------------------------
# The mesh.


def _mesh_axes(problems: Problems, config: Any) -> list[tuple[str, int]] | None:
    """The (name, size) axes of `config.mesh` if well-formed (structure only), else None."""
    axes = config_get(config, "mesh")
    if axes is MISSING:
        problems.add("mesh", axes, "the key is missing from the config")
        return None
    well_formed = (
        not isinstance(axes, (str, bytes))
        and isinstance(axes, Sequence)
        and len(axes) > 0
        and all(
            not isinstance(a, (str, bytes))
            and isinstance(a, Sequence)
            and len(a) == 2
            and isinstance(a[0], str)
            and is_int(a[1])
            for a in axes
        )
    )
    if not well_formed:
        problems.add("mesh", axes, "must be a non-empty list of (axis name, integer size) pairs")
        return None
    out = [(str(name), int(size)) for name, size in axes]
    names = [name for name, _ in out]
    sizes = [size for _, size in out]
    ok = True
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        ok = problems.check(False, "mesh", axes, f"duplicate axis names {dup}")
    missing = [a for a in BATCH_AXES if a not in names]
    if missing:
        ok = problems.check(False, "mesh", axes, f"axes {missing} are required (got {names})")
    if any(s < 1 and s != -1 for s in sizes):
        ok = problems.check(False, "mesh", axes, "axis sizes must be >= 1, or -1 for the rest")
    if sizes.count(-1) > 1:
        ok = problems.check(False, "mesh", axes, "at most one axis size may be -1")
    return out if ok else None


def mesh_problems(
    problems: Problems,
    config: Any,
    num_devices: int | None = None,
    num_processes: int = 1,
) -> None:
    """Adds the problems of `config.mesh` (and, given the device count, of the batch sizes).

    Without `num_devices` only the structure is checked (names, sizes, at most one -1). With
    it, also that the sizes multiply to `num_devices` (or divide it, with a -1 axis), and that
    `batch_size` and `eval.batch_size` are divisible by the batch shards (the product of the
    `data` and `fsdp` axes) and by the `num_processes` hosts.
    """
    axes = _mesh_axes(problems, config)
    if axes is None or num_devices is None:
        return
    sizes = [size for _, size in axes]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            problems.add(
                "mesh",
                config_get(config, "mesh"),
                f"{num_devices} devices cannot be split into axes of sizes {sizes} (the fixed "
                f"sizes multiply to {known})",
            )
            return
        sizes[sizes.index(-1)] = num_devices // known
    resolved = {name: size for (name, _), size in zip(axes, sizes)}
    if int(np.prod(sizes)) != num_devices:
        problems.add(
            "mesh",
            config_get(config, "mesh"),
            f"axis sizes {resolved} multiply to {int(np.prod(sizes))}, but there are "
            f"{num_devices} devices",
        )
        return
    batch_problems(problems, config, resolved, num_processes)


def batch_problems(
    problems: Problems, config: Any, mesh_shape: Mapping[str, int], num_processes: int = 1
) -> None:
    """Adds a problem for each of `batch_size` and `eval.batch_size` that the batch shards of a
    mesh of `mesh_shape` (the product of its `data` and `fsdp` axes), or the hosts, do not
    divide."""
    resolved = dict(mesh_shape)
    shards = int(np.prod([resolved.get(a, 1) for a in BATCH_AXES]))
    for key in ("batch_size", "eval.batch_size"):
        value = config_get(config, key)
        if not is_int(value) or value < 1:
            continue  # reported by the task's validate_config
        problems.check(
            value % shards == 0,
            key,
            value,
            f"must be divisible by the {shards} batch shards of the mesh {resolved}",
        )
        if num_processes > 1:
            problems.check(
                value % num_processes == 0,
                key,
                value,
                f"must be divisible by the {num_processes} hosts",
            )


def check_batches_fit_mesh(config: Any, mesh_shape: Mapping[str, int]) -> None:
    """Raises ConfigError unless the mesh's batch shards divide `batch_size` and
    `eval.batch_size` (what a task checks against the mesh it is given)."""
    problems = Problems()
    batch_problems(problems, config, mesh_shape)
    problems.raise_if_any()


def check_mesh(config: Any, num_devices: int, num_processes: int = 1) -> None:
    """Raises ConfigError listing every way `config.mesh` / the batch sizes misfit the devices.

    Nothing is built or compiled: this only does arithmetic on the config, so it can run
    before any device work (see `mesh_problems` for the rules).
    """
    if not is_int(num_devices) or num_devices < 1:
        raise ValueError(f"num_devices must be an integer >= 1, got {num_devices!r}")
    if not is_int(num_processes) or num_processes < 1:
        raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
    problems = Problems()
    mesh_problems(problems, config, int(num_devices), int(num_processes))
    problems.raise_if_any()
