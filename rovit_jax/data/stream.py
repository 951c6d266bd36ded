"""The deterministic example stream behind every training input pipeline.

Stream position p visits the dataset in a fresh permutation each epoch (epoch = p // n), seeded
by (seed, epoch). The global batch of step s holds positions [s * B, (s + 1) * B); each host takes
its contiguous slice. A batch is therefore a pure function of (seed, step), whatever the number
of hosts, and resuming needs only the step. An unusable example is replaced by a deterministic
substitute (`load_with_substitutes`), so one bad file never stops training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class EpochShuffledStream:
    """Maps stream positions and steps to (epoch, dataset index) for one host."""

    def __init__(
        self,
        num_examples: int,
        *,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if num_examples <= 0:
            raise ValueError("the data source is empty")
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(
                f"batch size {global_batch} must be positive and divisible by the "
                f"{process_count} hosts"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch
        self._perm_cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:  # Keep one epoch: steps are read in order.
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = {epoch: rng.permutation(self.num_examples)}
        return self._perm_cache[epoch]

    def index_at(self, position: int) -> tuple[int, int]:
        """(epoch, dataset index) of stream position `position`."""
        epoch = position // self.num_examples
        return epoch, int(self._permutation(epoch)[position % self.num_examples])

    def host_positions(self, step: int) -> range:
        """Stream positions of this host's examples at `step`."""
        start = step * self.global_batch + self.offset
        return range(start, start + self.local_batch)

    def positions(self, step: int) -> list[tuple[int, int]]:
        """(epoch, dataset index) pairs of this host's examples at `step` (before substitution)."""
        return [self.index_at(p) for p in self.host_positions(step)]


# Substitutes step through the dataset by a large prime stride: deterministic, and unlikely to
# land on a neighbour of the bad example (bad files often come in runs).
_SUBSTITUTE_STRIDE = 7919


def load_with_substitutes(
    index: int,
    num_examples: int,
    load: Callable[[int], T],
    *,
    errors: tuple[type[Exception], ...],
    max_substitutes: int,
    what: str = "example",
) -> tuple[int, T, bool]:
    """Loads dataset `index`, or a deterministic substitute when loading raises one of `errors`.

    Returns (dataset index used, loaded value, whether it is a substitute). Raises RuntimeError
    after `max_substitutes + 1` consecutive failures, quoting the last error.
    """
    last_error: Exception | None = None
    for attempt in range(max_substitutes + 1):
        idx = (index + attempt * _SUBSTITUTE_STRIDE) % num_examples
        try:
            return idx, load(idx), attempt > 0
        except errors as e:
            logging.warning("skipping %s %d: %s", what, idx, e)
            last_error = e
    raise RuntimeError(
        f"{max_substitutes + 1} consecutive unusable {what}s near dataset index {index}; "
        f"last error: {last_error}"
    )
