"""Run directories for converted weights: configs from files, and a pretraining workdir whose
step-0 checkpoint holds imported parameters.

A workdir written by `write_init_workdir` looks exactly like a pretraining run stopped at step 0:
``config.json`` plus ``checkpoints/0/`` (parameters, fresh optimizer state, step 0, input
position 0). Therefore

  python -m rovit_jax.main --config=<the same config> --workdir=<that workdir>

resumes from it, i.e. pretrains starting from the imported weights, and a detection config can
use it directly as ``init.pretrain_workdir``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from rovit_jax import paths
from rovit_jax.interop.towers import flatten

__all__ = ["check_new_workdir", "write_init_workdir"]


def _check_same_structure(params: Any, abstract: Any) -> None:
    got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    want = {k: tuple(v.shape) for k, v in flatten(abstract).items()}
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
    problems += [
        f"{k}: shape {got[k]}, the config's model needs {want[k]}"
        for k in sorted(set(got) & set(want))
        if got[k] != want[k]
    ]
    if problems:
        raise ValueError(
            "parameters do not match the config's model:\n  " + "\n  ".join(problems[:20])
        )


def check_new_workdir(workdir: str) -> None:
    """FileExistsError when `workdir` already holds checkpoints (a run would resume from them)."""
    ckpt_dir = os.path.join(paths.absolute(workdir), "checkpoints")
    if paths.isdir(ckpt_dir) and paths.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; choose a new workdir")


def write_init_workdir(config: ml_collections.ConfigDict, params: Any, workdir: str) -> str:
    """Writes `workdir` as a pretraining run at step 0 whose parameters are `params`.

    Args:
      config: the pretraining config the run will be launched with.
      params: a full two-tower parameter tree for that config (numpy or jax arrays).
      workdir: output directory, local or a bucket URL; must not hold checkpoints yet.

    Returns:
      The step directory written (``<workdir>/checkpoints/0``).
    """
    from rovit_jax.tasks.pretrain import PretrainTask
    from rovit_jax.train import mesh as mesh_lib
    from rovit_jax.train.checkpoint import Checkpointer
    from rovit_jax.train.trainer import Trainer

    check_new_workdir(workdir)
    task = PretrainTask(config, check_files=False)
    # One device is enough to write: restoring places every array on the run's own mesh.
    mesh = mesh_lib.make_mesh(
        [(str(name), 1) for name, _ in config.mesh], devices=[jax.local_devices()[0]]
    )
    trainer = Trainer(config, task, mesh)
    _check_same_structure(params, trainer.abstract_state["params"])
    shardings = trainer.state_shardings
    params = jax.tree.map(
        lambda a, s: jax.device_put(np.asarray(a, np.float32), s), dict(params), shardings["params"]
    )
    opt_state = jax.jit(trainer.tx.init, out_shardings=shardings["opt_state"])(params)
    # The other entries (step, guard counters) start at zero, as in a fresh run.
    state = {
        k: jax.device_put(np.zeros(a.shape, a.dtype), shardings[k])
        for k, a in trainer.abstract_state.items()
        if k not in ("params", "opt_state")
    }
    state.update(params=params, opt_state=opt_state)
    input_state = {
        "next_step": 0,
        "seed": int(config.seed),
        "batch_size": int(config.batch_size),
        "skipped": 0,
        "counts": {},
    }
    paths.makedirs(workdir)
    checkpointer = Checkpointer(workdir, keep=int(config.keep_checkpoints), async_save=False)
    try:
        checkpointer.save(0, state, input_state)
        checkpointer.wait()
    finally:
        checkpointer.close()
    paths.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    return checkpointer.step_path(0)
