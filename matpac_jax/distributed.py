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
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np

_AGREEMENTS = itertools.count(1)  # numbers the agreements of this process: every process takes them in one order


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


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Start the distributed runtime when the job has several processes; returns whether it did."""
    args = cluster_args(coordinator, num_processes, process_id)
    if args is None:
        return False
    import jax

    jax.distributed.initialize(**args)
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
