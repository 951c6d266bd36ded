"""Named parallelism layouts: a mesh shape plus a table of sharding rules for each.

A layout is only a default for two config fields, `mesh` and `sharding_rules`, which stay the
single source of truth (configs print them, and users may edit either):

  data     pure data parallelism: the batch is split over every device, parameters and optimizer
           state are replicated.
  fsdp     ZeRO-3 style: the batch AND every large parameter / optimizer array are split over all
           devices (parameters are all-gathered per layer inside the step).
  fsdp_tp  FSDP over `devices / model` devices times Megatron-style tensor parallelism over
           `model` devices for the widest layers: attention heads and the MLP hidden dimension
           are split over the `model` axis (column-parallel in, row-parallel out), so each block
           needs one reduction per sub-layer instead of gathering whole weights.

Parameter paths are the transformer's (rovit_jax.models.layers), and optimizer state mirrors
them, so one rule covers both. Specs name the trailing dimensions; stacked leading dimensions
(layers scanned with `scan_layers`) are left unsharded.
"""

from __future__ import annotations

from typing import Any

LAYOUTS = ("data", "fsdp", "fsdp_tp")

_ATTN = r"MultiHeadDotProductAttention_0"
# Megatron tensor-parallel rules: [D, heads, head_dim] in, [heads, head_dim, D] out; [D, M] then
# [M, D] for the MLP. The other dimension of each kernel is FSDP-sharded.
TENSOR_PARALLEL_RULES: tuple[tuple[str, Any], ...] = (
    (rf"{_ATTN}/(query|key|value)/kernel$", ("fsdp", "model", None)),
    (rf"{_ATTN}/(query|key|value)/bias$", ("model", None)),
    (rf"{_ATTN}/out/kernel$", ("model", None, "fsdp")),
    (r"MlpBlock_0/Dense_0/kernel$", ("fsdp", "model")),
    (r"MlpBlock_0/Dense_0/bias$", ("model",)),
    (r"MlpBlock_0/Dense_1/kernel$", ("model", "fsdp")),
)


def layout(name: str, model_parallel: int = 1) -> tuple[tuple[tuple[str, int], ...], tuple]:
    """Returns `(mesh, sharding_rules)` config values of the named layout.

    Args:
      name: one of LAYOUTS.
      model_parallel: size of the `model` axis for "fsdp_tp" (must divide the head count and the
        MLP width of every tower); ignored otherwise.
    """
    if name == "data":
        return (("data", -1), ("fsdp", 1)), ((".*", "replicate"),)
    if name == "fsdp":
        return (("data", 1), ("fsdp", -1)), ((".*", "fsdp"),)
    if name == "fsdp_tp":
        if int(model_parallel) < 1:
            raise ValueError(
                f"config argument `tp`: model_parallel must be >= 1, got {model_parallel}"
            )
        mesh = (("data", 1), ("fsdp", -1), ("model", int(model_parallel)))
        return mesh, (*TENSOR_PARALLEL_RULES, (".*", "fsdp"))
    raise ValueError(f"config argument `layout`={name!r}: choose one of {LAYOUTS}")


def apply_layout(config: Any, name: str, model_parallel: int = 1) -> None:
    """Sets `config.mesh` and `config.sharding_rules` from the named layout (in place)."""
    config.mesh, config.sharding_rules = layout(name, model_parallel)
