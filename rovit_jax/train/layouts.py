"""Named parallelism layouts: a mesh shape, sharding rules and a logical-axis table for each.

A layout is only a default for three config fields, `mesh`, `sharding_rules` and
`logical_axis_rules`, which stay the single source of truth (configs print them, and users may
edit any of them):

  data     pure data parallelism: the batch is split over every device, parameters and optimizer
           state are replicated.
  fsdp     ZeRO-3 style: the batch AND every large parameter / optimizer array are split over all
           devices (parameters are all-gathered per layer inside the step), each on its largest
           divisible dimension (an empty logical table: splitting the model width instead left
           remat's temporary-memory saving at nothing in the memory plan of tests/test_plan.py).
  fsdp_tp  FSDP over `devices / model` devices times Megatron-style tensor parallelism over
           `model` devices for the widest layers: attention heads and the MLP hidden dimension
           are split over the `model` axis (column-parallel in, row-parallel out), so each block
           needs one reduction per sub-layer instead of gathering whole weights.

The logical names ("embed", "heads", "kv", "mlp", ...) are declared by the modules
(rovit_jax.models.logical_axes); optimizer state follows its parameter.
"""

from __future__ import annotations

from typing import Any

LAYOUTS = ("data", "fsdp", "fsdp_tp")

# Logical axis -> mesh axis, per layout. Names a table leaves out stay unsplit.
LOGICAL_AXIS_RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    "data": (),
    "fsdp": (),
    # Megatron: [D, heads, head_dim] in and [heads, head_dim, D] out of attention, [D, M] then
    # [M, D] in the MLP: heads and M over `model`, D over `fsdp`.
    "fsdp_tp": (("embed", "fsdp"), ("heads", "model"), ("mlp", "model")),
}


def layout(name: str, model_parallel: int = 1) -> tuple[tuple, tuple, tuple]:
    """Returns the `(mesh, sharding_rules, logical_axis_rules)` config values of a layout.

    Args:
      name: one of LAYOUTS.
      model_parallel: size of the `model` axis for "fsdp_tp" (must divide the head count and the
        MLP width of every tower); ignored otherwise.
    """
    if name not in LAYOUTS:
        raise ValueError(f"config argument `layout`={name!r}: choose one of {LAYOUTS}")
    table = LOGICAL_AXIS_RULES[name]
    if name == "data":
        return (("data", -1), ("fsdp", 1)), ((".*", "replicate"),), table
    if name == "fsdp":
        return (("data", 1), ("fsdp", -1)), ((".*", "fsdp"),), table
    if int(model_parallel) < 1:
        raise ValueError(f"config argument `tp`: model_parallel must be >= 1, got {model_parallel}")
    mesh = (("data", 1), ("fsdp", -1), ("model", int(model_parallel)))
    return mesh, ((".*", "fsdp"),), table


def apply_layout(config: Any, name: str, model_parallel: int = 1) -> None:
    """Sets `config.mesh`, `config.sharding_rules` and `config.logical_axis_rules` (in place)."""
    config.mesh, config.sharding_rules, config.logical_axis_rules = layout(name, model_parallel)
