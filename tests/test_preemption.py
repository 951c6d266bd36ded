"""Preemption and crashes of the command-line trainer, for pretraining and detection (tiny configs).

Every run is a real `rovit_jax.main` process on 2 host devices. Some go through a small launcher
that only changes timing, never values: it slows the input (so that a SIGTERM reliably lands
mid-run) or pauses the commit of a chosen checkpoint (so that a SIGKILL reliably lands during
that save). The processes share a persistent compilation cache, which saves compile time only.

For each task one interrupted chain is compared with an uninterrupted run:
1. SIGTERM mid-run: exit code 75 and a checkpoint at the step reached (N).
2. Relaunch, resuming from N, and SIGKILL it during its next save (a real kill: the save leaves
   orbax's temporary directory); then plant a simulated half-written step directory (a copy of
   a finished step with its array data truncated, numbered above every other).
3. Relaunch: it warns about both directories by name, resumes from N again and finishes; its
   final parameters equal the uninterrupted run's bit for bit.
"""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import xla_flags

from rovit_jax.config_files import load_config
from rovit_jax.tasks import get_task
from rovit_jax.train import loop, preemption
from rovit_jax.train.checkpoint import load_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(
    os.environ,
    XLA_FLAGS=xla_flags(2),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
)

LAUNCHER = r"""
import os, runpy, sys, time

delay = float(os.environ.get("TEST_BATCH_DELAY", "0"))
pause_step = os.environ.get("TEST_PAUSE_COMMIT_STEP")
if delay:
    from rovit_jax.train import loop

    real_prefetch = loop.prefetch

    def slow_prefetch(make_batch, start, end, **kw):
        def slow(step):
            time.sleep(delay)
            return make_batch(step)

        return real_prefetch(slow, start, end, **kw)

    loop.prefetch = slow_prefetch
if pause_step:
    from orbax.checkpoint._src.path import atomicity

    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if self.get_final().name == pause_step:
            print("COMMIT_PAUSED", self.get(), file=sys.stderr, flush=True)
            time.sleep(3600)
        return await real_finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv[0] = "rovit_jax.main"
runpy.run_module("rovit_jax.main", run_name="__main__", alter_sys=True)
"""

# Per task: config file, extra flags, total steps, checkpoint period, seconds added per batch
# for the SIGTERM run (its log shows every 2nd / every step).
TASKS = {
    "pretrain": ("shapes_pretrain.py", ["--config.checkpoint_every=4"], 12, 4, 0.5),
    "detect": ("shapes_detect.py", [], 4, 2, 1.0),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    launcher = root / "launch.py"
    launcher.write_text(LAUNCHER)
    return {"root": root, "data_dir": str(root / "tfds"), "launcher": str(launcher)}


def _cmd(shared, task, workdir, *, launcher=False):
    config, extra = TASKS[task][:2]
    entry = [shared["launcher"]] if launcher else ["-m", "rovit_jax.main"]
    cmd = [
        sys.executable,
        *entry,
        f"--config={os.path.join(REPO, 'configs', config)}:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={shared['data_dir']}",
        *extra,
    ]
    if task == "detect":
        cmd += [
            "--config.init.run_pretraining=False",
            f"--config.init.pretrain_workdir={shared['pretrain_straight']}",
        ]
    return cmd


def _run(cmd, log_path, env=None):
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env or ENV, timeout=900
        )
    with open(log_path) as f:
        return proc.returncode, f.read()


def _start(cmd, log_path, env):
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log


def _wait_for(proc, log_path, pattern, timeout=600):
    """Polls the process log until `pattern` matches; returns the match."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(log_path) as f:
            m = re.search(pattern, f.read())
        if m:
            return m
        if proc.poll() is not None:
            with open(log_path) as f:
                raise AssertionError(
                    f"exited {proc.returncode} before {pattern!r}:\n{f.read()[-4000:]}"
                )
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"timed out waiting for {pattern!r}")


def sigterm_mid_run(cmd, log_path, env):
    """Starts `cmd` (through LAUNCHER, with env's TEST_BATCH_DELAY) and sends SIGTERM once its
    log shows a step > 0; returns (exit code, log text)."""
    proc, log = _start(cmd, log_path, env)
    try:
        _wait_for(proc, log_path, r"step [1-9]\d*/\d+")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        proc.kill()
        log.close()
    with open(log_path) as f:
        return rc, f.read()


def _steps(workdir):
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit())


def _assert_same_params(workdir, reference, step):
    params, got_step = load_params(workdir)
    ref, ref_step = load_params(reference)
    assert got_step == ref_step == step
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def straight(shared):
    """Uninterrupted runs of both tasks; the pretraining run also initialises detection."""
    out = {}
    for task in ("pretrain", "detect"):
        workdir = str(shared["root"] / f"straight_{task}")
        rc, log = _run(_cmd(shared, task, workdir), str(shared["root"] / f"straight_{task}.log"))
        assert rc == 0, log[-4000:]
        out[task] = workdir
        if task == "pretrain":
            shared["pretrain_straight"] = workdir
    return out


@pytest.mark.parametrize("task", ["pretrain", "detect"])
def test_sigterm_then_kill_during_save_then_resume_equals_straight_run(
    task, shared, straight, tmp_path
):
    total, period, delay = TASKS[task][2:]
    workdir = str(tmp_path / "run")
    root = os.path.join(workdir, "checkpoints")

    # 1. SIGTERM once the log shows a step > 0.
    env = dict(ENV, TEST_BATCH_DELAY=str(delay))
    cmd = _cmd(shared, task, workdir, launcher=True)
    rc, text = sigterm_mid_run(cmd, str(tmp_path / "1_sigterm.log"), env)
    assert rc == preemption.PREEMPTED_EXIT_CODE == 75, text[-4000:]
    stopped = int(re.search(r"stopping on SIGTERM after step (\d+)", text).group(1))
    assert 0 < stopped < total
    assert _steps(workdir)[-1] == stopped  # the checkpoint at the step reached

    # 2. Relaunch; SIGKILL it while the first periodic checkpoint after `stopped` is committing.
    paused = (stopped // period + 1) * period
    log_path = str(tmp_path / "2_sigkill.log")
    env = dict(ENV, TEST_PAUSE_COMMIT_STEP=str(paused))
    proc, log = _start(_cmd(shared, task, workdir, launcher=True), log_path, env)
    try:
        _wait_for(proc, log_path, "COMMIT_PAUSED")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        log.close()
    text = open(log_path).read()
    assert f"resumed from step {stopped}" in text
    assert _steps(workdir)[-1] == stopped
    killed = glob.glob(os.path.join(root, f"{paused}.orbax-checkpoint-tmp*"))
    assert len(killed) == 1, os.listdir(root)
    # Simulated: a step directory with every file present but its array data truncated.
    bad = os.path.join(root, str(paused + 1))
    shutil.copytree(os.path.join(root, str(stopped)), bad)
    for dirpath, _, files in os.walk(os.path.join(bad, "state")):
        for f in files:
            if "ocdbt.process" in dirpath or f.startswith("manifest"):
                open(os.path.join(dirpath, f), "wb").close()

    # 3. Relaunch to the end.
    rc, text = _run(_cmd(shared, task, workdir), str(tmp_path / "3_resume.log"))
    assert rc == 0, text[-4000:]
    warnings = [line for line in text.splitlines() if line.startswith("W")]
    assert any(os.path.basename(killed[0]) in line for line in warnings), warnings
    assert any(bad in line and "cannot be restored" in line for line in warnings), warnings
    assert f"resumed from step {stopped}" in text
    aside = os.path.join(workdir, "unusable_checkpoints", f"{paused + 1}.0")
    assert os.path.isdir(aside) and not os.path.exists(bad) and not os.path.exists(killed[0])
    _assert_same_params(workdir, straight[task], total)


def test_in_process_sigterm_stops_with_checkpoint_and_restores_handlers(shared, tmp_path):
    """The signal path without a subprocess: SIGTERM sent while batch 3 is being made."""
    config = load_config("shapes_pretrain:tiny")
    config.data.data_dir = shared["data_dir"]
    config.async_checkpointing = True
    config.total_steps = 8
    task = get_task(config)
    orig = task.train_batches

    def train_batches(pi, pc):
        batches = orig(pi, pc)
        make = batches.batch

        def batch(step):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return make(step)

        batches.batch = batch
        return batches

    task.train_batches = train_batches
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(preemption.Preempted) as info:
        loop.run(config, str(tmp_path / "run"), task)
    assert signal.getsignal(signal.SIGTERM) == before
    assert preemption.requested() is None
    assert 0 < info.value.step < 8 and info.value.reason == "SIGTERM"
    assert info.value.exit_code == 75
    assert _steps(str(tmp_path / "run"))[-1] == info.value.step
