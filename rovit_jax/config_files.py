"""Experiment configs from files: the one loader used by the CLI tools, tests and benchmarks.

A config is a Python file with `get_config(arg)` returning an `ml_collections.ConfigDict`
(`python -m rovit_jax.main --config=configs/X.py:arg` loads it through ml_collections), or a run's
`config.json`. `load_config` accepts

  "shapes_detect"                      a config shipped in this repository's configs/ folder,
  "shapes_detect:tiny"                 ... with get_config's argument,
  "path/to/my_config.py[:arg]"         any config file,
  "runs/x/config.json"                 the config a run was launched with,

plus dotted-key overrides: `load_config("shapes_detect:tiny", **{"optim.lr": 1e-3})`.

A config that builds on another one loads it with `load_sibling(__file__, "shapes_pretrain")`,
which imports the file next to it by path, so no config touches `sys.path`.
"""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any

import ml_collections

from rovit_jax import paths

__all__ = ["CONFIG_DIR", "load_config", "load_sibling", "apply_overrides", "config_path"]

# The repository's configs/ folder (next to the package in a source checkout or editable install).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

_modules: dict[str, types.ModuleType] = {}


def _import_file(path: str) -> types.ModuleType:
    """Imports a config file by path (once per process), without touching sys.path."""
    path = os.path.abspath(path)
    if path in _modules:
        return _modules[path]
    name = "rovit_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} is not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _modules[path] = module
    return module


def load_sibling(file: str, name: str) -> types.ModuleType:
    """The config (or helper) module `name`, e.g. "shapes_pretrain", in the folder of `file`."""
    return _import_file(os.path.join(os.path.dirname(os.path.abspath(file)), name + ".py"))


def config_path(name_or_path: str) -> str:
    """A config file's path: an existing path as given, else `CONFIG_DIR/<name>[.py]`.

    A run's `config.json` may also be in a bucket (`gs://.../config.json`); Python config files
    are code, imported from local disk.

    Raises FileNotFoundError naming both places looked in.
    """
    if paths.is_remote(name_or_path) and name_or_path.endswith(".json"):
        if paths.isfile(name_or_path):
            return name_or_path
        raise FileNotFoundError(f"no config file {name_or_path!r}")
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = os.path.join(CONFIG_DIR, name_or_path)
    if not shipped.endswith((".py", ".json")):
        shipped += ".py"
    if os.path.isfile(shipped):
        return shipped
    raise FileNotFoundError(f"no config file {name_or_path!r} (nor {shipped})")


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
    """Sets dotted keys ("optim.lr") in place; a key whose parent block is missing is an error.

    A value of another type than the field's replaces the field (as a new run config would),
    rather than failing on ConfigDict's type check.
    """
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise KeyError(f"config override `{key}`: no block `{'.'.join(parents[: i + 1])}`")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise KeyError(f"config override `{key}`: `{'.'.join(parents)}` is not a block")
        try:
            node[leaf] = value
        except TypeError:
            with node.unlocked():
                del node[leaf]
                node[leaf] = value
    return config


def load_config(spec: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A config from `name[:arg]`, `path.py[:arg]` or `config.json`, with dotted-key overrides.

    Raises:
      FileNotFoundError: no such config file (named).
      ValueError: the file is not a config (no `get_config`).
      KeyError: an override names a block the config does not have.
    """
    scheme, sep, rest = spec.rpartition("://")  # a bucket's config.json: gs://.../config.json
    name, _, arg = rest.partition(":")
    path = config_path(scheme + sep + name)
    if path.endswith(".json"):
        if arg:
            raise ValueError(f"config {spec!r}: a config.json takes no argument")
        config = ml_collections.ConfigDict(paths.read_json(path))
    else:
        module = _import_file(path)
        if not callable(getattr(module, "get_config", None)):
            raise ValueError(f"config file {path} has no get_config(arg)")
        config = module.get_config(arg) if arg else module.get_config()
    return apply_overrides(config, overrides)
