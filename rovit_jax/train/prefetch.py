"""Batches produced ahead of the training step, on a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any


def prefetch(
    make_batch: Callable[[int], Any], start_step: int, end_step: int, *, depth: int = 2
) -> Iterator[tuple[int, Any]]:
    """Yields `(step, make_batch(step))` for steps in [start, end), produced on a background thread.

    Host-side decoding then overlaps the device step. Exceptions from the producer are re-raised.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for step in range(start_step, end_step):
                if stop.is_set():
                    return
                q.put((step, make_batch(step)))
        except BaseException as e:  # pylint: disable=broad-except
            q.put(e)
            return
        q.put(None)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # Unblock a producer waiting on a full queue.
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
