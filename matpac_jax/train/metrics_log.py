"""Per-step metrics of a run: ``WORKDIR/metrics.jsonl``, TensorBoard events in ``WORKDIR/tb``, a console line.

A step's device metrics are fetched when the *next* step has been dispatched (``push``), so the host never waits for
the device it just fed. Host timings are added per step:

- ``step_time_s``: wall time from this step's loop iteration to the next (the step's share of the run);
- ``data_wait_s``: of that, the time spent getting the batch from the input pipeline onto the devices;
- ``samples_per_s``, ``tokens_per_s`` (encoder tokens), and ``mfu`` when the device peak and step FLOPs are known.

A non-finite step (``metrics['nonfinite']``: a NaN/Inf loss, gradient norm or updated state, see train/program.py; the
state then keeps its previous values, so checkpoints only ever hold finite states) either stops the run
(``config.nonfinite='stop'``: ``nonfinite_report.json``, strict JSON, names the step and the quantities,
``NonFiniteError`` is raised) or is logged and skipped; ``config.nonfinite_max_skips`` consecutive skips stop the run
the same way (a run whose every update is non-finite does not end as if it had trained).
On resume from step ``s``, lines after ``s`` (written after the checkpoint, before a crash) are dropped first, so the
file reads as one uninterrupted run. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, TextIO

import jax
from ml_collections import ConfigDict

from matpac_jax import fileio

TIMING_KEYS = ("step_time_s", "data_wait_s", "samples_per_s", "tokens_per_s", "mfu")


class NonFiniteError(FloatingPointError):
    """A non-finite update with ``config.nonfinite='stop'``, or ``config.nonfinite_max_skips`` consecutive ones with
    'skip'; ``report`` is what was written to disk."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def truncate_after(path: str, step: int) -> None:
    """Drop the lines of ``path`` whose step is after ``step`` (and any torn last line)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
    fileio.atomic_write_text(path, "".join(kept))


class MetricsLog:
    def __init__(
        self,
        workdir: str,
        config: ConfigDict,
        first_step: int,
        tokens_per_sample: int,
        flops_per_step: float | None = None,
        peak_flops: float | None = None,
        console: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """``console``: the task's (metric, short name) pairs shown on the console line after the loss; with the loss
        and the gradient norm, the metrics a non-finite report checks and names."""
        self.config, self.first_step = config, first_step
        self.batch = config.data.batch_size
        self.tokens_per_sample = tokens_per_sample
        self.flops, self.peak = flops_per_step, peak_flops
        self.console = tuple(console)
        self.guarded = ("loss", *(k for k, _ in self.console), "grad_norm")
        self.workdir = workdir
        self.writer = jax.process_index() == 0
        self.pending: tuple[int, dict, float, float] | None = None
        self.last: dict = {}
        self.emitted = 0
        self.steps = 0  # steps after the first (compilation) of this process, with summed step and data-wait times
        self.elapsed = self.waited = 0.0
        self.skipped = 0
        self.consecutive = 0  # non-finite steps in a row (config.nonfinite='skip')
        self.max_skips = int(config.nonfinite_max_skips)
        self.file: TextIO | None = None
        self.tb: Any = None  # a tensorboardX SummaryWriter on the writing process
        if self.writer:
            path = os.path.join(workdir, "metrics.jsonl")
            truncate_after(path, first_step)
            self.file = open(path, "a")
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=first_step + 1)

    def push(self, step: int, metrics: dict, t_start: float, data_wait_s: float) -> None:
        """Record the just-dispatched step ``step`` (its state's step after the update); emit the previous one."""
        if self.pending is not None:
            self._emit(*self.pending, step_time_s=t_start - self.pending[2])
        self.pending = (step, metrics, t_start, data_wait_s)

    def flush(self) -> None:
        """Emit the pending step now (waits for the device): before a checkpoint and at the end."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._emit(*pending, step_time_s=time.perf_counter() - pending[2])

    def _emit(self, step: int, metrics: dict, t_start: float, data_wait_s: float, step_time_s: float) -> None:
        del t_start
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        m["step"] = step
        m["step_time_s"], m["data_wait_s"] = step_time_s, data_wait_s
        m["samples_per_s"] = self.batch / max(step_time_s, 1e-9)
        m["tokens_per_s"] = m["samples_per_s"] * self.tokens_per_sample
        if self.flops and self.peak:
            m["mfu"] = self.flops / max(step_time_s, 1e-9) / self.peak
        self.last = m
        if self.emitted:  # the first step of a process includes compilation: not in the averages
            self.steps += 1
            self.elapsed += step_time_s
            self.waited += data_wait_s
        self.emitted += 1
        if self.writer:
            assert self.file is not None
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()
            for k, v in m.items():
                if k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if m.get("nonfinite", 0.0) > 0:
            self._nonfinite(step, m)
            return
        self.consecutive = 0
        first_or_last = step in (self.first_step + 1, self.config.total_steps)
        if self.writer and (step % self.config.log_every == 0 or first_or_last):
            print(self.line(step, m), flush=True)

    def _nonfinite(self, step: int, m: dict) -> None:
        bad = {k: m[k] for k in self.guarded if k in m and not math.isfinite(m[k])}
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        if m.get("nonfinite_state", 0.0) > 0:
            bad["state"] = "the updated state (parameters, optimizer moments or the method's own values) held NaN/Inf"
            what = ", ".join(filter(None, (what, "updated state (parameters / optimizer / the method's values)")))
        inputs = int(m.get("nonfinite_inputs", 0))
        if inputs:
            what += f"; the batch held {inputs} non-finite audio samples"
        self.consecutive += 1
        if self.config.nonfinite == "skip" and self.consecutive < self.max_skips:
            self.skipped += 1
            if self.writer:
                print(f"step {step}: non-finite {what}: update skipped ({self.skipped} so far)", flush=True)
            return
        report = {"step": step, "nonfinite": bad, "nonfinite_inputs": inputs, "metrics": m}
        path = os.path.join(self.workdir, "nonfinite_report.json")
        if self.config.nonfinite == "skip":
            first = step - self.consecutive + 1
            report |= {"consecutive_nonfinite_steps": self.consecutive, "first_nonfinite_step": first}
            message = (
                f"steps {first}..{step}: {self.consecutive} non-finite updates in a row (last: {what}), "
                f"config.nonfinite_max_skips={self.max_skips}: stopped (report: {path}). Every update was skipped, so "
                "the checkpoints hold only finite states: check the input, lower config.optim.lr (resuming with "
                "--config.checkpoint.allow_changes=optim.lr) or raise config.nonfinite_max_skips, then rerun"
            )
        else:
            message = (
                f"step {step}: non-finite {what}; stopped without saving it (report: {path}). The checkpoints hold "
                "only finite states: rerun to resume from the last one, or set --config.nonfinite=skip to skip such "
                "updates"
            )
        if self.writer:
            fileio.atomic_write_json(path, report)
        raise NonFiniteError(message, report)

    def line(self, step: int, m: dict) -> str:
        if not self.steps:  # only the compilation step so far
            return f"step {step:>7d}/{self.config.total_steps}  loss {m['loss']:.4f}  (first step, incl. compilation)"
        rate = self.steps * self.batch / self.elapsed
        wait = self.waited / self.elapsed
        eta = (self.config.total_steps - step) * self.elapsed / self.steps
        mfu = f"  mfu {m['mfu']:.1%}" if "mfu" in m else ""
        detail = " ".join(f"{short} {m[k]:.4f}" for k, short in self.console if k in m)
        detail = f" ({detail})" if detail else ""
        return (
            f"step {step:>7d}/{self.config.total_steps}  loss {m['loss']:.4f}{detail}  lr {m['lr']:.2e}  "
            f"{rate:,.1f} samples/s{mfu}  data wait {wait:.0%}  eta {_duration(eta)}"
        )

    def close(self) -> None:
        if self.writer:
            assert self.file is not None
            self.file.close()
            self.tb.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def without_timings(metrics: dict) -> dict:
    """Metrics without host timings: what two runs of the same config must agree on."""
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
