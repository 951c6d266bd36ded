"""Orbax checkpoints of the sharded train state plus the input pipeline's position.

Integrity. Orbax 0.12.8 on a local or network file system writes a step into
`<step>.orbax-checkpoint-tmp/`, adds `commit_success.txt`, then renames it to `<step>/`; it lists
only directories named like a step (so a killed save's temporary directory is silently skipped,
and removed when that step is saved again). A directory named like a step is trusted as is: if
its contents are incomplete or damaged, restoring it raises and the relaunch crashes. Added here:

- a WARNING naming every half-written directory found at start-up; temporary ones are then
  deleted (orbax's `cleanup_tmp_directories`);
- a step directory without the files of a finished save (commit marker, step metadata, both
  items), or one that fails to restore, is reported, moved aside to
  `<workdir>/unusable_checkpoints/<step>.<n>` (out of orbax's sight, so that step can be saved
  again, and kept for inspection) and the previous step is used instead.

A relaunch after any crash therefore resumes from the last complete checkpoint, or starts afresh.

In a bucket (`gs://`) orbax writes a step straight into `<step>/` (object stores cannot rename a
folder atomically) and the commit marker last, so a killed save there leaves a step directory
without it: reported and moved aside as above (the move copies, then deletes). The set-aside
folder is outside `checkpoints/` because in a bucket orbax deletes every folder there that lacks
a commit marker, whatever its name. Every file access goes through `rovit_jax.paths`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rovit_jax import paths

ITEMS = ("state", "input")
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix for directories being written
# Files every finished step directory holds: orbax writes the commit marker just before the
# final rename (and as the very last file on GCS), the step metadata when the save starts.
COMMIT_MARKER = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
UNUSABLE_DIR = "unusable_checkpoints"  # beside checkpoints/, where orbax never looks


class IncompatibleCheckpointError(ValueError):
    """A complete checkpoint whose state lacks entries this code requires (not a damaged one)."""


def _is_step_name(name: str) -> bool:
    return name.isdigit() and (name == "0" or not name.startswith("0"))


def step_problem(path: str) -> str | None:
    """Why the step directory `path` is not a complete checkpoint, or None if it looks complete."""
    if not paths.isdir(path):
        return "not a directory"
    names = set(paths.listdir(path))
    if COMMIT_MARKER not in names:
        return f"no commit marker {COMMIT_MARKER}"
    if STEP_METADATA not in names:
        return f"no step metadata {STEP_METADATA}"
    for item in ITEMS:
        item_dir = os.path.join(path, item)
        if item not in names or not paths.isdir(item_dir) or not paths.listdir(item_dir):
            return f"no `{item}` item"
    return None


def scan(directory: str) -> tuple[list[int], list[tuple[str, str]]]:
    """Complete steps (ascending) and `(path, reason)` of half-written directories in `directory`.

    Unrelated files are not reported.
    """
    steps, bad = [], []
    if not paths.isdir(directory):
        return steps, bad
    for name in paths.listdir(directory):
        path = os.path.join(directory, name)
        if TMP_MARKER in name:
            bad.append((path, "an interrupted save (temporary directory)"))
        elif _is_step_name(name):
            problem = step_problem(path)
            if problem is None:
                steps.append(int(name))
            else:
                bad.append((path, f"an incomplete save ({problem})"))
    return sorted(steps), bad


def _all_processes_ok(ok: bool) -> bool:
    """True when `ok` holds on every process (a restore must succeed everywhere or nowhere)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([ok], np.int32))))


class Checkpointer:
    """Keeps the last `keep` checkpoints of `{state, input}` under `<workdir>/checkpoints`.

    Saving is asynchronous (training continues while the write finishes); a checkpoint directory
    only appears under its final name once complete, so a crash mid-write never shadows the
    previous good one. `restore` restores directly onto the given shardings, so a checkpoint
    written on one mesh loads on another. `read_only` opens another run's checkpoints without
    creating, cleaning or moving anything.
    """

    def __init__(
        self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False
    ):
        self.directory = os.path.join(paths.absolute(workdir), "checkpoints")
        self.read_only = read_only
        _, bad = scan(self.directory)
        for path, reason in bad:
            if read_only:
                action = "ignored"
            elif TMP_MARKER in os.path.basename(path):
                action = "ignored and deleted"
            else:
                action = "ignored and moved aside"
            logging.warning("checkpoint directory %s is %s: %s", path, reason, action)
        if not read_only:
            # Collective (every process calls it), even when this process found nothing.
            self._set_aside([p for p, _ in bad if TMP_MARKER not in os.path.basename(p)])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            paths.path(self.directory),
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "input": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        """Steps orbax lists that also pass `step_problem`, ascending."""
        complete = set(scan(self.directory)[0])
        return sorted(s for s in self._manager.all_steps() if s in complete)

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(
        self, step: int, state: Any, input_state: dict[str, Any], *, force: bool = True
    ) -> bool:
        """Starts saving `step` (asynchronously when so configured); the loop decides when."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), input=ocp.args.JsonSave(input_state)
            ),
            force=force,
        )

    def restore(
        self,
        step: int,
        abstract_state: Mapping[str, Any],
        *,
        optional: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Restores `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

        Top-level state entries named in `optional` that the checkpoint predates are created
        from those values instead (placed on the abstract entry's sharding). Any other missing
        entry raises IncompatibleCheckpointError (a ValueError) naming the checkpoint and entries.
        """
        optional = dict(optional or {})
        missing = self._missing_entries(step, abstract_state)
        required = [k for k in missing if k not in optional]
        if required:
            raise IncompatibleCheckpointError(
                f"checkpoint {self.step_path(step)} has no state entries {required}: it was "
                "written by an incompatible version of the code; train into a new workdir"
            )
        target = {k: v for k, v in abstract_state.items() if k not in missing}
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), input=ocp.args.JsonRestore()
            ),
        )
        state = dict(restored["state"])
        for k in missing:
            logging.info("checkpoint at step %d predates state entry %r: starting it anew", step, k)
            value = np.asarray(optional[k], abstract_state[k].dtype)
            state[k] = jax.device_put(value, abstract_state[k].sharding)
        return state, dict(restored["input"] or {})

    def restore_latest(
        self,
        abstract_state: Mapping[str, Any],
        *,
        optional: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """`(step, state, input_state)` of the newest checkpoint that restores, or None.

        A checkpoint that fails to restore is reported with a WARNING naming its directory, set
        aside, and the previous one is tried.
        """
        for step in reversed(self.all_steps()):
            try:
                state, input_state = self.restore(step, abstract_state, optional=optional)
                error = None
            except IncompatibleCheckpointError:
                raise  # Intact but from other code: falling back would silently retrain.
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped alike.
                error = e
            if _all_processes_ok(error is None):
                return step, state, input_state
            logging.warning(
                "checkpoint directory %s cannot be restored (%s: %s); ignored, trying the "
                "previous one",
                self.step_path(step),
                type(error).__name__ if error else "failed on another process",
                error,
            )
            self._set_aside([self.step_path(step)])
        return None

    def _missing_entries(self, step: int, abstract_state: Mapping[str, Any]) -> list[str]:
        """Top-level entries of `abstract_state` that the checkpoint at `step` does not hold."""
        meta = self._manager.item_metadata(step)["state"]
        tree = getattr(meta, "tree", meta)
        if tree is None:
            return []
        return [k for k in abstract_state if k not in tree]

    def _set_aside(self, step_dirs: list[str]) -> None:
        """Moves unusable step directories out of orbax's sight, to
        `<workdir>/unusable_checkpoints/<step>.<n>` (n counts earlier ones of that step).

        Collective: every process calls it; process 0 renames, the others wait for it.
        """
        if self.read_only:
            return
        if jax.process_index() == 0:
            for path in step_dirs:
                if not paths.exists(path):
                    continue
                aside = os.path.join(os.path.dirname(self.directory), UNUSABLE_DIR)
                n = 0
                while paths.exists(os.path.join(aside, f"{os.path.basename(path)}.{n}")):
                    n += 1
                target = os.path.join(aside, f"{os.path.basename(path)}.{n}")
                paths.makedirs(aside)
                paths.rename(path, target)
                logging.warning("moved %s to %s", path, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("rovit_jax checkpoint set aside")
        if hasattr(self, "_manager"):
            self._manager.reload()

    def wait(self) -> None:
        """Blocks until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry target shardings, for restoring onto a (possibly new) mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def _local_target(ckpt: Checkpointer, step: int) -> Any:
    """The saved state's shapes and dtypes, placed on this process's first device.

    Without a target, orbax restores onto the saving job's device topology, which fails when a
    checkpoint written by a multi-host job is read by one process (e.g. detection finetuning or
    export reading a pod's pretraining run).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = ckpt._manager.item_metadata(step)["state"]
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)


def load_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
    """Parameters of a training run's checkpoint (latest complete when `step` is None), on host.

    Raises FileNotFoundError naming the directory when it holds no usable checkpoint.
    """
    directory = os.path.join(paths.absolute(workdir), "checkpoints")
    if not paths.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    ckpt = Checkpointer(workdir, read_only=True)
    steps = ckpt.all_steps()
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {directory}")
    candidates = [step] if step is not None else list(reversed(steps))
    error: Exception | None = None
    for s in candidates:
        try:
            restored = ckpt._manager.restore(
                s, args=ocp.args.Composite(state=ocp.args.StandardRestore(_local_target(ckpt, s)))
            )
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint: try the previous one.
            logging.warning(
                "checkpoint directory %s cannot be restored (%s); ignored", ckpt.step_path(s), e
            )
            error = e
            continue
        ckpt.close()
        return jax.tree.map(np.asarray, restored["state"]["params"]), int(s)
    ckpt.close()
    raise FileNotFoundError(f"no usable checkpoint in {directory}") from error
