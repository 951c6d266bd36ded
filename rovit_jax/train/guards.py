"""Numerical guards: non-finite steps are skipped inside the jitted step and policed on the host.

Inside the step (`guarded_update`): when the loss, any gradient or any updated parameter is not
finite, the new parameters and optimizer state are discarded (the old ones are kept, so the
optimizer's own step count does not advance either), but `state["step"]` still advances. The
step number is what selects the batch and the step's RNG, so a skipped step consumes its batch
like any other: a rerun or a resume sees the same data at the same step, and one bad batch is
not retried forever. `state["skipped_updates"]` counts every skipped step,
`state["consecutive_nonfinite"]` the current run of them.

On the host (`NonFiniteMonitor`), `guard.policy` decides what happens next:

- "skip" (default): training continues; after `guard.max_consecutive` non-finite steps in a row
  (0 = never) it stops with a FloatingPointError, since the run has diverged.
- "halt": the first non-finite step stops training with a FloatingPointError.

Either way the state of a stopped step is never checkpointed, and the loop checks every state it
is about to save with `make_finite_check` (a jitted all-finite reduction), so no checkpoint ever
holds non-finite parameters or optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from rovit_jax.config_sections import Section, resolved_sections, setting

POLICIES = ("skip", "halt")
# Train-state keys added by the guard (scalars, int32). Checkpoints written before they existed
# restore with both set to 0 (see Checkpointer.restore's `optional`).
COUNTER_KEYS = ("skipped_updates", "consecutive_nonfinite")
DEFAULT_MAX_CONSECUTIVE = 10


@dataclasses.dataclass(frozen=True)
class GuardConfig(Section):
    """`guard.*`: what to do about non-finite steps (their update is always skipped). "skip"
    stops after `max_consecutive` such steps in a row (0 = never), "halt" at the first one."""

    SECTION: ClassVar[str] = "guard"

    policy: str = setting("skip", choices=POLICIES, older="skip")
    max_consecutive: int = setting(
        DEFAULT_MAX_CONSECUTIVE, min_value=0, older=DEFAULT_MAX_CONSECUTIVE
    )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> GuardConfig:
        """Reads `config.guard` (defaults when absent); ValueError naming the bad key."""
        return resolved_sections((cls,), config)["guard"]


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every floating-point leaf of `tree` is free of NaN and +-inf.

    Integer and boolean leaves (step counters, masks) are always finite and are not read.
    """
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return functools.reduce(jnp.logical_and, checks, jnp.asarray(True))


def make_finite_check(replicated: jax.sharding.Sharding):
    """Jitted `tree -> bool array` of `all_finite`, replicated so every process reads the answer."""
    return jax.jit(all_finite, out_shardings=replicated)


def init_counters() -> dict[str, jax.Array]:
    """The guard's state entries of a fresh run: `{key: int32 0}` for each of COUNTER_KEYS."""
    return {k: jnp.zeros((), jnp.int32) for k in COUNTER_KEYS}


def guarded_update(
    state: dict[str, Any],
    params: Any,
    opt_state: Any,
    loss: jax.Array,
    grad_norm: jax.Array,
    param_norm: jax.Array,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """Keeps `params`/`opt_state` (the step's update) only if the step was finite.

    `loss`, `grad_norm` (global norm of the gradients) and `param_norm` (of the updated
    parameters) are scalars: a global norm is finite exactly when every element is (or would
    overflow, which is no better), so no extra pass over the trees is needed. Returns the guarded
    state entries `{"params", "opt_state", *COUNTER_KEYS}` (the caller advances "step") and the
    metrics `{"nonfinite": 0./1., "skipped_updates", "consecutive_nonfinite"}`.
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)

    def keep(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    bad = (~finite).astype(jnp.int32)
    skipped = state["skipped_updates"] + bad
    consecutive = jnp.where(finite, 0, state["consecutive_nonfinite"] + 1).astype(jnp.int32)
    new = {
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "skipped_updates": skipped,
        "consecutive_nonfinite": consecutive,
    }
    metrics = {
        "nonfinite": bad.astype(jnp.float32),
        "skipped_updates": skipped,
        "consecutive_nonfinite": consecutive,
    }
    return new, metrics


class NonFiniteMonitor:
    """Applies the guard policy on the host, one step behind the device.

    `observe(step, metrics)` first judges the previous step (whose values are ready by now, so the
    host never waits on the step it just dispatched) and then remembers this one; `flush()` judges
    the remembered step at once, before anything is saved. Raises FloatingPointError naming the
    step when the policy says stop. Step N is the update that takes the state from step N-1 to N
    (the numbering of logs and checkpoints; it used batch N-1).
    """

    def __init__(self, guard: GuardConfig):
        self.guard = guard
        self._pending: tuple[int, dict[str, jax.Array]] | None = None

    def observe(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.flush()
        self._pending = (
            step,
            {k: metrics[k] for k in ("nonfinite", "skipped_updates", "consecutive_nonfinite")},
        )

    def flush(self) -> None:
        if self._pending is None:
            return
        step, values = self._pending
        self._pending = None
        values = jax.device_get(values)
        if not values["nonfinite"]:
            return
        consecutive, total = int(values["consecutive_nonfinite"]), int(values["skipped_updates"])
        logging.warning(
            "non-finite loss, gradients or parameters at step %d: update skipped "
            "(%d in a row, %d in total)",
            step,
            consecutive,
            total,
        )
        if self.guard.policy == "halt":
            raise FloatingPointError(
                f"non-finite loss, gradients or parameters at step {step} (guard.policy='halt'); "
                "the update was not applied and no checkpoint of this state is written"
            )
        limit = self.guard.max_consecutive
        if limit and consecutive >= limit:
            raise FloatingPointError(
                f"{consecutive} consecutive non-finite steps ending at step {step} "
                f"(guard.max_consecutive={limit}): training diverged; no checkpoint of this state "
                "is written"
            )
