"""Two processes on 127.0.0.1 (2 CPU devices each) train on one global 4-device mesh through JAX's
multi-host runtime, checkpoint collectively, and end with the parameters of one process owning 4
devices. Both tasks: pretraining, then detection on that backbone, which is also stopped,
restarted and resumed.

Tolerance: the two-host run's all-reduces go over gloo, the one-process run's stay in XLA, so sums
may be ordered differently: parameters must agree to rtol 1e-4 / atol 1e-6 (float32) after the
run, except attention key biases (exact gradient zero; see tests/test_layouts.py).
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import xla_flags

from rovit_jax.config_files import load_config
from rovit_jax.data import sources
from rovit_jax.train.checkpoint import load_params
from rovit_jax.train.mesh import tree_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# data x fsdp = 2 x 2: the batch AND the parameters are split across the two hosts.
MESH = "(('data', 2), ('fsdp', 2))"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def _main_args(config: str, workdir: str, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rovit_jax.main",
        f"--config={os.path.join(REPO, 'configs', config)}",
        f"--workdir={workdir}",
        f"--config.mesh={MESH}",
        "--config.fsdp_min_size=0",
        "--config.async_checkpointing=False",
        *overrides,
    ]


def _check(proc_outputs, what):
    for rc, out in proc_outputs:
        assert rc == 0, f"{what} failed (exit {rc}):\n{out[-4000:]}"


def _run_two_hosts(config, workdir, overrides, extra=()):
    """Starts processes 0 and 1 of one job; returns [(exit code, output)] of both."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            _main_args(config, workdir, overrides)
            + [
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
                *extra,
            ],
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    return [_finish(p) for p in procs]


def _start_one_host(config, workdir, overrides):
    return subprocess.Popen(
        _main_args(config, workdir, overrides),
        env=_env(4),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=600):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def _assert_same_params(got, want):
    for path, a, b in zip(tree_paths(want), jax.tree.leaves(got), jax.tree.leaves(want)):
        if path.endswith("key/bias"):
            continue
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=path)


def _run_and_compare(config, root, overrides, total, stop=None):
    """One-host reference (in parallel) vs two hosts, stopped at `stop`, restarted and resumed
    (straight through when `stop` is None)."""
    ref_dir, multi_dir = str(root / "one_host"), str(root / "two_hosts")
    reference = _start_one_host(config, ref_dir, overrides)
    if stop is None:
        second = _run_two_hosts(config, multi_dir, overrides)
        _check(second, "two hosts")
    else:
        first = _run_two_hosts(config, multi_dir, overrides, [f"--stop_after_step={stop}"])
        _check(first, "two hosts, first launch")
        assert sorted(os.listdir(os.path.join(multi_dir, "checkpoints"))) == [str(stop)]
        second = _run_two_hosts(config, multi_dir, overrides)
        _check(second, "two hosts, relaunch")
        for _, out in second:
            assert f"resumed from step {stop}" in out, out[-3000:]
    _check([_finish(reference)], "one host")
    # Only the chief prints the final evaluation.
    assert "final evaluation" in second[0][1] and "final evaluation" not in second[1][1]
    ref_params, ref_step = load_params(ref_dir)
    params, step = load_params(multi_dir)
    assert step == ref_step == total
    _assert_same_params(params, ref_params)
    return ref_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny shapes world and its tokenizer, built once so the runs only read them."""
    config = load_config("shapes_pretrain:tiny")
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    sources.tokenizer_for(config)
    return config.data.data_dir


def test_two_hosts_pretrain_then_detect_resume_equals_one_host(data_dir, tmp_path):
    pretrain = [f"--config.data.data_dir={data_dir}", "--config.checkpoint_every=4"]
    # Pretraining runs straight through; the restart is exercised on detection, whose state
    # (frozen text classifier, the backbone loaded from this run) is the larger one.
    pretrain_dir = _run_and_compare(
        "shapes_pretrain.py:tiny", tmp_path / "pretrain", pretrain, total=12
    )
    detect = [
        # Detection reads the world from data.data_dir: left unset, the reference and the two
        # hosts would build it concurrently in the default folder.
        f"--config.data.data_dir={data_dir}",
        f"--config.pretrain.data.data_dir={data_dir}",
        f"--config.init.pretrain_workdir={pretrain_dir}",
        "--config.init.run_pretraining=False",
        "--config.total_steps=4",
        "--config.batch_size=4",
        "--config.eval.batch_size=4",
        "--config.checkpoint_every=2",
    ]
    _run_and_compare("shapes_detect.py:tiny", tmp_path / "detect", detect, total=4, stop=2)
