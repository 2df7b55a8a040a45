"""Entry point: python -m matpac_jax.main --config=configs/pp.py[:variant,key=value] --workdir=DIR

Flags only. ``--coordinator``, ``--num_processes``, ``--process_id`` start a multi-process job (distributed.py; TPU
pods and SLURM are detected). ``config.task`` picks the work: 'pretrain' (MATPAC / MATPAC++), 'distill' (S-SONDO
students) and 'finetune' (AudioSet fine-tuning) run the one trainer (matpac_jax.tasks builds the task and hands it
to train.loop.train_and_evaluate); 'teacher_pass' runs the S-SONDO teacher-embedding pass and its k-means into WORKDIR
(distill.teacher_pass.run_from_config). Exit status: 0 when the run finished or was preempted (SIGTERM: it saved and
says where it resumes), 3 when it stopped on a non-finite update (WORKDIR/
nonfinite_report.json; with config.nonfinite='skip', after config.nonfinite_max_skips in a row), 2 for an error found
before any compute, printed as one line that names the key (or the flag, the checkpoint, the run holding the workdir)
and the fix: an unknown config key or flag, a bad value, a checkpoint that fails verification or was saved with
another config, a workdir in use; 1 for anything else.

Several processes (launch/README.md, "When a process fails"): 4 when a collective with the other processes failed (a
process was lost or stalled): the process says which process did not answer and from which checkpoint the rerun
resumes, and exits at once. Any other error of one process (1) also ends it at once, without JAX's shutdown barrier
(which would wait for processes that are blocked in a collective with it). ``--heartbeat_timeout`` (default 60 s):
the seconds after which JAX's coordination service declares a silent process lost and terminates every other process
of the job (SIGABRT, exit status 134 from a shell, with JAX's message naming the task). 5 when no training step
finished for ``config.stall_timeout_s`` (a process stuck while alive, or waiting for one: train/stall.py).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pp.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (a local or mounted path).")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "Multi-process: HOST:PORT of process 0 (see distributed.py).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes of the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout",
    60,
    "Multi-process: seconds a process may go without a heartbeat before JAX's coordination service declares it lost "
    "and stops the job (jax.distributed.initialize's heartbeat_timeout_seconds; JAX's default is 100).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _config_key_error(argv: list[str], error: Exception) -> str:
    """One line naming the override of a key the config does not have (ml_collections raises a KeyError or an
    AttributeError out of flag parsing) and the keys that level has."""
    config = flags.FLAGS["config"].value  # None while the overrides are parsed: load the file again
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    if config is None and spec:
        from matpac_jax.config_lib import load_config_file

        path, _, arg = spec.partition(":")
        try:
            config = load_config_file(path, os.path.basename(path), arg or None)
        except Exception:  # noqa: BLE001 - only for the hint
            config = None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, parts = config, arg.split("=", 1)[0].removeprefix("--").split(".")
        for i, part in enumerate(parts[1:], start=1):
            if not hasattr(node, "keys") or part not in node:
                parent = ".".join(parts[:i])
                known = f"; keys of {parent}: {', '.join(sorted(node.keys()))}" if hasattr(node, "keys") else ""
                return f"{arg}: unknown config key {'.'.join(parts[: i + 1])}{known}"
            node = node[part]
    return f"unknown config key ({error})"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error (an unknown flag or config key, a bad value, a config file that fails)
    printed as one line and exit status 2 instead of a traceback and 1."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
    except (KeyError, AttributeError) as e:
        message = _config_key_error(argv, e)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def disk_full_message(e: OSError, workdir: str) -> str:
    """What a run stopped by a full disk (or quota) says: where, and that the same command resumes."""
    where = f" writing {e.filename}" if e.filename else ""
    return (
        f"no space left on the device{where} ({e.strerror}): free space on the device holding {workdir}, then "
        "rerun the same command: it resumes from the last checkpoint"
    )


def resume_description(workdir: str) -> str:
    """Where a rerun resumes: the workdir's latest committed checkpoint (orbax commits a step once every process has
    written its part; a rerun verifies it and falls back to an earlier one if it fails), listed without reading it."""
    root = os.path.join(workdir, "checkpoints")
    try:
        steps = sorted(int(name) for name in os.listdir(root) if name.isdigit())
    except OSError:
        steps = []
    if not steps:
        return f"the start (no checkpoint committed in {root})"
    return f"step {steps[-1]}, the last checkpoint committed in {root}"


def stop_after_failure(error: Exception, workdir: str) -> NoReturn:
    """End this process of a multi-process job at once after ``error``, without JAX's shutdown barrier (at exit it
    waits, up to its shutdown timeout, for processes that are lost or blocked in a collective with this one). A failed
    collective (``distributed.is_peer_failure``): the processes that did not answer are named and the status is 4;
    any other error: its traceback, status 1. Either way the message says what to do and where the rerun resumes."""
    import jax

    from matpac_jax import distributed

    traceback.print_exception(error)
    resume = resume_description(workdir)
    if distributed.is_peer_failure(error):
        timeout = distributed.peer_check_timeout_s()
        message = distributed.peer_failure_message(error, distributed.unanswered_processes(timeout), timeout, resume)
        status = 4
    else:
        message = (
            f"process {jax.process_index()} of {jax.process_count()} failed ({type(error).__name__}; traceback "
            "above) and exits now; the other processes stop when their collective with it fails or, at the latest, "
            "when JAX declares it lost (--heartbeat_timeout). Fix the cause, then rerun the same command on every "
            f"host: it resumes from {resume}"
        )
        status = 1
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax / grain log every save at INFO; -v 0 shows them
    config = _CONFIG.value
    try:
        _ = config.task  # a config file that failed to load raises here
    except (OSError, ValueError, AttributeError) as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        print(f"error: --config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}: cannot load the config "
              f"({detail})", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(2)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.getcwd(), ".jax_cache"))
    from matpac_jax import distributed

    try:
        several = distributed.initialize(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT_TIMEOUT.value
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    try:
        run(config, _WORKDIR.value)
    except Exception as e:
        if not several:
            raise
        stop_after_failure(e, _WORKDIR.value)


def run(config, workdir: str) -> None:
    """The work ``config.task`` names, its expected failures printed as one line with their exit status."""
    from matpac_jax.config_lib import ConfigError
    from matpac_jax.tasks import train_and_evaluate
    from matpac_jax.train.metrics_log import NonFiniteError

    try:
        if config.task == "teacher_pass":
            from matpac_jax.distill.teacher_pass import run_from_config
            from matpac_jax.workdir_lock import WorkdirLock

            with WorkdirLock(workdir):
                status = run_from_config(config, workdir)
            sys.exit(status)
        result = train_and_evaluate(config, workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {disk_full_message(e, workdir)}", file=sys.stderr, flush=True)
        sys.exit(2)
    if "probe" in result:
        means = {k: v for k, v in result["probe"].items() if not k.endswith("_ci95")}
        print("probe: " + " ".join(f"{k}={v:.4f}" for k, v in means.items()), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
