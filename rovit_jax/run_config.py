"""Run settings every task shares (loop, mesh, checkpoints, guard): the one place for their
defaults, types and bounds.

They are the config's top-level keys (`seed`, `mesh`, ...) and its `guard` section
(`train.guards.GuardConfig`). `pretrain_defaults()` and `detect_defaults()` start from
`add_run_settings`; the tasks validate them with `run_problems`, and the trainer and the loop
read them through `run_settings(config)` (typed, with the values an older run config that lacks
a field was run with).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import ml_collections

from rovit_jax import config_check as cc
from rovit_jax.config_sections import (
    Section,
    add_sections,
    older_defaults,
    resolve_section,
    resolved_sections,
    setting,
)
from rovit_jax.models.attention import ATTENTION_IMPLS, cudnn_device_problem
from rovit_jax.models.layers import COMPUTE_DTYPES, REMAT_POLICIES
from rovit_jax.train.guards import GuardConfig

__all__ = [
    "RunSettings",
    "add_run_settings",
    "run_problems",
    "run_settings",
]


@dataclasses.dataclass(frozen=True)
class RunSettings(Section):
    """The config's top-level run keys. Defaults are pretraining's where the tasks differ
    (`total_steps`, `batch_size`, `checkpoint_every`; detection's `DetectRunSettings`)."""

    NAME: ClassVar[str] = "run"

    seed: int = setting(0)
    total_steps: int = setting(1000, min_value=0)
    # Global. Paper: 4096 for ablations, 16384 for main models (unverified).
    batch_size: int = setting(4096, min_value=1)
    log_every: int = setting(50, min_value=0)
    eval_every: int = setting(0, min_value=0)  # 0: evaluate only at the end
    checkpoint_every: int = setting(500, min_value=0)
    keep_checkpoints: int = setting(3, min_value=1)
    async_checkpointing: bool = setting(True, older=True)
    # Mesh axes [(name, size)], -1 = the remaining devices. The batch is split over data x fsdp;
    # parameters and optimizer state over fsdp by the sharding rules. Tuples, so that the command
    # line can override them: --config.mesh="(('fsdp', -1), ...)". Its structure, the sharding
    # rules' and the logical axis rules' are checked by `run_problems`.
    mesh: tuple = setting((("data", -1), ("fsdp", 1)))
    # (regex over parameter paths, "fsdp" | "replicate" | a PartitionSpec tuple), first match.
    sharding_rules: tuple = setting(((".*", "fsdp"),), older=())
    # Logical axis names (declared by the modules: rovit_jax.models.logical_axes) -> mesh axes,
    # for parameters whose sharding rule is "fsdp" (empty: each splits its largest divisible
    # dimension, the `fsdp` layout; `fsdp_tp` maps embed/heads/mlp).
    logical_axis_rules: tuple = setting((), older=())
    # Arrays with fewer elements stay replicated under "fsdp" rules.
    fsdp_min_size: int = setting(2**14, min_value=0, older=2**14)
    # Parameters and optimizer state stay float32.
    compute_dtype: str = setting("float32", choices=tuple(COMPUTE_DTYPES))
    remat: str = setting("none", choices=REMAT_POLICIES)  # rematerialise each transformer block
    # The attention kernel of every tower and block (rovit_jax.models.attention): "auto" runs
    # cuDNN's fused kernel on GPUs with 16-bit compute and the einsum kernel elsewhere. The
    # choice changes no parameter, so a run may change it on resumption.
    attention: str = setting("auto", choices=ATTENTION_IMPLS, older="auto")
    # Batches decoded and copied to the devices ahead of the step (0: none).
    prefetch: int = setting(2, min_value=0, older=2)
    donate_state: bool = setting(True, older=True)  # the train step reuses the old state's buffers


def add_run_settings(
    c: ml_collections.ConfigDict, cls: type[RunSettings] = RunSettings
) -> ml_collections.ConfigDict:
    """Adds the run settings (`cls`'s defaults) and the guard section to `c` (in place)."""
    return add_sections(c, (cls, GuardConfig))


def run_settings(config: Any) -> RunSettings:
    """The run keys of `config`, typed; ConfigError naming every bad key."""
    return resolved_sections((RunSettings,), config)["run"]


def run_problems(problems: cc.Problems, config: Any) -> RunSettings | None:
    """Adds every problem of the run settings, the guard section and the mesh's structure to
    `problems`; returns the typed run settings (None where they have problems)."""
    run = resolve_section(RunSettings, config, problems)
    resolve_section(GuardConfig, config, problems)
    # The rules' structure, also where another run key has a problem (a non-list is one).
    older = older_defaults(RunSettings)
    rules = {
        k: cc.config_get(config, k, older[k]) for k in ("sharding_rules", "logical_axis_rules")
    }
    rules = {k: v for k, v in rules.items() if cc.is_list(v)}
    cc.sharding_rules_problems(problems, rules.get("sharding_rules", ()))
    cc.logical_axis_rules_problems(
        problems, rules.get("logical_axis_rules", ()), cc.config_get(config, "mesh", None)
    )
    cc.mesh_problems(problems, config)
    if run is not None and run.attention == "cudnn":
        why = cudnn_device_problem(COMPUTE_DTYPES[run.compute_dtype], jax.default_backend())
        problems.check(why is None, "attention", run.attention, f"{why} ('auto' falls back)")
    # The input's worker threads, read by both tasks' batchers.
    cc.check_int(problems, config, "data.num_workers", min_value=1, default=1)
    return run
