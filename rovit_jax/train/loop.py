"""The one training loop every task runs: resume, step, log, evaluate, checkpoint, guard."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import parameter_overview, periodic_actions

from rovit_jax import paths
from rovit_jax.data.stream import Batches
from rovit_jax.run_config import run_settings
from rovit_jax.train import guards, preemption
from rovit_jax.train import mesh as mesh_lib
from rovit_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from rovit_jax.train.prefetch import prefetch
from rovit_jax.train.trainer import Task, Trainer
from rovit_jax.train.writers import create_writer


def _every(step: int, period: int, total: int) -> bool:
    return step == total or (period > 0 and step % period == 0)


def run(
    config: ml_collections.ConfigDict, workdir: str, task: Task, *, stop_after: int | None = None
) -> dict[str, Any]:
    """Trains `task` for `config.total_steps`, resuming from the latest checkpoint in `workdir`.

    `stop_after` ends this run early at that step with a checkpoint, as a preemption would; the
    next run resumes exactly where it stopped.

    The task is a `trainer.Task`: `validate`, `init_params`, `init_model_params`, `loss_fn`,
    `batch_shapes`, `train_batches(process_index, process_count)` (a `data.stream.Batches`) and
    `evaluate(trainer, params) -> dict`. Returns the last evaluation's metrics and the final state.

    Reliability: SIGTERM/SIGINT stop the run after the current step with a committed checkpoint
    and raise `preemption.Preempted`; non-finite steps are skipped and policed by `config.guard`
    (train.guards), raising FloatingPointError when the policy says stop; no checkpoint with
    non-finite values is ever written; half-written checkpoints are skipped on resume.
    """
    # Installed first, so that a signal during a task's own setup (detection pretraining its
    # backbone through a nested run) is not lost.
    with preemption.PreemptionWatcher() as watcher:
        return _run(config, workdir, task, watcher, stop_after)


def _run(
    config: ml_collections.ConfigDict,
    workdir: str,
    task: Task,
    watcher: preemption.PreemptionWatcher,
    stop_after: int | None,
) -> dict[str, Any]:
    # Before a task's (possibly long) setup.
    guard, run = guards.GuardConfig.from_config(config), run_settings(config)
    mesh = mesh_lib.make_mesh([tuple(a) for a in run.mesh])
    task.validate(mesh)
    total = run.total_steps
    workdir = paths.absolute(workdir)
    paths.makedirs(workdir)
    is_chief = jax.process_index() == 0
    writer = create_writer(workdir, just_logging=not is_chief)
    if is_chief:
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
        # Later stages (detection finetuning, export) rebuild the model from this file.
        paths.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

    trainer = Trainer(config, task, mesh)
    checkpointer = Checkpointer(
        workdir, keep=run.keep_checkpoints, async_save=run.async_checkpointing
    )
    batches = task.train_batches(jax.process_index(), jax.process_count())
    restored = checkpointer.restore_latest(
        abstract_with_shardings(trainer.abstract_state, trainer.state_shardings),
        optional={k: np.zeros((), np.int32) for k in guards.COUNTER_KEYS},
    )
    if restored is None:
        state = trainer.init_state()
        start = 0
        parameter_overview.log_parameter_overview(state["params"])
    else:
        latest, state, input_state = restored
        start = int(jax.device_get(state["step"]))
        _check_input_state(input_state, config, latest)
        _restore_tallies(batches, input_state)
        logging.info("resumed from step %d in %s", start, checkpointer.directory)

    monitor = guards.NonFiniteMonitor(guard)
    finite = guards.make_finite_check(trainer.replicated)
    progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
    eval_metrics: dict[str, Any] = {}
    t0 = time.time()
    end = total if stop_after is None else min(total, int(stop_after))

    def make_batch(step: int) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        # The producer runs ahead of training: it decodes AND copies the batch to the devices
        # (prefetch to device), so the step never waits for a host-to-device transfer. Each batch
        # is paired with the input tallies as of that batch, so what is logged and checkpointed
        # at a step is exact.
        device_batch = trainer.global_batch(batches.batch(step))
        return device_batch, _tallies(batches)

    depth = run.prefetch
    # prefetch=0 produces each batch when the step asks for it (to measure what prefetch buys).
    stream = (
        prefetch(make_batch, start, end, depth=depth)
        if depth > 0
        else ((step, make_batch(step)) for step in range(start, end))
    )
    stall = InputStall()
    try:
        for step, (device_batch, tallies) in stall.timed(stream):
            state, metrics = trainer.train_step(state, device_batch)
            done = step + 1
            monitor.observe(done, metrics)  # Judges the previous step; raises if it must stop.
            progress(done)
            if _every(done, run.log_every, total):
                scalars = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
                scalars["train/skipped_examples"] = tallies["skipped"]
                scalars.update(stall.report())
                scalars.update({f"input/{k}": v for k, v in tallies["counts"].items()})
                writer.write_scalars(done, scalars)
                rate = (done - start) / max(time.time() - t0, 1e-9)
                logging.info(
                    "step %d/%d (%.0f%%): loss %.4f, %.2f steps/s, input wait %.0f%%, ETA %s",
                    done,
                    total,
                    100 * done / total,
                    scalars["train/loss"],
                    rate,
                    100 * scalars["input/wait_fraction"],
                    _duration((total - done) / max(rate, 1e-9)),
                )
                stall.reset()
            stop = watcher.should_stop(done)  # Collective: every process gets the same answer.
            if stop or _every(done, run.checkpoint_every, total) or done == end:
                monitor.flush()
                _save(checkpointer, finite, done, state, _input_state(config, done, tallies))
            if stop:
                reason = watcher.reason()
                checkpointer.wait()
                preemption.clear()
                logging.warning(
                    "stopping on %s after step %d: checkpoint committed in %s",
                    reason,
                    done,
                    checkpointer.directory,
                )
                raise preemption.Preempted(done, reason)
            if _every(done, run.eval_every, total):
                with progress.timed("eval"):
                    eval_metrics = task.evaluate(trainer, state["params"])
                writer.write_scalars(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
        monitor.flush()
        if not eval_metrics and end == total:  # Already trained (a rerun): still report the result.
            eval_metrics = task.evaluate(trainer, state["params"])
    finally:
        stream.close()
        checkpointer.close()  # Waits for a save in flight: it holds a good state.
        writer.flush()
    logging.info("trained steps %d..%d in %.1fs", start, end, time.time() - t0)
    return {"eval": eval_metrics, "state": state, "start_step": start}


class InputStall:
    """Measures how long the training loop waits for its next batch (the input stall).

    `timed(stream)` wraps the prefetching iterator; `report()` gives, since the last `reset()`,
    the fraction of wall time spent waiting and the mean wait per step. Step dispatch is
    asynchronous, so a wait also covers the device finishing earlier steps only when the
    prefetch queue is empty, i.e. when input is the bottleneck.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.wait, self.steps, self.since = 0.0, 0, time.perf_counter()

    def timed(self, stream):
        while True:
            t = time.perf_counter()
            try:
                item = next(stream)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            self.steps += 1
            yield item

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        return {
            "input/wait_fraction": min(1.0, self.wait / elapsed),
            "input/wait_ms_per_step": 1e3 * self.wait / max(self.steps, 1),
            "train/steps_per_s": self.steps / elapsed,
        }


def _save(
    checkpointer: Checkpointer,
    finite: Any,
    step: int,
    state: dict[str, Any],
    input_state: dict[str, Any],
) -> None:
    """Saves `state` at `step` unless it holds a NaN/inf (then FloatingPointError, nothing saved)."""
    if not bool(
        jax.device_get(finite({"params": state["params"], "opt_state": state["opt_state"]}))
    ):
        raise FloatingPointError(
            f"refusing to checkpoint step {step}: the parameters or optimizer state hold non-finite "
            f"values; the last checkpoint in {checkpointer.directory} is left as it is"
        )
    checkpointer.save(step, state, input_state)


def _tallies(batches: Batches) -> dict[str, Any]:
    """The input pipeline's counters: substituted examples, and its per-group tallies."""
    counts = batches.counts()
    return {"skipped": int(batches.skipped), "counts": {k: int(v) for k, v in counts.items()}}


def _restore_tallies(batches: Batches, input_state: dict[str, Any]) -> None:
    batches.skipped = int(input_state.get("skipped", 0))
    if input_state.get("counts"):
        batches.restore_counts(input_state["counts"])


def _input_state(
    config: ml_collections.ConfigDict, step: int, tallies: dict[str, Any]
) -> dict[str, Any]:
    """What resumes the input exactly: the next step (batches are a function of the step, the
    seed and the batch size) and the counters as of that step."""
    return {
        "next_step": step,
        "seed": int(config.seed),
        "batch_size": int(config.batch_size),
        "skipped": tallies["skipped"],
        "counts": tallies["counts"],
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
