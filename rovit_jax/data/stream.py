"""The deterministic example stream behind every training input pipeline.

Stream position p visits the dataset in a fresh permutation each epoch (epoch = p // n), seeded
by (seed, epoch). The global batch of step s holds positions [s * B, (s + 1) * B); each host takes
its contiguous slice. A batch is therefore a pure function of (seed, step), whatever the number
of hosts, and resuming needs only the step. An unusable example is replaced by a deterministic
substitute (`load_with_substitutes`), so one bad file never stops training.

Rows are built by `num_workers` threads of this process, or by `worker_processes` spawned
processes, each holding a copy of the batcher (sent once): decoding and augmentation are Python
and PIL work, which threads share through the GIL, while processes use one core each. Rows are a
pure function of the stream position and come back in order, so batches and tallies are the same
for any number of threads or processes.

Why an example is unusable travels with the error: readers and checks raise a subclass of
`UnusableExampleError` carrying a short `reason` ("undecodable_image", "bad_mask_shape", ...),
and the batchers count skipped examples per reason (`error_reason`). A reader that wraps an
error (`raise CorruptImageError(f"{path}: {e}") from e`) keeps the inner reason: the reason is
looked up along the exception's cause chain.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import shared_memory
from typing import Any, Protocol, TypeVar

import numpy as np

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


# ---- rows built in worker processes ---------------------------------------------------------
_WORKER_BATCHER: Any = None  # in a worker process: its copy of the batcher


def _start_worker(batcher_state: bytes) -> None:
    global _WORKER_BATCHER
    # Stopping is the parent's business: it finishes its step, checkpoints, then shuts the
    # pool down; a SIGTERM/SIGINT sent to the whole process group must not kill rows mid-way.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_BATCHER = pickle.loads(batcher_state)


# Arrays at least this large travel through shared memory: pickling them through the pool's
# pipe costs several times a memory copy (a 1024 px detection row is about 19 MB).
_SHARED_MIN_BYTES = 1 << 16


class _SharedArray:
    """An array parked in a shared-memory block by a worker, for the parent to take."""

    def __init__(self, array: np.ndarray):
        block = shared_memory.SharedMemory(create=True, size=max(array.nbytes, 1))
        np.ndarray(array.shape, array.dtype, buffer=block.buf)[...] = array
        self.name, self.shape, self.dtype = block.name, array.shape, array.dtype
        block.close()

    def take(self, blocks: list) -> np.ndarray:
        """The array, as a view of the block (appended to `blocks`, for `_free` once the batch
        is assembled: copying it out here would cost one more pass over the bytes)."""
        block = shared_memory.SharedMemory(name=self.name)
        blocks.append(block)
        return np.ndarray(self.shape, self.dtype, buffer=block.buf)


def _free(blocks: list) -> None:
    """Releases shared-memory blocks whose arrays have been copied into a batch."""
    while blocks:
        block = blocks.pop()
        block.unlink()
        try:
            block.close()
        except BufferError:  # a caller still holds a view: the mapping goes when it does
            pass


def _park(value: Any) -> Any:
    """`value` (a row: nested dicts, tuples and lists) with large arrays moved to shared memory."""
    if isinstance(value, np.ndarray) and value.nbytes >= _SHARED_MIN_BYTES:
        return _SharedArray(value)
    if isinstance(value, dict):
        return {k: _park(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_park(v) for v in value)
    return value


def _unpark(value: Any, blocks: list) -> Any:
    if isinstance(value, _SharedArray):
        return value.take(blocks)
    if isinstance(value, dict):
        return {k: _unpark(v, blocks) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_unpark(v, blocks) for v in value)
    return value


def _worker_row(position: int) -> Any:
    return _park(_WORKER_BATCHER._row(position))


def process_pool(batcher: Any, processes: int) -> ProcessPoolExecutor:
    """`processes` spawned workers, each with its own unpickled copy of `batcher`.

    Spawned, not forked: the parent runs JAX's and TensorFlow's threads, which a fork would copy
    in whatever state they hold. The pool shuts down, and the shared memory of the last rows is
    freed, when `batcher` is garbage collected (or at exit).
    """
    pool = ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(pickle.dumps(batcher),),
    )
    weakref.finalize(batcher, pool.shutdown, wait=False, cancel_futures=True)
    weakref.finalize(batcher, _free, batcher._blocks)
    return pool


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
        self._processes: ProcessPoolExecutor | None = None
        self._blocks: list = []  # shared memory behind the last rows from the processes
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
        state = dict(self.__dict__, pool=None, _processes=None, worker_processes=0, _blocks=[])
        return state

    def _rows(self, step: int) -> list[Any]:
        """This host's rows of `step`, with their tallies counted in stream order."""
        positions = list(self.stream.host_positions(step))
        _free(self._blocks)  # the previous batch's rows: stacked into their batch by now
        if self.worker_processes:
            if self._processes is None:
                self._processes = process_pool(self, self.worker_processes)
            # Chunks of a few rows: each process streams rows back while it builds the next.
            chunk = -(-len(positions) // (4 * self.worker_processes))
            results = [
                _unpark(r, self._blocks)
                for r in self._processes.map(_worker_row, positions, chunksize=chunk)
            ]
        else:
            results = map_in_order(self.pool, self._row, positions)
        for _, reason, extra in results:
            if reason is not None:  # One count per replaced stream position.
                self.skipped += 1
                self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
            for group, table in extra.items():
                for key, n in table.items():
                    self.tallies[group][key] = self.tallies[group].get(key, 0) + n
        return [row for row, _, _ in results]

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
