"""The training loop's metric writer: every scalar to TensorBoard, a readable line to the log.

The input pipeline reports a counter per reason an example was substituted (undecodable image,
empty caption, ...). TensorBoard gets all of them at every log step; the log line names only
those that are non-zero, so a healthy run's log is not twenty zeros every `log_every` steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clu import metric_writers

__all__ = ["INPUT_COUNTER_PREFIXES", "create_writer"]

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


def create_writer(workdir: str, *, just_logging: bool) -> metric_writers.MetricWriter:
    """Asynchronous log + TensorBoard writer (log only where `just_logging`: non-chief hosts)."""
    writers: list[metric_writers.MetricWriter] = [_LoggingWriterWithoutZeroCounters()]
    if not just_logging:
        writers.append(metric_writers.SummaryWriter(workdir))
    return metric_writers.AsyncMultiWriter(writers)
