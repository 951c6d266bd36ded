r"""Command-line trainer: `python -m rovit_jax.main --config=configs/X.py[:arg] --workdir=DIR`.

Any field can be overridden: `--config.total_steps=100 --config.loss.kind=softmax`. Rerunning with
the same workdir resumes from its latest complete checkpoint.

Exit codes: 0 when done; 75 (EX_TEMPFAIL, `rovit_jax.train.preemption.PREEMPTED_EXIT_CODE`) when
SIGTERM/SIGINT or a preemption notice stopped training after checkpointing: rerun to resume.
Multi-host runs join JAX's runtime first (rovit_jax.train.distributed): on a TPU pod slice or
under SLURM automatically, elsewhere with `--coordinator_address=host:port --num_processes=N
--process_id=I` (or the ROVIT_* environment variables); this also starts JAX's preemption service.
A dead process stops the others within `--heartbeat_timeout` seconds.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config(arg)).", lock_config=False
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_integer(
    "heartbeat_timeout", 30, "Multi-host: seconds before a silent process counts as dead."
)
flags.DEFINE_integer(
    "stop_after_step",
    None,
    "Stop at this step with a committed checkpoint, as a preemption would (exit code 0); "
    "rerunning resumes from it.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax

    from rovit_jax.train import distributed

    distributed.initialize(
        coordinator_address=flags.FLAGS.coordinator_address,
        num_processes=flags.FLAGS.num_processes,
        process_id=flags.FLAGS.process_id,
        heartbeat_timeout_seconds=flags.FLAGS.heartbeat_timeout,
    )

    # Keep TensorFlow (input decoding, metric writing) off accelerators and out of their memory.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")

    from rovit_jax.tasks import get_task
    from rovit_jax.train.loop import run
    from rovit_jax.train.preemption import Preempted

    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    logging.info(
        "JAX process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    logging.info("config:\n%s", config)
    task = get_task(config, workdir)
    try:
        result = run(config, workdir, task, stop_after=flags.FLAGS.stop_after_step)
    except Preempted as e:
        logging.warning("%s; exiting with code %d", e, e.exit_code)
        sys.stdout.flush()
        sys.exit(e.exit_code)
    if jax.process_index() == 0 and result["eval"]:
        summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result["eval"].items()))
        print(f"[rovit_jax] final evaluation at step {config.total_steps}: {summary}", flush=True)
        if config.task == "detect":
            from rovit_jax.tasks.detect_eval import format_table

            print(format_table(result["eval"]), flush=True)


if __name__ == "__main__":
    app.run(main)
