"""Multi-host runtime: argument checks, and a dead process stops its peers within a minute."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from rovit_jax.train import distributed

WORKER = textwrap.dedent(
    """
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from rovit_jax.train import distributed

    distributed.initialize(
        coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
        heartbeat_timeout_seconds=10,
    )
    mesh = Mesh(np.array(jax.devices()), ("data",))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
    step = 0
    while True:  # a collective every step, as in training
        local = np.full((2,), step + jax.process_index(), np.float32)
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, (4,))
        print(f"step {step} total {float(total(x))}", flush=True)
        step += 1
        time.sleep(0.2)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(proc, text: str, timeout: float) -> list[str]:
    lines, end = [], time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.strip())
        if text in line:
            return lines
    raise AssertionError(f"{text!r} not seen within {timeout} s; output: {lines[-20:]}")


def test_killing_one_process_stops_the_other_within_a_minute(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    address = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), address, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        seen = [_wait_for(p, "step 3 ", 180) for p in procs]
        # The collective really spans both processes: 2 * (3 + 0) + 2 * (3 + 1) = 14.
        assert any("step 3 total 14.0" in line for line in seen[0]), seen[0]
        procs[1].kill()
        start = time.time()
        try:
            code = procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving process still runs 60 s after its peer was killed")
        elapsed = time.time() - start
        assert code != 0, f"survivor exited with code 0 after {elapsed:.1f} s"
        print(f"survivor stopped with exit code {code} after {elapsed:.1f} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coordinator_address="127.0.0.1:1234"), "needs num_processes and process_id"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "must be in"),
        (dict(num_processes=4, process_id=1), "without a coordinator address"),
        (dict(heartbeat_timeout_seconds=0), "heartbeat_timeout_seconds"),
    ],
)
def test_incomplete_descriptions_are_named(kwargs, message, monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(distributed.ENV_PROCESS_ID, raising=False)
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)


def test_single_process_runs_do_not_initialise(monkeypatch):
    for name in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", distributed.ENV_COORDINATOR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "0")
    assert distributed.initialize() is False
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="ROVIT_NUM_PROCESSES"):
        distributed.initialize()
