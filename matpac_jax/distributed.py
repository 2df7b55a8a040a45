"""Multi-process start-up: ``jax.distributed.initialize`` before any computation, when the job has several processes.

How the processes are found, first match wins:

1. explicit: ``--coordinator=HOST:PORT --num_processes=N --process_id=I`` (``main`` flags), or the environment
   variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (launch/local_multiprocess.sh,
   any scheduler);
2. automatic: a Cloud TPU VM of a multi-host slice (``TPU_WORKER_HOSTNAMES`` lists more than one host), or a SLURM
   job step with more than one task (``SLURM_NTASKS`` > 1): JAX reads the topology itself;
3. otherwise one process: nothing to do.

After it, ``jax.devices()`` lists every device of the job and ``jax.process_index()`` names this process; the trainer
builds its mesh over all devices and each process feeds its slice of the global batch.

Once started, the processes meet at ``barrier``s of the coordination service (no device collective) and ``agree`` on
decisions that process 0 takes for the job (the checkpoint to resume from).

Failures (launch/README.md, "When a process fails"; tests/test_multihost_failures.py): every process sends JAX's
coordination service (on process 0) heartbeats; a process silent for ``heartbeat_timeout_s`` (``--heartbeat_timeout``,
default 60 s) is declared lost (measured: between half the timeout and the whole of it after it died or stopped) and
the service terminates every process of the job (SIGABRT, JAX's message "Terminating
process because the JAX distributed service detected fatal errors" naming the silent task). That bounds a killed,
stopped or unreachable process: a training step's collectives wait for a dead peer until then. A process whose
collective fails first (a checkpoint's sync notices a killed peer's closed connection at once) does not wait for it:
``is_peer_failure`` recognises the error, ``unanswered_processes`` names the processes that do not come to a last
barrier, and ``python -m matpac_jax.main`` says so and exits 4 (``peer_failure_message``) instead of waiting at JAX's
shutdown barrier. A process that loses process 0 loses the coordination service with it, and JAX terminates it at
once.
"""

from __future__ import annotations

import itertools
import json
import os
import re

import numpy as np

_AGREEMENTS = itertools.count(1)  # numbers the agreements of this process: every process takes them in one order
DEFAULT_HEARTBEAT_TIMEOUT_S = 60  # JAX's default is 100 s
_heartbeat_timeout_s = DEFAULT_HEARTBEAT_TIMEOUT_S  # as initialize set it
# what a collective or a coordination call says when a peer is gone or silent (gloo on CPU, NCCL on GPU, the
# coordination service): a closed connection, a timeout, an unreachable service
_PEER_FAILURE = re.compile(
    r"Gloo|NCCL|collective|Connection (reset|closed|refused)|by peer|Socket closed|heartbeat|Barrier timed out|"
    r"UNAVAILABLE|DEADLINE_EXCEEDED",
    re.IGNORECASE,
)


def cluster_args(coordinator: str = "", num_processes: int = 0, process_id: int = -1, env=None) -> dict | None:
    """The arguments of ``jax.distributed.initialize``: {} for automatic detection, None for a single process.
    ValueError naming what is missing when the explicit set is incomplete."""
    env = os.environ if env is None else env
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", "0") or 0)
    if process_id < 0:
        process_id = int(env.get("JAX_PROCESS_ID", "-1") or -1)
    given = {"coordinator": bool(coordinator), "num_processes": num_processes > 0, "process_id": process_id >= 0}
    if any(given.values()):
        if not all(given.values()):
            missing = ", ".join(f"--{k}" for k, ok in given.items() if not ok)
            raise ValueError(
                f"multi-process start: {missing} missing (give --coordinator, --num_processes and --process_id "
                "together, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
        if num_processes == 1:
            return None
        return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return {}
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return {}
    return None


def initialize(
    coordinator: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> bool:
    """Start the distributed runtime when the job has several processes; returns whether it did. A process silent for
    ``heartbeat_timeout_s`` seconds is declared lost and the job stopped (module docstring); ValueError below 1 s."""
    global _heartbeat_timeout_s
    if heartbeat_timeout_s < 1:
        raise ValueError(
            f"--heartbeat_timeout={heartbeat_timeout_s} must be >= 1 (seconds without a heartbeat before a process "
            f"is declared lost; default {DEFAULT_HEARTBEAT_TIMEOUT_S})"
        )
    args = cluster_args(coordinator, num_processes, process_id)
    if args is None:
        return False
    import jax

    jax.distributed.initialize(**args, heartbeat_timeout_seconds=heartbeat_timeout_s)
    _heartbeat_timeout_s = heartbeat_timeout_s
    return True


def barrier(name: str, timeout_s: float = 900) -> None:
    """Wait until every process of the job reaches ``name``: the coordination service's barrier, no device collective.

    Before the first step, so that processes that finished compiling at different times enter its first collective
    together: CPU (gloo) collectives give a peer only 30 s to join."""
    import jax

    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost  # its barrier is the distributed runtime's client's: it needs no devices

    multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


def agree(decide, name: str, timeout_s: float = 3600):
    """``decide()`` on process 0, its value (JSON-able) returned on every process, so that the job acts on one
    decision: every process resumes from the same step, or all stop. Process 0 returns its value as is, the others
    as it reads back from JSON (tuples as lists).

    The other processes wait for the decision at a ``barrier`` (no device collective: a decision may take longer
    than a collective waits), up to ``timeout_s``; the value then reaches them in two small device broadcasts, its
    length and its JSON bytes (JAX has no public API to its coordination service's key-value store)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return decide()
    source = jax.process_index() == 0
    value = decide() if source else None
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if source else np.zeros(0, np.uint8)
    barrier(f"matpac_jax/{name}/{next(_AGREEMENTS)}", timeout_s)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    data = multihost_utils.broadcast_one_to_all(data if source else np.zeros(size, np.uint8))
    return value if source else json.loads(np.asarray(data).tobytes())


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a failed collective or coordination call of a
    multi-process job: a ``JaxRuntimeError`` saying that a peer's connection closed, that it timed out, or that the
    coordination service is unreachable. False in a single-process job."""
    import jax

    if jax.process_count() == 1:
        return False
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, jax.errors.JaxRuntimeError) and _PEER_FAILURE.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def peer_check_timeout_s() -> float:
    """How long ``unanswered_processes`` waits: 10 s, a quarter of a shorter heartbeat timeout. The check must end
    before JAX's own declares the lost process and terminates the job, which it does (measured) half the timeout to
    the whole of it after the death."""
    return min(10.0, _heartbeat_timeout_s / 4)


def unanswered_processes(timeout_s: float) -> list[int] | None:
    """After a collective failed, the processes that do not reach a last barrier of the coordination service within
    ``timeout_s``: every live process whose collective failed comes, so those missing are lost (killed, out of memory,
    a host down) or stalled. [] when every process came; None when the service did not say (unreachable: process 0
    is gone, or a message this version does not parse). Call it once per process, on every failing process."""
    try:
        barrier("matpac_jax/peer check after a failed collective", timeout_s)
    except Exception as e:  # noqa: BLE001 - any failure of the barrier is an answer of sorts
        return _timed_out_tasks(str(e))
    return []


def _timed_out_tasks(message: str) -> list[int] | None:
    """The task numbers of the coordination service's barrier timeout ("Some timed out task names:" then one per line,
    bare numbers or ``/job:.../task:N``), or None."""
    _, found, tail = message.partition("timed out task names:")
    if not found:
        return None
    tail = tail.split("RPC:", 1)[0]
    numbers = re.findall(r"task:(\d+)", tail) or re.findall(r"^\s*(\d+)\s*$", tail, re.MULTILINE)
    return sorted({int(n) for n in numbers}) or None


def peer_failure_message(error: BaseException, missing: list[int] | None, timeout_s: float, resume: str) -> str:
    """What a process whose collective failed says before it exits: which process, the failure, the processes that
    did not answer ``unanswered_processes``, what to do and where the rerun resumes (``resume``)."""
    import jax

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = (lines[0] if lines else type(error).__name__)[:300]
    if missing:
        listed = ", ".join(str(p) for p in missing)
        who = (
            f"process {listed} did not answer within {timeout_s:g} s: lost (killed, out of memory, its host down or "
            "unreachable) or stalled; its own log may say why"
        )
    elif missing is not None:
        who = "every process answered: the collective itself failed (the network between the hosts?)"
    else:
        who = "the other processes could not be asked (the coordination service on process 0 is unreachable)"
    return (
        f"process {jax.process_index()} of {jax.process_count()} stopped: a collective with the other processes "
        f"failed ({detail}); {who}. Stop any process of the job still running, then rerun the same command on every "
        f"host: it resumes from {resume}"
    )
