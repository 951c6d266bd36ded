"""Device mesh and regex sharding rules.

Sharding is expressed once, in the config: `mesh` names the axes and their sizes, `sharding_rules`
maps parameter paths (regexes) to partition specs. Models never mention devices.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Axes over which the batch dimension is split. FSDP shards parameters AND the batch, as in
# ZeRO-3: every device sees a distinct slice of the batch.
BATCH_AXES = ("data", "fsdp")


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh from `[(name, size), ...]`; one size may be -1 (all remaining devices).

    Raises ValueError naming `mesh` when the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = [str(name) for name, _ in axes]
    sizes = [int(size) for _, size in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"config key `mesh`: duplicate axis names in {names}")
    missing = [a for a in BATCH_AXES if a not in names]
    if missing:
        raise ValueError(f"config key `mesh`: axes {missing} are required (got {names})")
    if sizes.count(-1) > 1:
        raise ValueError(f"config key `mesh`: at most one axis size may be -1, got {list(axes)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"config key `mesh`: {len(devices)} devices cannot be split into {list(axes)}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"config key `mesh`: axis sizes {dict(zip(names, sizes))} multiply to "
            f"{int(np.prod(sizes))}, but there are {len(devices)} devices"
        )
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (AssertionError, ValueError, NotImplementedError):
        # Physical-topology-aware placement is unavailable for some device sets (e.g. subsets);
        # a plain reshape is correct, just possibly slower on real interconnects.
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, tuple(names))


def batch_spec(mesh: Mesh) -> P:
    """Partition spec for the leading (batch) dimension of input arrays."""
    return P(tuple(a for a in BATCH_AXES if a in mesh.axis_names))


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def tree_paths(tree: Any) -> list[str]:
    """'/'-joined key paths of a pytree's leaves, in leaf order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        if hasattr(k, "key"):
            parts.append(str(k.key))
        elif hasattr(k, "name"):
            parts.append(str(k.name))
        elif hasattr(k, "idx"):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh, axis: str, min_size: int) -> P:
    """Shards the largest dimension divisible by the axis size; small arrays stay replicated."""
    n = mesh.shape[axis]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in np.argsort(shape)[::-1]:
        if shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = axis
            return P(*spec)
    return P()


def infer_shardings(
    abstract_tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
    *,
    fsdp_min_size: int,
    logical_axes: Mapping[str, tuple[str | None, ...]] | None = None,
    logical_rules: Sequence[tuple[str, Any]] = (),
) -> Any:
    """NamedShardings for every leaf of `abstract_tree`.

    Each leaf takes the first of `rules` (`(regex, spec)` pairs) whose regex `re.search`-matches
    its path; leaves matched by none are replicated. A spec is
      * a tuple of mesh axis names / None for the trailing dimensions (leading ones, e.g. the
        layer axis of scanned blocks, are not split): that spec, as written;
      * "replicate": not split;
      * "fsdp": split as the logical axis names its module gave it say (`logical_axes`, {parameter
        path: one name or None per dimension}, mapped to mesh axes by `logical_rules`, `(logical
        name, mesh axis or None)` pairs: MaxText's pattern), where they map to a mesh axis;
        otherwise its largest dimension divisible by the `fsdp` axis. Arrays with fewer than
        `fsdp_min_size` elements are not split over `fsdp` either way.
    Paths of optimizer state end with their parameter's path (e.g. `opt_state/0/mu/img/...`), so
    one rule, and one parameter's names, cover both.
    """
    compiled = [(re.compile(rx), spec) for rx, spec in rules]
    to_mesh = {str(name): axis for name, axis in logical_rules}
    names_of = dict(logical_axes or {})

    def logical_spec(name: str, shape: tuple[int, ...]) -> tuple | None:
        parts = name.split("/")
        for i in range(len(parts)):
            names = names_of.get("/".join(parts[i:]))
            if names is not None:
                break
        else:
            return None
        if len(names) != len(shape):
            return None  # e.g. a factored optimizer statistic of the parameter
        spec = [to_mesh.get(n) if n is not None else None for n in names]
        if int(np.prod(shape, dtype=np.int64)) < fsdp_min_size:
            spec = [None if ax == "fsdp" else ax for ax in spec]
        spec = [ax if ax is None or mesh.shape.get(ax, 1) > 1 else None for ax in spec]
        return tuple(spec) if any(ax is not None for ax in spec) else None

    def checked(rule: str, name: str, shape: tuple[int, ...], spec: tuple) -> NamedSharding:
        for dim, ax in zip(shape, spec):
            axes = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
            size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if dim % size:
                raise ValueError(
                    f"config key `{rule}` shards `{name}` of shape {shape} with {spec}, but "
                    f"{dim} is not divisible by {size}"
                )
        return NamedSharding(mesh, P(*spec))

    def leaf_sharding(path, leaf):
        name = path_str(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for rx, spec in compiled:
            if not rx.search(name):
                continue
            if spec == "replicate":
                return NamedSharding(mesh, P())
            if spec == "fsdp":
                named = logical_spec(name, shape)
                if named is not None:
                    return checked("logical_axis_rules", name, shape, named)
                return NamedSharding(mesh, _fsdp_spec(shape, mesh, "fsdp", fsdp_min_size))
            spec = tuple(spec)
            if len(spec) > len(shape):
                raise ValueError(
                    f"config key `sharding_rules`: rule {rx.pattern!r} gives spec {spec} for "
                    f"`{name}` of shape {shape} (more entries than dimensions)"
                )
            # Specs name the trailing dimensions: stacked (scanned) layers stay unsplit.
            spec = (None,) * (len(shape) - len(spec)) + spec
            return checked(f"sharding_rules` rule `{rx.pattern}", name, shape, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)
