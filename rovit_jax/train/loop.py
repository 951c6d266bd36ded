"""The one training loop every task runs: resume, step, log, evaluate, checkpoint."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from rovit_jax.data.image_text import prefetch
from rovit_jax.train import mesh as mesh_lib
from rovit_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from rovit_jax.train.trainer import Trainer


def _every(step: int, period: int, total: int) -> bool:
    return step == total or (period > 0 and step % period == 0)


def run(
    config: ml_collections.ConfigDict, workdir: str, task: Any, *, stop_after: int | None = None
) -> dict[str, Any]:
    """Trains `task` for `config.total_steps`, resuming from the latest checkpoint in `workdir`.

    `stop_after` ends this run early at that step with a checkpoint, as a preemption would; the
    next run resumes exactly where it stopped.

    The task supplies `validate`, `init_params`, `loss_fn`, `batch_shapes`,
    `train_batches(process_index, process_count)` (an object with `batch(step)`, `skipped`) and
    `evaluate(trainer, params) -> dict`. Returns the last evaluation's metrics and the final state.
    """
    mesh = mesh_lib.make_mesh([tuple(a) for a in config.mesh])
    task.validate(mesh)
    total = int(config.total_steps)
    os.makedirs(workdir, exist_ok=True)
    is_chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if is_chief:
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
        # Later stages (detection finetuning, export) rebuild the model from this file.
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    trainer = Trainer(config, task, mesh)
    checkpointer = Checkpointer(
        workdir, keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing)
    )
    batches = task.train_batches(jax.process_index(), jax.process_count())
    latest = checkpointer.latest_step()
    if latest is None:
        state = trainer.init_state()
        start = 0
        parameter_overview.log_parameter_overview(state["params"])
    else:
        state, input_state = checkpointer.restore(
            latest, abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
        )
        start = int(jax.device_get(state["step"]))
        _check_input_state(input_state, config, latest)
        batches.skipped = int(input_state.get("skipped", 0))
        logging.info("resumed from step %d in %s", start, checkpointer.directory)

    progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
    eval_metrics: dict[str, Any] = {}
    t0 = time.time()
    end = total if stop_after is None else min(total, int(stop_after))
    for step, local_batch in prefetch(batches.batch, start, end):
        state, metrics = trainer.train_step(state, trainer.global_batch(local_batch))
        done = step + 1
        progress(done)
        if _every(done, int(config.log_every), total):
            scalars = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
            scalars["train/skipped_examples"] = batches.skipped
            if not np.isfinite(scalars["train/loss"]):
                raise FloatingPointError(f"non-finite loss {scalars['train/loss']} at step {done}")
            writer.write_scalars(done, scalars)
            rate = (done - start) / max(time.time() - t0, 1e-9)
            logging.info(
                "step %d/%d (%.0f%%): loss %.4f, %.2f steps/s, ETA %s",
                done,
                total,
                100 * done / total,
                scalars["train/loss"],
                rate,
                _duration((total - done) / max(rate, 1e-9)),
            )
        if _every(done, int(config.checkpoint_every), total) or done == end:
            checkpointer.save(done, state, _input_state(config, done, batches.skipped))
        if _every(done, int(config.eval_every), total):
            with progress.timed("eval"):
                eval_metrics = task.evaluate(trainer, state["params"])
            writer.write_scalars(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
    if not eval_metrics and end == total:  # Already trained (a rerun): still report the result.
        eval_metrics = task.evaluate(trainer, state["params"])
    checkpointer.close()
    writer.flush()
    logging.info("trained steps %d..%d in %.1fs", start, total, time.time() - t0)
    return {"eval": eval_metrics, "state": state, "start_step": start}


def _input_state(config: ml_collections.ConfigDict, step: int, skipped: int) -> dict[str, Any]:
    return {
        "next_step": step,
        "seed": int(config.seed),
        "batch_size": int(config.batch_size),
        "skipped": int(skipped),
    }


def _check_input_state(saved: dict[str, Any], config: ml_collections.ConfigDict, step: int):
    """Refuses to resume when the input stream would silently change under the same step."""
    for key in ("seed", "batch_size"):
        if key in saved and int(saved[key]) != int(config[key]):
            raise ValueError(
                f"config key `{key}` is {config[key]}, but the checkpoint at step {step} was written "
                f"with {saved[key]}; the input position cannot be resumed exactly. Use a new workdir."
            )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
