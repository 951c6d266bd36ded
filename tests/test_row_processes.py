"""Rows built in worker processes (`data.worker_processes`) at sizes that use shared memory.

Arrays of at least `row_processes.SHARED_MIN_BYTES` are written by the workers straight into the
batch's shared file (or, when they do not fit its layout, into a file of their own). Every batch
must equal the in-process batcher's, in order or not, with the same tallies; the batch arrays
must be the shared ones (no copy in the parent); no shared file may outlive its use.
"""

import gc
import glob
import os

import numpy as np
import pytest
from test_hostile_inputs import ListSource, WordTokenizer, pretrain_corpus

from rovit_jax.data import image_text
from rovit_jax.data import row_processes as rp
from rovit_jax.data.stream import StreamBatches

BATCH = 8


def _leftover(batches) -> list[str]:
    return glob.glob(glob.escape(batches._processes.prefix) + "*")


def test_pretraining_batches_in_and_out_of_order_equal_in_process_ones_without_copies():
    items, planted, _, _ = pretrain_corpus()  # 32 examples, 11 of them unusable
    kw = dict(global_batch=BATCH, image_size=96, seed=4)  # a row: 96 * 96 * 3 float32 = 108 KiB
    assert 96 * 96 * 3 * 4 >= rp.SHARED_MIN_BYTES
    serial = image_text.PretrainBatches(ListSource(items), WordTokenizer(), **kw)
    processes = image_text.PretrainBatches(
        ListSource(items), WordTokenizer(), worker_processes=2, **kw
    )
    # In order over more than an epoch, then steps out of order and repeated: the rows built
    # ahead are thrown away, and counts follow the batches asked for, as they do in process.
    for k, step in enumerate([0, 1, 2, 3, 4, 5, 2, 2, 0, 7]):
        a, b = serial.batch(step), processes.batch(step)
        np.testing.assert_array_equal(a["image"], b["image"], err_msg=f"step {step}")
        np.testing.assert_array_equal(a["text"], b["text"])
        assert processes.counts() == serial.counts(), step
        # From the third batch on (the layout is learned from the first) and whenever the step
        # was built ahead, the image batch is the workers' shared array itself.
        if 2 <= k <= 5:
            assert any(b["image"] is whole for whole in processes._processes.batch_arrays)
            assert not b["image"].flags.owndata
    assert serial.skipped == processes.skipped > sum(planted.values())  # an epoch and more
    # Between batches, only the step built ahead has shared files.
    assert 1 <= len(_leftover(processes)) <= 1 + BATCH
    prefix = processes._processes.prefix
    del processes
    gc.collect()
    assert glob.glob(glob.escape(prefix) + "*") == []


class ShapeShifter(StreamBatches):
    """Rows with a large array of fixed shape, one whose shape changes every step, a small
    array and a nested tuple; batches stack them."""

    def __init__(self, worker_processes=0, fail_at=None):
        super().__init__(
            64,
            global_batch=BATCH,
            seed=1,
            process_index=0,
            process_count=1,
            num_workers=1,
            tallies={"odd": ["rows"]},
            worker_processes=worker_processes,
        )
        self.fail_at = fail_at

    def _row(self, position):
        if position == self.fail_at:
            raise RuntimeError(f"row {position} failed on purpose")
        _, index = self.index_at(position)
        rng = np.random.default_rng(index)
        step = position // BATCH
        row = {
            "fixed": rng.normal(size=(64, 64, 8)).astype(np.float32),  # 128 KiB
            "varying": np.full((130 + step % 3, 128), index, np.float32),  # about 66 KiB
            "small": np.asarray([index, position], np.int64),
            "pair": (rng.integers(0, 255, (300, 300), np.uint8), index),  # 88 KiB, an int
        }
        return row, None, {"odd": {"rows": index % 2}}

    def batch(self, step):
        rows = self._rows(step)
        out = {k: self.stack([r[k] for r in rows]) for k in ("fixed", "varying", "small")}
        out["pair0"] = self.stack([r["pair"][0] for r in rows])
        out["pair1"] = np.asarray([r["pair"][1] for r in rows])
        return out


def test_arrays_that_change_shape_travel_in_their_own_files_and_batches_stay_equal():
    serial, processes = ShapeShifter(), ShapeShifter(worker_processes=2)
    for step in range(5):
        a, b = serial.batch(step), processes.batch(step)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} at step {step}")
        if step >= 2:
            shared = processes._processes.batch_arrays
            assert any(b["fixed"] is w for w in shared) and any(b["pair0"] is w for w in shared)
            assert not any(b["varying"] is w for w in shared) and b["varying"].flags.owndata
    assert processes.counts() == serial.counts() and serial.counts()["odd/rows"] > 0


def test_a_failing_row_raises_in_the_parent_and_leaves_no_file():
    processes = ShapeShifter(worker_processes=2, fail_at=3 * BATCH + 5)
    for step in range(3):
        processes.batch(step)
    with pytest.raises(RuntimeError, match=f"row {3 * BATCH + 5} failed on purpose"):
        processes.batch(3)
    # The step after it was queued before the failure, and is served as usual.
    np.testing.assert_array_equal(processes.batch(4)["fixed"], ShapeShifter().batch(4)["fixed"])
    prefix = processes._processes.prefix
    del processes
    gc.collect()
    assert glob.glob(glob.escape(prefix) + "*") == []


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="space is reserved on Linux only")
def test_a_full_shared_memory_folder_is_an_error_naming_size_folder_and_remedy(
    tmp_path, monkeypatch
):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    path = str(tmp_path / "rows-b0")
    with pytest.raises(OSError, match=r"reserve 3\.0 MiB .* in .*No space left.*--shm-size"):
        rp.create_shared(path, 3 << 20, reserve_all=True)
    assert not os.path.exists(path)


def test_files_of_a_killed_parent_are_removed_by_the_next_one():
    """A parent killed mid-batch cannot remove its shared files; the next batcher to start
    removes those whose parent is gone, and leaves a live parent's alone."""
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(gone.stdout)
    folder = rp.shared_dir()
    orphan = os.path.join(folder, f"rovit-rows-{dead_pid}-deadbeef-b0")
    mine = os.path.join(folder, f"rovit-rows-{os.getpid()}-cafecafe-b0")
    for path in (orphan, mine):
        open(path, "wb").close()
    try:
        batches = ShapeShifter(worker_processes=1)
        batches.batch(0)  # starts the workers, and with them the clean-up
        assert not os.path.exists(orphan)
        assert os.path.exists(mine)
        del batches
    finally:
        for path in (orphan, mine):
            if os.path.exists(path):
                os.unlink(path)
