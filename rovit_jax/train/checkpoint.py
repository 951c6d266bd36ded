"""Orbax checkpoints of the sharded train state plus the input pipeline's position."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the last `keep` checkpoints of `{state, input}` under `<workdir>/checkpoints`.

    Saving is asynchronous (training continues while the write finishes); a checkpoint directory
    only appears under its final name once complete, so a crash mid-write never shadows the
    previous good one. `restore_latest` restores directly onto the given shardings, so a
    checkpoint written on one mesh loads on another.
    """

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "input")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self, step: int, state: Any, input_state: dict[str, Any], *, force: bool = False
    ) -> bool:
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), input=ocp.args.JsonSave(input_state)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), input=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["input"] or {})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry target shardings, for restoring onto a (possibly new) mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def load_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
    """Parameters of a training run's checkpoint (latest when `step` is None), as host arrays.

    Raises FileNotFoundError naming the directory when it holds no checkpoint.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    manager = ocp.CheckpointManager(directory, item_names=("state", "input"))
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint (step {step}) in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return jax.tree.map(np.asarray, restored["state"]["params"]), int(step)
