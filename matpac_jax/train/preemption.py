"""Preemption: a SIGTERM (what schedulers and spot / preemptible VMs send before killing a job) asks the trainer to
finish the current step, save a checkpoint, wait for it and exit 0.

Single process: the signal handler only sets a flag, read after each step. Several processes: every process must
save at the same step, so the decision goes through JAX's preemption sync point
(``multihost_utils.reached_preemption_sync_point``: once any process has been notified, the coordination service
agrees on a step, one past the furthest step any process has reached, and every process stops there). The notice
comes from the SIGTERM handler that ``jax.distributed.initialize`` installs (XLA's preemption notifier), so with
several processes no Python handler is installed: Python's ``signal.signal`` would replace JAX's handler, and a
SIGTERM reaching only some hosts would then be noted nowhere (they would train on and be killed at the scheduler's
deadline). A SIGTERM to one process stops the whole job at one step: tests/test_multihost_failures.py.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import jax


class PreemptionWatch:
    """Installs a SIGTERM handler for its lifetime (``with PreemptionWatch() as watch``), in a single-process job;
    ``requested(step)``."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}  # what signal.signal returned: the handler to put back

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received = signum

    def __enter__(self) -> PreemptionWatch:
        if jax.process_count() == 1:  # several processes: JAX's own handler notes the signal (module docstring)
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def requested(self, step: int) -> bool:
        """True once a preemption was signalled: here (one process), or at the step all processes agreed on."""
        if jax.process_count() == 1:
            return self.received is not None
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # no preemption sync manager on this distributed client
            return False
