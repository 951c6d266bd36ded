"""Run settings every task shares (loop, mesh, checkpoints): the one place for their defaults.

`pretrain_defaults()` and `detect_defaults()` start from `add_run_settings`; the trainer, the mesh,
the loop and the config checks read a field that an older run config lacks through `run_setting`,
so each default is written once.
"""

from __future__ import annotations

from typing import Any

import ml_collections

__all__ = ["RUN_DEFAULTS", "add_run_settings", "run_setting"]

RUN_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "log_every": 50,
    "eval_every": 0,  # 0: evaluate only at the end
    "keep_checkpoints": 3,
    "async_checkpointing": True,
    # Mesh axes [(name, size)], -1 = the remaining devices. The batch is split over data x fsdp;
    # parameters and optimizer state over fsdp by the sharding rules. Tuples, so that the command
    # line can override them: --config.mesh="(('fsdp', -1), ...)".
    "mesh": (("data", -1), ("fsdp", 1)),
    "sharding_rules": ((".*", "fsdp"),),
    # Logical axis names (declared by the modules: rovit_jax.models.logical_axes) -> mesh axes,
    # for parameters whose sharding rule is "fsdp" (empty: each splits its largest divisible
    # dimension, the `fsdp` layout; `fsdp_tp` maps embed/heads/mlp).
    "logical_axis_rules": (),
    "fsdp_min_size": 2**14,  # arrays with fewer elements stay replicated under "fsdp" rules
    "compute_dtype": "float32",  # or "bfloat16" (parameters and optimizer state stay float32)
    "remat": "none",  # "none" | "full" | "dots": rematerialise each transformer block
    "prefetch": 2,  # batches decoded and copied to the devices ahead of the step (0: none)
    "donate_state": True,  # the train step reuses the old state's buffers
}


def add_run_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds RUN_DEFAULTS and the non-finite guard block to `c` (in place; returns it)."""
    for key, value in RUN_DEFAULTS.items():
        c[key] = value
    # Non-finite loss/gradients (rovit_jax.train.guards): the step's update is skipped; "skip"
    # stops after `max_consecutive` such steps in a row (0 = never), "halt" at the first one.
    c.guard = ml_collections.ConfigDict(dict(policy="skip", max_consecutive=10))
    return c


def run_setting(config: Any, key: str) -> Any:
    """`config[key]`, or its RUN_DEFAULTS value where the config (an older run's) lacks it."""
    return config.get(key, RUN_DEFAULTS[key])
