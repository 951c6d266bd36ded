"""The deterministic example stream behind every training input pipeline.

Stream position p visits the dataset in a fresh permutation each epoch (epoch = p // n), seeded
by (seed, epoch). The global batch of step s holds positions [s * B, (s + 1) * B); each host takes
its contiguous slice. A batch is therefore a pure function of (seed, step), whatever the number
of hosts, and resuming needs only the step. An unusable example is replaced by a deterministic
substitute (`load_with_substitutes`), so one bad file never stops training.

Rows are built by `num_workers` threads of this process, or by `worker_processes` spawned
processes (`row_processes`), each holding a copy of the batcher (sent once): decoding and
augmentation are Python and PIL work, which threads share through the GIL, while processes use
one core each. Rows are a pure function of the stream position and come back in order, so
batches and tallies are the same for any number of threads or processes.

Why an example is unusable travels with the error: readers and checks raise a subclass of
`UnusableExampleError` carrying a short `reason` ("undecodable_image", "bad_mask_shape", ...),
and the batchers count skipped examples per reason (`error_reason`). A reader that wraps an
error (`raise CorruptImageError(f"{path}: {e}") from e`) keeps the inner reason: the reason is
looked up along the exception's cause chain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np

from rovit_jax.data.row_processes import RowProcesses

T = TypeVar("T")

# Reason of a wrapped OSError (permission denied, I/O error, ...) that names no reason itself.
UNREADABLE_FILE = "unreadable_file"


class UnusableExampleError(ValueError):
    """An example that cannot be served as it is; `reason` says why in a short snake_case key.

    Subclasses set `default_reason`, used when no reason is given here or along the cause chain.
    """

    default_reason = "unusable_example"

    def __init__(self, message: str = "", *, reason: str | None = None):
        super().__init__(message)
        self.explicit_reason = reason

    @property
    def reason(self) -> str:
        return error_reason(self)


def error_reason(error: BaseException) -> str:
    """The counting key of an error that made an example unusable.

    The first explicit `reason` along the chain of causes (outermost first) wins; otherwise
    "unreadable_file" when an OSError is in the chain; otherwise the outermost error's
    `default_reason` ("unusable_example" for other error types).
    """
    seen: set[int] = set()
    node: BaseException | None = error
    os_error = False
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        reason = getattr(node, "explicit_reason", None)
        if reason:
            return str(reason)
        os_error = os_error or isinstance(node, OSError)
        node = node.__cause__ or (None if node.__suppress_context__ else node.__context__)
    if os_error:
        return UNREADABLE_FILE
    return str(getattr(type(error), "default_reason", UnusableExampleError.default_reason))


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
    failures: list[Exception] | None = None,
) -> tuple[int, T, bool]:
    """Loads dataset `index`, or a deterministic substitute when loading raises one of `errors`.

    Returns (dataset index used, loaded value, whether it is a substitute). Each caught error is
    appended to `failures` when given (the first one is the original example's). Raises
    RuntimeError after `max_substitutes + 1` consecutive failures, quoting the last error.
    """
    last_error: Exception | None = None
    for attempt in range(max_substitutes + 1):
        idx = (index + attempt * _SUBSTITUTE_STRIDE) % num_examples
        try:
            return idx, load(idx), attempt > 0
        except errors as e:
            logging.warning("skipping %s %d: %s", what, idx, e)
            if failures is not None:
                failures.append(e)
            last_error = e
    raise RuntimeError(
        f"{max_substitutes + 1} consecutive unusable {what}s near dataset index {index}; "
        f"last error: {last_error}"
    )


def worker_pool(num_workers: int) -> ThreadPoolExecutor | None:
    """Threads that decode and augment a batch's examples (PIL releases the GIL), or None."""
    if int(num_workers) != num_workers or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    return ThreadPoolExecutor(int(num_workers)) if num_workers > 1 else None


def map_in_order(
    pool: ThreadPoolExecutor | None, fn: Callable[[Any], T], items: Iterable
) -> list[T]:
    """[fn(x) for x in items], on the pool when there is one; results keep the input order, so
    batches do not depend on the number of workers."""
    if pool is None:
        return [fn(x) for x in items]
    return list(pool.map(fn, items))


class Batches(Protocol):
    """A task's training input, as the training loop reads it."""

    skipped: int  # replaced (substituted) stream positions so far, over all reasons

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's share of the global batch of `step` (a pure function of seed and step)."""

    def counts(self) -> dict[str, int]:
        """Flat tallies `{"<group>/<key>": n}` for logging and checkpointing."""

    def restore_counts(self, counts: Mapping[str, int]) -> None:
        """Restores tallies saved from `counts()` (on resume)."""


class StreamBatches:
    """The shared part of the training batchers: this host's slice of an `EpochShuffledStream`,
    rows built in stream order by `num_workers` threads or, when `worker_processes` > 0, by
    that many worker processes (started at the first batch), and tallies kept per group.

    A subclass implements `_row(position) -> (row, skip reason or None, {group: {key: n}})` and
    `batch(step)` from `_rows(step)`. A skip reason counts one replaced stream position in
    `skipped` and in the "skipped" group; other groups (e.g. dropped instances) add up as given.
    Rows, batches and counts are the same for any number of workers.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        global_batch: int,
        seed: int,
        process_index: int,
        process_count: int,
        num_workers: int,
        tallies: Mapping[str, Sequence[str]],
        worker_processes: int = 0,
    ):
        self.stream = EpochShuffledStream(
            num_examples,
            global_batch=global_batch,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
        self.index_at, self.positions = self.stream.index_at, self.stream.positions
        self.pool = worker_pool(num_workers)
        if int(worker_processes) != worker_processes or worker_processes < 0:
            raise ValueError(f"worker_processes must be an integer >= 0, got {worker_processes!r}")
        self.worker_processes = int(worker_processes)
        self._processes: RowProcesses | None = None
        self.global_batch, self.seed = global_batch, seed
        # Every known key is present from the start (zeros too): a log or checkpoint of the
        # counts has the same keys whatever happened.
        self.tallies = {group: dict.fromkeys(keys, 0) for group, keys in tallies.items()}
        self.tallies.setdefault("skipped", {})
        self.skipped_by_reason = self.tallies["skipped"]
        self.skipped = 0

    def _row(self, position: int) -> tuple[Any, str | None, Mapping[str, Mapping[str, int]]]:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        # What a worker process receives: no pools (it builds rows one by one itself).
        return dict(self.__dict__, pool=None, _processes=None, worker_processes=0)

    def _rows(self, step: int) -> list[Any]:
        """This host's rows of `step`, with their tallies counted in stream order."""
        if self.worker_processes:
            if self._processes is None:
                self._processes = RowProcesses(
                    self, self.worker_processes, self.stream.host_positions
                )
            results = self._processes.rows(step)
        else:
            results = map_in_order(self.pool, self._row, self.stream.host_positions(step))
        for _, reason, extra in results:
            if reason is not None:  # One count per replaced stream position.
                self.skipped += 1
                self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
            for group, table in extra.items():
                for key, n in table.items():
                    self.tallies[group][key] = self.tallies[group].get(key, 0) + n
        return [row for row, _, _ in results]

    def stack(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """np.stack(arrays); without a copy when they are the rows of a batch array that worker
        processes wrote in place (the array is then returned itself)."""
        whole = self._processes.stack(arrays) if self._processes is not None else None
        return np.stack(arrays) if whole is None else whole

    def counts(self) -> dict[str, int]:
        """Flat tallies `{"<group>/<key>": n}`, every known key present (zeros too)."""
        return {
            f"{group}/{key}": n for group, table in self.tallies.items() for key, n in table.items()
        }

    def restore_counts(self, counts: Mapping[str, int]) -> None:
        """Restores tallies saved from `counts()` (e.g. on resume); `skipped` becomes the sum of
        the per-reason skips."""
        for key, n in counts.items():
            group, _, name = str(key).partition("/")
            if group in self.tallies and name:
                self.tallies[group][name] = int(n)
        self.skipped = sum(self.skipped_by_reason.values())


def eval_host_indices(
    num_examples: int, batch_size: int, process_index: int, process_count: int
) -> Iterator[range]:
    """This host's dataset indices in each global evaluation batch, padded to full batches.

    Every host gets the same number of batches (big_vision-style padding): `ceil(n / batch_size)`
    ranges of `batch_size // process_count` indices each; indices >= `num_examples` are padding.
    """
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be positive and divisible by the {process_count} hosts"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = batch_size // process_count
    for b in range(-(-num_examples // batch_size)):
        first = b * batch_size + process_index * local
        yield range(first, first + local)
