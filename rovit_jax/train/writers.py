"""The training loop's metric writer: every scalar to TensorBoard, a readable line to the log.

TensorBoard event files are written here, not by clu's TensorFlow SummaryWriter: TensorFlow
writes through its own gfile, which reaches `gs://` only at Google's endpoint, while every byte
of a run must go through `rovit_jax.paths` (a bucket, or the local emulator the tests use). The
records are the ones `tf.summary` writes (TFRecord-framed `Event` protos; scalars as tensor
summaries of the "scalars" plugin, hyperparameters through the hparams plugin).

The input pipeline reports a counter per reason an example was substituted (undecodable image,
empty caption, ...). TensorBoard gets all of them at every log step; the log line names only
those that are non-zero, so a healthy run's log is not twenty zeros every `log_every` steps.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.scalar import summary_v2 as scalar_summary

from rovit_jax import paths
from rovit_jax.data.web_shards import masked_crc32c

__all__ = ["INPUT_COUNTER_PREFIXES", "EventFileWriter", "create_writer"]

# Per-reason input counters, as the loop writes the batchers' `counts()`: substituted examples
# ("skipped/<reason>") and, for detection, instances dropped from examples ("dropped/<reason>")
# and how dropped boxes were bad ("bad_box/<kind>").
INPUT_COUNTER_PREFIXES = ("input/skipped/", "input/dropped/", "input/bad_box/")


class _LoggingWriterWithoutZeroCounters(metric_writers.LoggingWriter):
    """clu's LoggingWriter, minus input counters that are zero."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        kept = {
            k: v
            for k, v in scalars.items()
            if not (k.startswith(INPUT_COUNTER_PREFIXES) and v == 0)
        }
        super().write_scalars(step, kept)


class EventFileWriter(metric_writers.MetricWriter):
    """TensorBoard event files in `logdir` (local or `gs://`), written through rovit_jax.paths.

    An object in a bucket cannot be appended to, so each flush rewrites the current file whole
    (an upload is all-or-nothing: readers see the previous or the new content); past
    `rollover_bytes` the next records go to a new file, which TensorBoard reads after the first.
    Writes scalars and hyperparameters, the two kinds the training loop logs.
    """

    def __init__(self, logdir: str, *, rollover_bytes: int = 1 << 20):
        self._logdir = paths.absolute(logdir)
        self._rollover_bytes = rollover_bytes
        self._files = 0
        self._start_file()

    def _start_file(self) -> None:
        # TensorBoard finds event files by "tfevents" in the name; the rest keeps the names of
        # several hosts and restarts apart, in the order they were written.
        self._path = os.path.join(
            self._logdir,
            f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}."
            f"{self._files}.v2",
        )
        self._files += 1
        self._records: list[bytes] = []
        self._written = 0
        self._append(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _append(self, event: event_pb2.Event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._records.append(
            header
            + struct.pack("<I", masked_crc32c(header))
            + data
            + struct.pack("<I", masked_crc32c(data))
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        summaries = [scalar_summary.scalar_pb(k, float(np.asarray(v))) for k, v in scalars.items()]
        event = event_pb2.Event(wall_time=time.time(), step=int(step))
        for summary in summaries:
            event.summary.value.extend(summary.value)
        self._append(event)
        self.flush()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        kept = {
            k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in hparams.items()
        }
        summary = hparams_summary.hparams_pb(kept)
        self._append(event_pb2.Event(wall_time=time.time(), summary=summary))
        self.flush()

    def _unsupported(self, *_: Any, **__: Any) -> None:
        raise NotImplementedError(
            "EventFileWriter writes scalars and hparams only (what the training loop logs)"
        )

    write_summaries = write_images = write_videos = write_audios = _unsupported
    write_texts = write_histograms = _unsupported

    def flush(self) -> None:
        if len(self._records) == self._written:
            return
        paths.write_bytes(self._path, b"".join(self._records))
        self._written = len(self._records)
        if sum(map(len, self._records)) > self._rollover_bytes:
            self._start_file()

    def close(self) -> None:
        self.flush()


def create_writer(workdir: str, *, just_logging: bool) -> metric_writers.MetricWriter:
    """Asynchronous log + TensorBoard writer (log only where `just_logging`: non-chief hosts)."""
    writers: list[metric_writers.MetricWriter] = [_LoggingWriterWithoutZeroCounters()]
    if not just_logging:
        writers.append(EventFileWriter(workdir))
    return metric_writers.AsyncMultiWriter(writers)
