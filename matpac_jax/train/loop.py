"""The trainer: one loop for every task, read top to bottom.

early config checks -> workdir lock -> mesh -> input -> resume point (latest verified checkpoint, its config compared)
-> model & optimizer -> sharded state (fresh or restored) -> jitted step -> loop
(metrics fetched one step late so the host never stalls the device; the periodic probe, then checkpoints every N
steps, after an evaluation that changed the task's evaluation state, on SIGTERM and at the end) -> closing probe

A task supplies what differs between methods (train.task.Task, handed down by the caller: ``matpac_jax.tasks`` picks
one by ``config.task``; this module imports no method): its checks, its input, its pure init and step functions, its
probes. The loop makes the step of them with the optimizer, gradient accumulation, the mesh's shardings, donation and
the non-finite guard (train.program); the batch's shapes, for the memory report and the FLOP count, are those of the
first batch the input gives.
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
from ml_collections import ConfigDict

from matpac_jax import config_lib, distributed, parallel
from matpac_jax.checkpoint import Checkpointer
from matpac_jax.config_lib import ConfigError, resume_differences
from matpac_jax.flops import count_matmul_flops, peak_flops
from matpac_jax.train.metrics_log import MetricsLog, without_timings
from matpac_jax.train.optim import make_optimizer
from matpac_jax.train.preemption import PreemptionWatch
from matpac_jax.train.prefetch import DevicePrefetch
from matpac_jax.train.program import NONFINITE_ACTIONS, compile_program
from matpac_jax.train.stall import StallWatch
from matpac_jax.train.task import CheckpointedEvaluation, State, Task
from matpac_jax.workdir_lock import WorkdirLock


def batch_iterator(source: Any, first_step: int) -> Iterator[Any]:
    """Host batches from `first_step` on.

    The demo batcher is indexed by step, so a resumed run sees exactly the batches of an uninterrupted one; a grain
    iterator is moved to its saved position when the checkpoint is restored.
    """
    if callable(source):
        return (source(step) for step in itertools.count(first_step))
    return iter(source)


def close_after_error(*resources: Any) -> None:
    """Close ``resources`` while an error stops the run: a failure to close (a full disk fails the metrics file's
    last flush as well, and a writer whose file is gone says "handle is closed") is noted on stderr and never
    replaces the error that stopped the run (a run on a full disk ended with that misleading line)."""
    for r in resources:
        try:
            r.close()
        except Exception as e:  # noqa: BLE001 -- any failure here is secondary to the one being raised
            print(f"while stopping, closing {type(r).__name__} failed too: {type(e).__name__}: {e}", file=sys.stderr)


def parse_profile_steps(value: Any) -> tuple[int, int] | None:
    """``config.profile_steps``: () (off) or (a, b) with 0 <= a < b: trace steps a .. b-1."""
    if not value:
        return None
    ok = isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(x, int) for x in value)
    if not ok or not 0 <= value[0] < value[1]:
        raise ConfigError(f"config.profile_steps={value!r}: expected (a, b) with 0 <= a < b (traces steps a .. b-1)")
    return int(value[0]), int(value[1])


def check_config(config: ConfigDict) -> None:
    """The config errors every method shares (``config_lib.check_config``: sizes, mesh, optimizer settings,
    front-end; the checkpoint and logging cadence; the schedule), before any data is read or anything is compiled."""
    if config.nonfinite not in NONFINITE_ACTIONS:
        raise ConfigError(f"config.nonfinite={config.nonfinite!r}: expected one of {', '.join(NONFINITE_ACTIONS)}")
    config_lib.check_config(config)
    c = config.checkpoint
    if c.every < 1 or c.keep < 1 or c.keep_period < 0:
        raise ConfigError(
            f"config.checkpoint: every={c.every} and keep={c.keep} must be >= 1, keep_period={c.keep_period} >= 0"
        )
    if config.log_every < 1 or config.total_steps < 1:
        raise ConfigError(f"config.log_every={config.log_every}, config.total_steps={config.total_steps}: must be >= 1")
    if not 0 <= config.optim.warmup_steps < config.total_steps:
        raise ConfigError(
            f"config.optim.warmup_steps={config.optim.warmup_steps} must be in [0, config.total_steps="
            f"{config.total_steps}): lower it or train longer"
        )
    parse_profile_steps(config.profile_steps)
    try:
        make_optimizer(config.optim, config.total_steps, {}, config.data.batch_size)
    except (ValueError, AttributeError, KeyError) as e:
        raise ConfigError(f"config.optim: {e}") from None


def check_run(config: ConfigDict, workdir: str, task: Task) -> None:
    """Config and environment errors that must surface before any data is read or anything is compiled: the
    workdir, the shared config, the method's own (``task.check``)."""
    if "://" in workdir:
        raise ConfigError(
            f"--workdir={workdir} is a URL: the workdir must be a filesystem path (mount buckets, e.g. with gcsfuse)"
        )
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror}): give a writable directory") from e
    check_config(config)
    task.check()


def compiled_memory(train_step: Any, abstract: Any, batch_spec: Any) -> dict | None:
    """Per-device bytes of the compiled step (XLA's ``memory_analysis`` of an ahead-of-time compilation):
    {'arguments', 'outputs', 'temporaries', 'donated', 'total'}; None where the backend has no analysis."""
    try:
        return memory_of(train_step.lower(abstract, batch_spec, jax.random.key(0)).compile())
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None


def memory_of(compiled: Any) -> dict | None:
    """``compiled_memory``'s figures of an already compiled program."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if m is None:
        return None
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "temporaries": m.temp_size_in_bytes, "donated": getattr(m, "alias_size_in_bytes", 0)}  # fmt: skip
    out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["donated"]
    return out


def memory_report(train_step: Any, abstract: Any, batch_spec: Any) -> str | None:
    """The compiled step's device memory, printed before the first step: an out-of-memory configuration shows here,
    before any data is read. The jitted step compiles again at its first call (a hit in the persistent compilation
    cache)."""
    m = compiled_memory(train_step, abstract, batch_spec)
    if m is None:
        return None
    g = {k: v / (1 << 30) for k, v in m.items()}
    return (f"step memory per device (compiled): {g['total']:.3f} GiB = arguments {g['arguments']:.3f} + outputs "
            f"{g['outputs']:.3f} + temporaries {g['temporaries']:.3f} - donated {g['donated']:.3f}")  # fmt: skip


class Profiler:
    """A jax.profiler trace of steps [a, b) into WORKDIR/profile (``config.profile_steps=(a, b)``)."""

    def __init__(self, value: str, workdir: str):
        self.window = parse_profile_steps(value)
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before_step(self, step: int, state: State) -> None:
        if self.window is None:
            return
        if step == self.window[0] and not self.active:
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.directory)
            self.active = True
        elif step == self.window[1] and self.active:
            self.stop(state)

    def stop(self, state: State) -> None:
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            if jax.process_index() == 0:
                assert self.window is not None  # active only inside the window
                a, b = self.window
                print(f"profile of steps {a}..{b - 1} written to {self.directory}", flush=True)


def resume_point(ckpt: Checkpointer, config: ConfigDict, may_change: tuple[str, ...] = ()) -> int:
    """The step to resume from (0: a fresh run), checked before anything is built: ``total_steps`` must reach the
    latest checkpoint, the checkpoint must verify (``Checkpointer.resume_step`` falls back to the previous verified
    one), and the config that saved it may differ only in keys that may change on resume
    (``config_lib.resume_differences``; ``may_change``: the task's own). ``ConfigError`` names the numbers or the
    keys."""
    latest = ckpt.latest_step()
    if latest is not None and latest > config.total_steps:
        raise ConfigError(
            f"config.total_steps={config.total_steps} is below the step of the latest checkpoint, {latest}, in "
            f"{ckpt.directory}: set --config.total_steps={latest} or more to resume it, or give a new --workdir"
        )
    first = ckpt.resume_step() or 0
    saved = ckpt.saved_config(first) if first else None
    diffs = resume_differences(saved, config, may_change) if saved else []
    if diffs:
        listed = "; ".join(f"config.{k}: saved {old!r}, now {new!r}" for k, old, new in diffs)
        raise ConfigError(
            f"checkpoint {first} in {ckpt.directory} was saved with another config ({listed}): resume with the saved "
            f"values ({ckpt.step_dir(first)}/config/metadata) or give a new --workdir; to accept a change that leaves "
            "the state's layout alone, add --config.checkpoint.allow_changes=KEY[,KEY...]"
        )
    return first


class EvaluationState:
    """The loop's side of train.task.CheckpointedEvaluation (a no-op for a task without it): the task's evaluation
    state handed back at the start, saved with the checkpoint of every step whose probe changed it, and the task told
    once that checkpoint is committed."""

    def __init__(self, task: Task):
        self.task = task if isinstance(task, CheckpointedEvaluation) else None
        self.saved: dict | None = None  # the state as the latest checkpoint holds it

    def restore(self, ckpt: Checkpointer, step: int, state: State) -> None:
        if self.task is not None:
            self.saved = ckpt.saved_task_state(step) if step else None
            self.task.restore_evaluation(self.saved, step, state)
            self.saved = copy.deepcopy(self.task.evaluation_state())

    def changed(self) -> bool:
        return self.task is not None and self.task.evaluation_state() != self.saved

    def to_save(self) -> dict | None:
        if self.task is None:
            return None
        self.saved = copy.deepcopy(self.task.evaluation_state())  # a copy: the task goes on changing its own
        return self.saved

    def committed(self, ckpt: Checkpointer, step: int, state: State) -> None:
        if self.task is not None:
            ckpt.wait()  # the save's commit: what the task writes now is never ahead of the checkpoints
            self.task.evaluation_committed(step, state)


def train_and_evaluate(config: ConfigDict, workdir: str, task: Task) -> dict:
    """Train ``task``'s method (or resume it) to ``config.total_steps``; returns {'final_metrics', 'preempted'[,
    'probe']}.

    The workdir is locked for the whole run (workdir_lock.WorkdirLock: a second run on it fails at once, naming this
    one). Raises ``NonFiniteError`` (config.nonfinite='stop', or more than ``config.nonfinite_max_skips`` consecutive
    skipped updates) after writing WORKDIR/nonfinite_report.json.
    """
    check_run(config, workdir, task)
    with WorkdirLock(workdir):
        return _train_locked(config, workdir, task)


def _train_locked(config: ConfigDict, workdir: str, task: Task) -> dict:
    # --- Mesh.
    try:
        mesh = parallel.make_mesh(config.mesh.to_dict())
    except ValueError as e:
        raise ConfigError(f"{e}: set config.mesh to fit {jax.device_count()} devices (-1 = all remaining)") from None
    dp = parallel.data_parallel_size(mesh)
    accum = config.optim.accum_steps
    if accum < 1 or config.data.batch_size % (dp * accum):
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} is not divisible by the data-parallel size {dp} of mesh "
            f"{dict(mesh.shape)} times config.optim.accum_steps={accum}: choose a multiple of {dp * max(accum, 1)}, "
            "or change config.mesh or the accumulation"
        )

    # --- Input (first: a data error should surface before any compilation and before the workdir is written).
    try:
        data = task.make_input()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    periodic_probe = task.periodic_probe()
    evaluation = EvaluationState(task)

    # --- Checkpoints: where to resume (a corrupt or mismatching checkpoint is reported before anything is built).
    ckpt = Checkpointer.from_config(workdir, config)
    try:
        first = resume_point(ckpt, config, tuple(task.resume_may_change))
        batches = batch_iterator(data.source, first)

        # --- Model, optimizer, state.
        init_fn, train_step, abstract = compile_program(task.build(data), mesh, config)
        if first:
            data_iter = None if config.checkpoint.reset_data else batches
            state = ckpt.restore(abstract, step=first, data_iter=data_iter)
            if jax.process_index() == 0:
                print(f"resumed from {ckpt.directory} at step {int(state.step)}", flush=True)
        else:
            state = init_fn(jax.random.key(config.seed))
        evaluation.restore(ckpt, first, state)
    except BaseException:
        close_after_error(ckpt)
        raise
    inputs = DevicePrefetch(batches, mesh, config.data.device_prefetch)
    data_iter = inputs if inputs.stateful else None
    try:
        # --- The first batches, read now: their shapes are the compiled step's.
        inputs.fill()
        batch_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs.peek())
        peak = peak_flops()
        flops = None
        if peak:  # counting traces the step once more: only where an MFU can be reported
            flops = count_matmul_flops(train_step, abstract, batch_spec, jax.random.key(0))
        report = memory_report(train_step, abstract, batch_spec)
        if report and jax.process_index() == 0:
            print(report, flush=True)
        log = MetricsLog(workdir, config, first, task.tokens_per_sample, flops, peak, task.console_metrics)
    except BaseException:
        close_after_error(ckpt, inputs)
        raise
    profiler = Profiler(config.profile_steps, workdir)
    distributed.barrier("train_and_evaluate: first step")
    base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    every, preempted, step = config.checkpoint.every, False, first
    try:
        process = (jax.process_index(), jax.process_count())
        with PreemptionWatch() as watch, StallWatch(config.get("stall_timeout_s", 0), ckpt.directory, process) as stall:
            for step in range(first, config.total_steps):
                if watch.requested(step):  # before taking a batch: the input workers may be going down too
                    preempted = True
                    break
                profiler.before_step(step, state)
                t_start = time.perf_counter()
                batch = next(inputs)  # ready unless the host fell behind
                data_wait = time.perf_counter() - t_start
                state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step))
                t_fill = time.perf_counter()
                inputs.fill()  # the next batches, read and transferred while the device computes this step
                # the step ended before the input did: the device may have waited (is_ready: not in jax.Array's stub)
                if metrics["loss"].is_ready():  # type: ignore[attr-defined]
                    data_wait += time.perf_counter() - t_fill
                log.push(step + 1, metrics, t_start, data_wait)
                if step > first:  # push fetched the metrics of `step`: it ended on every process (compiled everywhere)
                    stall.beat(step)
                periodic_probe(step + 1, state, log.tb)  # before the checkpoint: an evaluation lands in it
                evaluated = evaluation.changed()
                if (step + 1) % every == 0 or evaluated:
                    log.flush()  # a non-finite step raises here, before anything is saved
                    saved = evaluation.to_save()
                    ckpt.save(step + 1, state, config, data_iter=data_iter, force=evaluated, task_state=saved)
                if evaluated:
                    evaluation.committed(ckpt, step + 1, state)
            else:
                step = config.total_steps
            log.flush()
            profiler.stop(state)
            if ckpt.latest_step() != step:
                ckpt.save(step, state, config, data_iter=data_iter, force=True, task_state=evaluation.to_save())
            ckpt.wait()
    except BaseException as e:
        # a collective failed (a lost or stalled process): closing the checkpointer would wait for a save that waits
        # for that process; the save is left unfinished and never committed (distributed.py)
        if distributed.is_peer_failure(e):
            close_after_error(log, inputs)
        else:
            close_after_error(log, ckpt, inputs)
        raise
    log.close()
    ckpt.close()
    inputs.close()  # stops grain worker processes
    if preempted:
        if jax.process_index() == 0:
            print(
                f"preempted: saved step {step} to {ckpt.directory}; rerun the same command to resume from step {step}",
                flush=True,
            )
        return {"final_metrics": without_timings(log.last), "preempted": True}

    result = {"final_metrics": without_timings(log.last), "preempted": False}
    closing = task.closing(state)
    if closing is not None:
        result["probe"] = closing
    return result
