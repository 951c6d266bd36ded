r"""Input stall of the real training loop: how long each step waits for its batch.

  python benchmarks/input_stall.py                    # shapes pretraining, 120 steps, prefetch 0 and 2
  python benchmarks/input_stall.py --steps=200 --prefetch=0,1,2,4

Runs `rovit_jax.train.loop.run` on the shapes-world pretraining config (the world is built first,
if missing, under $TFDS_DATA_DIR) with `config.prefetch` set to each value, and reports what the
loop itself logs: the fraction of wall time it waited for input and the wait per step, plus
steps/s, all over the second half of the run (steady state). prefetch=0 decodes and copies each batch only when the step asks for it; prefetch=N keeps
N batches decoded AND already on the devices (rovit_jax.train.loop).

"stall" is 1 - steps/s over the steps/s of a run whose input is one fixed, already decoded
batch (the device's own rate). "loop wait" is the time the Python loop blocked on the input
iterator; with prefetch=0 it overstates the stall, because step dispatch is asynchronous and the
device is still busy with the previous step while the next batch is decoded.
On a 2-core CPU the decoding threads and the XLA computation share the same cores, so prefetching
cannot hide decode time completely there; on an accelerator host it does.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps: int, prefetch: int):
    from rovit_jax.config_files import load_config

    c = load_config(f"shapes_pretrain:steps={steps}")
    c.prefetch = prefetch
    c.log_every = steps // 2  # the last report covers the second half: steady state only
    c.checkpoint_every = 0
    c.eval_every = 0
    return c


def _last_scalar(workdir: str, tag: str) -> float:
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    events = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    acc = event_accumulator.EventAccumulator(events[0], size_guidance={"tensors": 0})
    acc.Reload()
    return float(tf.make_ndarray(acc.Tensors(tag)[-1].tensor_proto))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--prefetch", default="0,2")
    args = parser.parse_args()

    from rovit_jax.tasks import get_task
    from rovit_jax.train import loop

    class NoEval:
        """The task without its retrieval evaluation: only the training steps are timed.

        With `fixed_input`, every step gets the first batch again (decoded once): the rate of
        the device alone, against which the stall of the real input is judged.
        """

        def __init__(self, task, fixed_input: bool):
            self._task, self._fixed = task, fixed_input

        def __getattr__(self, name):
            return getattr(self._task, name)

        def evaluate(self, trainer, params):
            return {}

        def train_batches(self, process_index, process_count):
            batches = self._task.train_batches(process_index, process_count)
            if not self._fixed:
                return batches
            first = batches.batch(0)

            class Fixed:
                skipped = 0

                def batch(self, step):
                    return first

                def counts(self):
                    return {}

                def restore_counts(self, counts):
                    pass

            return Fixed()

    print(
        f"{'input':<12} {'prefetch':>8} {'steps/s':>8} {'stall':>6} {'loop wait':>9} "
        f"{'wait ms/step':>12}"
    )
    runs = [("fixed batch", 2)] + [("shapes", int(x)) for x in args.prefetch.split(",")]
    device_rate = None
    for name, depth in runs:
        config = _config(args.steps, depth)
        with tempfile.TemporaryDirectory() as workdir:
            task = NoEval(get_task(config, workdir), fixed_input=name == "fixed batch")
            loop.run(config, workdir, task)
            rate = _last_scalar(workdir, "train/steps_per_s")
            fraction = _last_scalar(workdir, "input/wait_fraction")
            per_step = _last_scalar(workdir, "input/wait_ms_per_step")
        device_rate = device_rate or rate
        stall = max(0.0, 1 - rate / device_rate)
        print(
            f"{name:<12} {depth:>8} {rate:>8.2f} {stall:>6.1%} {fraction:>9.1%} {per_step:>12.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
