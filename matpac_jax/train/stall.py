"""A stalled run stops: a process whose training makes no progress for ``config.stall_timeout_s`` seconds prints where
each of its threads is, says why it stops and what to do, and exits with status 5.

JAX's coordination service declares a process lost only when its heartbeats stop (``--heartbeat_timeout``: killed,
SIGSTOPped, its host gone). A process that is alive but stuck (blocked on a dead filesystem, a wedged accelerator, a
step whose input never comes) keeps heartbeating, and every other process waits for it in the step's collective
without a time limit of its own (NCCL and gloo wait as long as the job runs). Each process watches its own loop: with
no step finished for the timeout, the stuck process and those waiting for it all stop, and once one exits JAX stops the
rest (at the latest after the heartbeat timeout).

The watch is armed once the first step has ended on every process: the loop beats when it has fetched a step's
metrics, which a multi-process step has only once every process compiled and ran it (compilation takes minutes on
some models, and longer on some hosts than on others). The timeout also covers the checkpoint saves and evaluations
between two steps, so it must exceed the longest of them; 0 turns the watch off. tests/test_multihost_failures.py
stalls one of 2 processes with its heartbeat running.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

STATUS = 5  # the exit status of a stalled process (matpac_jax/main.py lists them all)


class StallWatch:
    """``with StallWatch(timeout_s, where) as watch``: ``watch.beat(step)`` once step ``step`` ended. Armed by the first
    beat; a watcher thread ends the process when the last beat is ``timeout_s`` old. ``where``: the checkpoint
    directory a rerun resumes from, named in the message (nothing is read from it: the filesystem may be what is
    stuck)."""

    def __init__(self, timeout_s: float, where: str, process: tuple[int, int] = (0, 1)):
        self.timeout_s, self.where, self.process = float(timeout_s), where, process
        self._last: tuple[float, int] | None = None  # (time of the last beat, its step)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, step: int) -> None:
        self._last = (time.monotonic(), step)

    def __enter__(self) -> StallWatch:
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, self.timeout_s / 4)):
            if self._last is not None and time.monotonic() - self._last[0] > self.timeout_s:
                self._stop(*self._last)

    def _stop(self, since: float, step: int) -> None:
        index, count = self.process
        print(f"process {index} of {count}: no progress for {self.timeout_s:g} s; its threads:", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        quiet = time.monotonic() - since
        print(
            f"error: process {index} of {count} stopped: no training step finished in the {quiet:.0f} s since step"
            f" {step} (config.stall_timeout_s={self.timeout_s:g}). This process, or one it waits for in a"
            " collective, is stuck while alive: blocked on a filesystem, a wedged accelerator, an input that never"
            " comes (the threads above show where this one is). Its other processes stop once JAX notices this one"
            " gone (--heartbeat_timeout). Find the stuck process (its log stops first), fix it, then rerun the same"
            f" command on every host: it resumes from the last checkpoint committed in {self.where}; raise"
            " config.stall_timeout_s if a save or an evaluation legitimately takes longer",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(STATUS)
