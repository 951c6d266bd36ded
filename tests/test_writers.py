"""The loop's metric writer: TensorBoard keeps every input counter, the log line only non-zero."""

import logging

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from rovit_jax.data.detection_example import (
    BAD_BOX_KINDS,
    DETECTION_SKIP_REASONS,
    DROP_REASONS,
)
from rovit_jax.data.image_text import PRETRAIN_SKIP_REASONS
from rovit_jax.train.writers import EventFileWriter, create_writer

SCALARS = {
    "train/loss": 1.25,
    "input/wait_fraction": 0.0,  # not a counter: logged even when zero
    "input/skipped/undecodable_image": 0,
    "input/skipped/empty_caption": 3,
    "input/dropped/too_small": 0,
    "input/dropped/truncated": 2,
}


def _logged(caplog, writer, step):
    caplog.clear()
    # clu logs through absl's logger, whose level an earlier test in the same worker may have
    # raised (absl verbosity): set that logger's level, not only the root's.
    with caplog.at_level(logging.INFO, logger="absl"):
        writer.write_scalars(step, SCALARS)
        writer.flush()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"[{step}]")]


def test_log_line_drops_zero_counters_and_tensorboard_keeps_them(tmp_path, caplog):
    writer = create_writer(str(tmp_path), just_logging=False)
    (line,) = _logged(caplog, writer, 7)
    writer.close()
    for key in ("train/loss=1.25", "input/wait_fraction=0", "empty_caption=3", "truncated=2"):
        assert key in line, line
    assert "undecodable_image" not in line and "too_small" not in line

    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["tensors"]) == set(SCALARS)


def test_every_counter_the_batchers_keep_is_left_out_of_the_log_when_zero(tmp_path, caplog):
    # The groups and reasons the two training batchers tally (data/detection_example.py
    # and data/image_text.py), written by the loop as `input/<group>/<reason>`.
    groups = {
        "skipped": DETECTION_SKIP_REASONS + PRETRAIN_SKIP_REASONS,
        "dropped": DROP_REASONS,
        "bad_box": BAD_BOX_KINDS,
    }
    zeros = {f"input/{g}/{r}": 0 for g, reasons in groups.items() for r in reasons}
    writer = create_writer(str(tmp_path), just_logging=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):
        writer.write_scalars(5, {"train/loss": 0.5, **zeros})
        writer.flush()
    writer.close()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[5]")]
    assert line == "[5] train/loss=0.5", line


def test_non_chief_hosts_only_log(tmp_path, caplog):
    writer = create_writer(str(tmp_path), just_logging=True)
    assert len(_logged(caplog, writer, 3)) == 1
    writer.close()
    assert list(tmp_path.iterdir()) == []  # no event file


def _read_events(logdir):
    """(step, tag, value) of every scalar TensorBoard's own reader finds in `logdir`."""
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return sorted(
        (e.step, tag, float(tensor_util.make_ndarray(e.tensor_proto)))
        for tag in acc.Tags()["tensors"]
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
        for e in acc.Tensors(tag)
    )


def test_event_files_hold_every_scalar_exactly_across_rollovers(tmp_path):
    # A tiny rollover size forces a new file after each write: TensorBoard must still read
    # every value, in order, from the files together (and CRCs must be right, or it drops them).
    writer = EventFileWriter(str(tmp_path), rollover_bytes=64)
    expected = []
    for step in range(5):
        values = {"train/loss": 1.0 / (step + 1), "lr": step * 0.25}
        writer.write_scalars(step, values)
        expected += [(step, k, float(np.float32(v))) for k, v in values.items()]
    writer.write_hparams({"model.width": 64, "name": "x", "mesh": (("data", 8),)})
    writer.close()
    assert len([p for p in tmp_path.iterdir() if "tfevents" in p.name]) >= 5
    assert _read_events(tmp_path) == sorted(expected)
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    (hparams_tag,) = [t for t in acc.Tags()["tensors"] if t.startswith("_hparams_")]
    assert acc.SummaryMetadata(hparams_tag).plugin_data.plugin_name == "hparams"
