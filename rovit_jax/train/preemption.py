"""Preemption: stop at a step boundary on SIGTERM/SIGINT, checkpoint, exit with a retry code.

The training loop asks `PreemptionWatcher.should_stop(step)` after every step. Every process must
get the same answer, so that all of them write the same checkpoint and leave together:

- multi-host with JAX's preemption service (after `jax.distributed.initialize`, e.g. on TPU):
  the service catches SIGTERM itself and agrees on a step, read with
  `multihost_utils.reached_preemption_sync_point(step)`. No Python handler is installed there,
  since one would replace the service's SIGTERM handler.
- otherwise: SIGTERM and SIGINT set a per-process flag; with several processes the flags are
  combined by a tiny all-gather at each step (a single process just reads its flag).

The loop then writes a checkpoint, waits for it to be committed and raises `Preempted`, which
`rovit_jax.main` turns into exit code PREEMPTED_EXIT_CODE; rerunning the same command resumes from
that checkpoint. A second SIGINT (Ctrl-C) interrupts at once with KeyboardInterrupt.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

# sysexits.h EX_TEMPFAIL: "temporary failure; the user is invited to retry". Launchers (and
# schedulers' retry policies) can tell a preempted-and-checkpointed run from a crash by it.
PREEMPTED_EXIT_CODE = 75
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped at `step` on a preemption request, after committing a checkpoint there."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, step: int, reason: str):
        super().__init__(
            f"preempted ({reason}) at step {step}; checkpoint written, rerun to resume"
        )
        self.step, self.reason = step, reason


# Signal handling is per process, so the received signals and installed handlers are
# module-level; nested watchers (detection running its pretraining first) share them.
_lock = threading.Lock()
_received: list[str] = []
_previous: dict[int, Any] = {}
_depth = 0


def _handler(signum: int, frame: Any) -> None:
    del frame
    again = bool(_received)
    _received.append(signal.Signals(signum).name)
    if signum == signal.SIGINT and again:
        raise KeyboardInterrupt


def requested() -> str | None:
    """Name of the first stop signal this process received and has not yet acted on, or None."""
    return _received[0] if _received else None


def clear() -> None:
    """Forgets received signals (done once a stop has been acted on)."""
    _received.clear()


def service_available() -> bool:
    """True in a multi-process run whose JAX preemption service is running."""
    if jax.process_count() == 1:
        return False
    try:  # JAX exposes no public accessor; this is what reached_preemption_sync_point reads.
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


class PreemptionWatcher:
    """Context manager: installs the stop-signal handlers; `should_stop(step)` is collective.

    Handlers are restored when the outermost watcher exits. Outside the main thread signals
    cannot be caught; the watcher then only follows the preemption service, if any.
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.use_service = service_available()
        self._installed = False

    def __enter__(self) -> PreemptionWatcher:
        global _depth
        if self.use_service:
            return self
        with _lock:
            if _depth == 0:
                try:
                    for s in self.signals:
                        _previous[s] = signal.signal(s, _handler)
                except ValueError:  # Not the main thread: the first call already failed.
                    _previous.clear()
                    logging.warning(
                        "not in the main thread: %s will not checkpoint before exiting",
                        "/".join(signal.Signals(s).name for s in self.signals),
                    )
                    return self
            _depth += 1
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        global _depth
        if not self._installed:
            return
        with _lock:
            _depth -= 1
            self._installed = False
            if _depth == 0:
                for s, h in _previous.items():
                    signal.signal(s, h)
                _previous.clear()

    def should_stop(self, step: int) -> bool:
        """Whether every process is to stop after `step`; all processes must call it each step."""
        if self.use_service:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        local = requested() is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([local], np.int32))
        return bool(np.any(flags))

    def reason(self) -> str:
        """What caused the stop, for messages ("SIGTERM", "preemption notice", ...)."""
        if self.use_service:
            return "preemption notice"
        return requested() or "a stop request on another process"
