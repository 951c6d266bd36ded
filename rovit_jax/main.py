r"""Command-line trainer: `python -m rovit_jax.main --config=configs/X.py[:arg] --workdir=DIR`.

Any field can be overridden: `--config.total_steps=100 --config.loss.kind=softmax`. Rerunning with
the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config(arg)).", lock_config=False
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax

    # Keep TensorFlow (input decoding, metric writing) off accelerators and out of their memory.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")

    from rovit_jax.tasks import get_task
    from rovit_jax.train.loop import run

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
    result = run(config, workdir, task)
    if jax.process_index() == 0 and result["eval"]:
        summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result["eval"].items()))
        print(f"[rovit_jax] final evaluation at step {config.total_steps}: {summary}", flush=True)
        if config.task == "detect":
            from rovit_jax.tasks.detect_eval import format_table

            print(format_table(result["eval"]), flush=True)


if __name__ == "__main__":
    app.run(main)
