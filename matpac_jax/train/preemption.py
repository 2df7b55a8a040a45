"""Preemption: a SIGTERM (what schedulers and spot / preemptible VMs send before killing a job) asks the trainer to
finish the current step, save a checkpoint, wait for it and exit 0.

Single process: the signal handler only sets a flag, read after each step. Several processes: every process must
save at the same step, so the decision goes through JAX's preemption sync point
(``multihost_utils.reached_preemption_sync_point``: the coordination service agrees on a step once any process has
been notified; ``jax.distributed.initialize`` registers SIGTERM for it). A local flag alone would make one process
save while the others step on, so with several processes only the sync point counts.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import jax


class PreemptionWatch:
    """Installs a SIGTERM handler for its lifetime (``with PreemptionWatch() as watch``); ``requested(step)``."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}  # what signal.signal returned: the handler to put back

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received = signum

    def __enter__(self) -> PreemptionWatch:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    def requested(self, step: int) -> bool:
        """True once a preemption was signalled: here (one process), or at the step all processes agreed on."""
        if jax.process_count() == 1:
            return self.received is not None
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # no preemption sync manager on this distributed client
            return False
