"""Joining JAX's multi-host runtime (jax.distributed) for pods and clusters.

Which processes form the job, in order of precedence:
  1. explicit arguments (`python -m rovit_jax.main --coordinator_address=... --num_processes=...
     --process_id=...`);
  2. the environment variables ROVIT_COORDINATOR_ADDRESS, ROVIT_NUM_PROCESSES, ROVIT_PROCESS_ID
     (what launch scripts export);
  3. JAX's own cluster detection on a Cloud TPU pod slice or under SLURM with several tasks.
Anything else is a single-process run and nothing is initialised.

Failure of one process: every process sends heartbeats to the coordination service; when one
dies, the others are told within `heartbeat_timeout_seconds` and stop with an error instead of
hanging in a collective (JAX's runtime terminates them). The default here (30 s) is shorter than
JAX's (100 s) so a dead host is noticed within a minute.
"""

from __future__ import annotations

import json
import logging
import os

import jax

ENV_COORDINATOR = "ROVIT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "ROVIT_NUM_PROCESSES"
ENV_PROCESS_ID = "ROVIT_PROCESS_ID"
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 30


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _cluster_detected() -> bool:
    """A TPU pod slice or a multi-task SLURM job, which jax.distributed detects by itself."""
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return True
    ntasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_STEP_NUM_TASKS")
    return bool(os.environ.get("SLURM_JOB_ID")) and ntasks not in (None, "", "1")


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
    initialization_timeout: int = 300,
) -> bool:
    """Joins the multi-host runtime when this process is one of several; returns whether it did.

    Raises ValueError naming the argument or variable when the description is incomplete
    (an address without a process count or id, ids out of range).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    if heartbeat_timeout_seconds < 1:
        raise ValueError(f"heartbeat_timeout_seconds must be >= 1, got {heartbeat_timeout_seconds}")
    timeouts = dict(
        heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
        initialization_timeout=int(initialization_timeout),
    )
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                f"coordinator_address={coordinator_address!r} needs num_processes and process_id "
                f"(flags or {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id={process_id} must be in [0, num_processes={num_processes})"
            )
        if num_processes == 1:
            return False
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            **timeouts,
        )
    elif num_processes not in (None, 1) or process_id not in (None, 0):
        raise ValueError(
            f"num_processes={num_processes} / process_id={process_id} given without a "
            f"coordinator address (flag --coordinator_address or {ENV_COORDINATOR})"
        )
    elif _cluster_detected():
        jax.distributed.initialize(**timeouts)
    else:
        return False
    logging.info(
        "joined the multi-host runtime: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _json_default(value):
    if isinstance(value, bytes):
        return value.decode("ascii")  # RLE counts
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"cannot send a {type(value).__name__} between processes: {value!r}")


def all_gather_json(value) -> list:
    """Every process's `value` (JSON-serialisable: dicts, lists, numbers, strings), in process order.

    For results of variable size (e.g. each host's detections), which array collectives cannot
    carry: each process encodes its value as UTF-8 JSON, the lengths are gathered first, then the
    bytes padded to the longest. A single-process run returns `[value]` without any collective.
    """
    if jax.process_count() == 1:
        return [value]
    import numpy as np
    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(value, default=_json_default).encode("utf-8"), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([payload.size], np.int64))
    longest = int(np.max(lengths))
    padded = np.zeros((max(longest, 1),), np.uint8)
    padded[: payload.size] = payload
    gathered = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(gathered[i][: int(n)]).decode("utf-8"))
        for i, n in enumerate(np.asarray(lengths).reshape(-1))
    ]
