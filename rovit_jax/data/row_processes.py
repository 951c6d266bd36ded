"""Batch rows built in worker processes and written straight into the batch's shared memory.

`RowProcesses(batcher, processes, stream)` runs `batcher._row(position)` (see
`stream.StreamBatches`) in `processes` spawned worker processes, each holding its own unpickled
copy of the batcher. Rows are a pure function of the stream position and come back in stream
order, so batches and tallies do not depend on the number of processes.

Why not pickles, or a block per row: a 1024 px detection row is about 19 MB. Pickling it through
the pool's pipe, or copying it out of a worker's block into the stacked batch, costs the parent
one pass over the bytes per row, on a core the workers need. Instead the parent maps one shared
file per batch, laid out as the batch's stacked arrays (`[batch, ...]` for each large array of a
row, the layout learned from the previous batch); each worker writes the large arrays of its
rows into their row of that file; the parent's rows are views of it, and `stack` hands back the
whole `[batch, ...]` array without a copy. A large array that does not fit the layout (in the
first batches, or a row of another shape) travels in a file of its own and is copied by
`np.stack` as before.

Look-ahead: while the parent waits for step s's rows, the workers already build step s + 1's
(training reads steps in order), so a worker that finishes its share of a batch goes on to the
next one instead of idling at the batch boundary. Asking for another step throws that work
away. Tallies are counted by the caller from the rows it receives, never from rows built ahead.

The files live in /dev/shm (memory, as POSIX shared memory does) or, without it, in the temp
folder. Their space is reserved when they are created, so a full /dev/shm is an error naming the
size and the folder rather than a SIGBUS in a worker (Docker gives containers 64 MB of /dev/shm
unless told `--shm-size`). They are removed when the batcher goes (or at exit); the files of a
parent that was killed are removed by the next one to start on the machine.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import itertools
import mmap
import multiprocessing
import os
import pickle
import re
import secrets
import signal
import tempfile
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

# Arrays at least this large travel through shared memory; smaller ones are pickled.
SHARED_MIN_BYTES = 1 << 16
_ALIGN = 64  # byte alignment of each array in a batch file


def shared_dir() -> str:
    """Where the shared files go: /dev/shm when it is there and writable, else the temp folder."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def reserve(fd: int, path: str, offset: int, length: int) -> None:
    """Allocates bytes [offset, offset + length) of the shared file `path` (open as `fd`).

    Without it a full /dev/shm shows up as a SIGBUS when the bytes are written; with it, as an
    OSError naming the size and folder, and what to do.
    """
    if not hasattr(os, "posix_fallocate"):  # the temp folder, on disk, outside Linux
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        raise OSError(
            e.errno or errno.ENOSPC,
            f"worker processes (data.worker_processes) could not reserve "
            f"{length / 2**20:.1f} MiB of shared memory in {os.path.dirname(path)} "
            f"({e.strerror}): give it more room (Docker: --shm-size) or set "
            "data.worker_processes=0",
        ) from e


def create_shared(path: str, size: int, *, reserve_all: bool) -> mmap.mmap:
    """A new file of `size` bytes at `path`, mapped read-write; its space reserved at once
    when `reserve_all` (otherwise by each writer, for the bytes it writes)."""
    size = max(int(size), 1)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        if reserve_all:
            try:
                reserve(fd, path, 0, size)
            except OSError:
                os.unlink(path)
                raise
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _map_existing(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One `[batch, ...]` array of a batch file."""

    leaf: tuple  # where the array sits in a row: dict keys and sequence indices
    offset: int
    shape: tuple[int, ...]  # [batch, ...]
    dtype: str


@dataclasses.dataclass
class _BatchFile:
    """A batch's shared file: what a worker needs to write its rows into it (and, in the
    parent, the parent's mapping of it, which is not sent)."""

    path: str
    slots: tuple[_Slot, ...]
    buffer: mmap.mmap | None = None

    @classmethod
    def create(cls, path: str, layout: dict[tuple, tuple[tuple, str]], rows: int) -> _BatchFile:
        slots, offset = [], 0
        for leaf, (shape, dtype) in layout.items():
            slot = _Slot(leaf, offset, (rows, *shape), dtype)
            slots.append(slot)
            nbytes = int(np.prod(slot.shape)) * np.dtype(dtype).itemsize
            offset += -(-nbytes // _ALIGN) * _ALIGN
        # Workers reserve the rows they write: zeroing the pages is then their work, in
        # parallel, not the parent's.
        return cls(path, tuple(slots), create_shared(path, offset, reserve_all=False))

    def arrays(self, buffer: mmap.mmap | None = None) -> dict[tuple, np.ndarray]:
        """{leaf: [batch, ...] array} viewing the file (mapped here unless `buffer` is given)."""
        buffer = _map_existing(self.path) if buffer is None else buffer
        return {
            s.leaf: np.frombuffer(
                buffer, s.dtype, count=int(np.prod(s.shape)), offset=s.offset
            ).reshape(s.shape)
            for s in self.slots
        }

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, buffer=None)


@dataclasses.dataclass(frozen=True)
class _InBatch:
    """A row's array written into its row of the batch file's array at `leaf`."""

    leaf: tuple


@dataclasses.dataclass(frozen=True)
class _OwnFile:
    """A row's array that did not fit the batch file, in a shared file of its own."""

    path: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def write(cls, array: np.ndarray, path: str) -> _OwnFile:
        buffer = create_shared(path, array.nbytes, reserve_all=True)
        np.frombuffer(buffer, array.dtype, count=array.size).reshape(array.shape)[...] = array
        return cls(path, array.shape, array.dtype.str)

    def take(self) -> np.ndarray:
        """The array, viewing the file's mapping; the file's name is removed at once (the
        mapping lives as long as the array)."""
        buffer = _map_existing(self.path)
        _remove(self.path)
        return np.frombuffer(buffer, self.dtype, count=int(np.prod(self.shape))).reshape(self.shape)


def _walk(value: Any, leaf: tuple, fn: Callable[[Any, tuple], Any]) -> Any:
    """`value` (nested dicts, tuples and lists) with `fn(x, leaf)` applied to every other x."""
    if isinstance(value, dict):
        return {k: _walk(v, (*leaf, k), fn) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_walk(v, (*leaf, i), fn) for i, v in enumerate(value))
    return fn(value, leaf)


def _large(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.nbytes >= SHARED_MIN_BYTES


def layout_of(rows: Sequence[Any]) -> dict[tuple, tuple[tuple, str]]:
    """{leaf: (shape, dtype)} of the large arrays that every row has with the same shape."""
    layout: dict[tuple, tuple[tuple, str]] | None = None
    for row in rows:
        found: dict[tuple, tuple[tuple, str]] = {}

        def note(x: Any, leaf: tuple, found=found) -> Any:
            if _large(x):
                found[leaf] = (tuple(x.shape), x.dtype.str)
            return x

        _walk(row, (), note)
        layout = found if layout is None else {k: v for k, v in layout.items() if found.get(k) == v}
    return layout or {}


# ---- the worker side ------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}  # in a worker process: its batcher and file-name prefix


def _start_worker(batcher_state: bytes, prefix: str) -> None:
    # Stopping is the parent's business: it finishes its step, checkpoints, then shuts the
    # pool down; a SIGTERM/SIGINT sent to the whole process group must not kill rows mid-way.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(
        batcher=pickle.loads(batcher_state),
        prefix=f"{prefix}-w{os.getpid()}-",
        count=itertools.count(),
    )


def _build_rows(positions: Sequence[int], first_row: int, batch_file: _BatchFile | None) -> list:
    """`_row` of each position, large arrays moved into `batch_file` or files of their own."""
    fd = os.open(batch_file.path, os.O_RDWR) if batch_file is not None else -1
    try:
        arrays = batch_file.arrays(mmap.mmap(fd, 0)) if batch_file is not None else {}
        offsets = {s.leaf: s.offset for s in batch_file.slots} if batch_file is not None else {}
        out = []
        for i, position in enumerate(positions):
            row, reason, extra = _WORKER["batcher"]._row(position)

            def park(x: Any, leaf: tuple, row_index=first_row + i) -> Any:
                if not _large(x):
                    return x
                target = arrays.get(leaf)
                if target is not None and target.shape[1:] == x.shape and target.dtype == x.dtype:
                    reserve(fd, batch_file.path, offsets[leaf] + row_index * x.nbytes, x.nbytes)
                    target[row_index] = x
                    return _InBatch(leaf)
                return _OwnFile.write(x, f"{_WORKER['prefix']}{next(_WORKER['count'])}")

            out.append((_walk(row, (), park), reason, extra))
        return out
    finally:
        if fd >= 0:
            os.close(fd)


# ---- the parent side ------------------------------------------------------------------------
@dataclasses.dataclass
class _Pending:
    """One step's rows on their way: a future per chunk of consecutive rows."""

    step: int
    futures: list[Future]
    batch_file: _BatchFile | None


def _discard_rows(rows: list) -> None:
    for row, _, _ in rows:
        _walk(row, (), lambda x, _: _remove(x.path) if isinstance(x, _OwnFile) else x)


def _discard(pending: _Pending, start: int = 0) -> None:
    """Drops the rows of `pending.futures[start:]` (waiting for those already running)."""
    for future in pending.futures[start:]:
        if future.cancel():
            continue
        try:
            _discard_rows(future.result())
        except Exception:  # noqa: BLE001 - rows thrown away; their error does not matter
            pass
    if pending.batch_file is not None:
        _remove(pending.batch_file.path)


_PREFIX = "rovit-rows-"  # then the parent's pid: rovit-rows-<pid>-<token>-...


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_orphans(folder: str) -> list[str]:
    """Removes the shared files of parents that died without cleaning up (killed, crashed):
    their names carry the parent's pid. Returns the paths removed."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), _PREFIX + "*")):
        match = re.match(re.escape(_PREFIX) + r"(\d+)-", os.path.basename(path))
        if match and not _alive(int(match.group(1))):
            _remove(path)
            removed.append(path)
    return removed


def _shut_down(pool: ProcessPoolExecutor, prefix: str) -> None:
    pool.shutdown(wait=True, cancel_futures=True)
    for path in glob.glob(glob.escape(prefix) + "*"):  # rows built ahead and never taken
        _remove(path)


class RowProcesses:
    """`processes` spawned workers building `batcher`'s rows, one step ahead of the caller.

    The workers shut down, and leftover shared files are removed, when this object is garbage
    collected (or at exit).
    """

    def __init__(self, batcher: Any, processes: int, host_positions: Callable[[int], range]):
        self.host_positions = host_positions
        self.processes = int(processes)
        folder = shared_dir()
        # The finalizer below cleans up at exit; a parent that is killed cannot, so the next
        # one removes what it left.
        remove_orphans(folder)
        self.prefix = os.path.join(folder, f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        # Spawned, not forked: the parent runs JAX's and TensorFlow's threads, which a fork
        # would copy in whatever state they hold.
        self.pool = ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(pickle.dumps(batcher), self.prefix),
        )
        weakref.finalize(self, _shut_down, self.pool, self.prefix)
        self._files = itertools.count()
        self._layout: dict[tuple, tuple[tuple, str]] = {}
        self._ahead: _Pending | None = None
        # The [batch, ...] arrays behind the last rows returned (see `stack`).
        self.batch_arrays: list[np.ndarray] = []

    def _submit(self, step: int) -> _Pending:
        positions = list(self.host_positions(step))
        batch_file = None
        if self._layout:
            path = f"{self.prefix}-b{next(self._files)}"
            batch_file = _BatchFile.create(path, self._layout, len(positions))
        # Chunks of a few rows: each process streams rows back while it builds the next.
        chunk = -(-len(positions) // (4 * self.processes))
        starts = list(range(0, len(positions), chunk))
        futures = [
            self.pool.submit(_build_rows, positions[s : s + chunk], s, batch_file) for s in starts
        ]
        return _Pending(step, futures, batch_file)

    def rows(self, step: int) -> list[tuple[Any, str | None, Any]]:
        """[(row, skip reason, tallies)] of this host's positions at `step`, in stream order.

        Large arrays of the rows are views of shared memory; `stack` turns a column of rows
        back into the batch's array without copying when they are its rows.
        """
        pending = self._ahead
        self._ahead = None
        if pending is None or pending.step != step:
            if pending is not None:
                _discard(pending)
            pending = self._submit(step)
        try:
            self._ahead = self._submit(step + 1)  # queued behind this step's rows
        except BaseException:
            _discard(pending)
            raise
        arrays = pending.batch_file.arrays(pending.batch_file.buffer) if pending.batch_file else {}
        results: list = []
        try:
            for k, future in enumerate(pending.futures):
                try:
                    built = future.result()
                except BaseException:
                    _discard(pending, k + 1)
                    raise

                def unpark(x: Any, leaf: tuple) -> Any:
                    if isinstance(x, _InBatch):  # the row being unparked is row len(results)
                        return arrays[x.leaf][len(results)]
                    return x.take() if isinstance(x, _OwnFile) else x

                for row, reason, extra in built:
                    results.append((_walk(row, (), unpark), reason, extra))
        finally:
            if pending.batch_file is not None:
                _remove(pending.batch_file.path)  # the mapping stays while its arrays live
        self.batch_arrays = list(arrays.values())
        self._layout = layout_of([row for row, _, _ in results])
        return results

    def stack(self, arrays: Sequence[np.ndarray]) -> np.ndarray | None:
        """The `[batch, ...]` array whose rows are exactly `arrays`, or None."""
        for whole in self.batch_arrays:
            if len(arrays) == len(whole) and all(
                isinstance(a, np.ndarray)
                and a.shape == whole.shape[1:]
                and a.dtype == whole.dtype
                and a.ctypes.data == whole.ctypes.data + i * whole.strides[0]
                for i, a in enumerate(arrays)
            ):
                return whole
        return None
