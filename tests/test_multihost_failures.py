"""Failures of a multi-process job, as on a cluster: 2 processes x 4 simulated CPU devices of one job on this machine
(as tests/test_multiprocess.py), one of them killed (kill -9), stopped (SIGSTOP) or alone in receiving a preemption
notice (SIGTERM) while the job trains.

- killed: the survivor stops within the heartbeat timeout, naming the lost process: JAX's coordination service
  declares it lost and terminates the survivor (its collectives in a training step wait for the dead peer), or, when
  the survivor's collective fails first (a checkpoint's sync), the trainer names it after a short check and exits 4 at
  once (``test_a_failed_collective_...`` runs that path alone); the rerun resumes from the last committed checkpoint
  and ends as an uninterrupted job;
- stopped: the survivor stops within the heartbeat timeout, JAX's message naming the silent process; every committed
  checkpoint verifies and holds the parts of both processes (the save under way when the process stopped is never
  committed);
- stuck with its heartbeat running (its main thread asleep for good): JAX never declares it lost; both processes'
  stall watches (``config.stall_timeout_s``) end the job, status 5, naming where the rerun resumes;
- SIGTERM to one process: both stop at one step, its checkpoint is committed once, both exit 0, and the rerun ends as
  an uninterrupted job.

The measured times are printed (pytest -s); launch/README.md quotes them.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
from helpers import ROOT, load_config
from test_multiprocess import ARGS, _last_metrics

from matpac_jax import checksums, parallel
from matpac_jax.checkpoint import Checkpointer
from matpac_jax.matpac import task as pretrain
from matpac_jax.trained_state import verified_step_dir

STEPS, EVERY = 80, 20  # a checkpoint every 20 steps: the failures come while the job trains, 60 steps from its end
HEARTBEAT = 20  # --heartbeat_timeout: JAX declares a silent process lost 10 to 20 s after its last heartbeat
FLAGS = [
    *ARGS,
    "--config.mesh.data=4",
    "--config.mesh.dcn_data=2",
    f"--config.total_steps={STEPS}",
    f"--config.checkpoint.every={EVERY}",
    f"--heartbeat_timeout={HEARTBEAT}",
]
START_S = 480  # a job's start-up (imports, compilation) on 2 busy cores, with margin


# Process 1 as matpac_jax.main, except that SIGUSR2 makes its main thread sleep for good: the process is stuck but
# alive, and its heartbeats (a thread of JAX's) go on, as with a process blocked on a dead filesystem.
HANG_ON_USR2 = """
import runpy, signal, sys, time
def hang(*_):
    while True:
        time.sleep(3600)
signal.signal(signal.SIGUSR2, hang)
sys.argv = ["matpac_jax.main", *sys.argv[1:]]
runpy.run_module("matpac_jax.main", run_name="__main__", alter_sys=True)
"""
STALL = 20  # --config.stall_timeout_s of the stalled job: a step of a loaded 2-core machine takes far less


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Job:
    """The two processes of one job (``python -m matpac_jax.main`` as launch/local_multiprocess.sh starts them), their
    output in files under the workdir's parent."""

    def __init__(self, workdir, name: str, flags: tuple[str, ...] = (), hang_on_usr2: bool = False):
        self.workdir, self.logs = workdir, workdir.parent / name
        self.logs.mkdir(parents=True)
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
        port = _free_port()
        self.procs = []
        for i in range(2):
            where = [f"--workdir={workdir}", f"--coordinator=localhost:{port}", "--num_processes=2"]
            run = ["-c", HANG_ON_USR2] if hang_on_usr2 and i == 1 else ["-m", "matpac_jax.main"]
            cmd = [sys.executable, *run, *FLAGS, *flags, *where, f"--process_id={i}"]
            with open(self.logs / f"{i}.out", "w") as out, open(self.logs / f"{i}.err", "w") as err:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err))

    def out(self, i: int) -> str:
        return (self.logs / f"{i}.out").read_text()

    def err(self, i: int) -> str:
        return (self.logs / f"{i}.err").read_text()

    def tails(self) -> str:
        return "".join(f"\n--- process {i}:\n{self.out(i)[-1500:]}{self.err(i)[-3000:]}" for i in range(2))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]

    def wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_S
        while not ready():
            assert all(p.poll() is None for p in self.procs), f"a process ended before {what}{self.tails()}"
            assert time.monotonic() < deadline, f"no {what} after {START_S} s{self.tails()}"
            time.sleep(0.01)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # SIGKILL also ends a stopped process
                p.wait()


def _committed(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def _checkpoint_ready(workdir, step: int):
    return lambda: (workdir / "checkpoints" / str(step)).is_dir()


def _resumed_from(job: Job) -> int:
    found = re.findall(r"resumed from \S+ at step (\d+)", job.out(0))
    assert len(found) == 1, job.tails()
    return int(found[0])


def _rerun_and_compare(workdir, name: str, through: dict, first: int) -> None:
    """The same command again: it resumes from step ``first`` and ends as the uninterrupted job."""
    rerun = Job(workdir, name)
    try:
        assert rerun.wait(START_S + 120) == [0, 0], rerun.tails()
    finally:
        rerun.kill()
    assert _resumed_from(rerun) == first
    last = _last_metrics(workdir)
    assert last["step"] == through["step"] == STEPS
    assert last == through  # bit-identical: every logged value


@pytest.fixture(scope="module")
def through(tmp_path_factory) -> dict:
    """The final metrics of the job run without a failure."""
    workdir = tmp_path_factory.mktemp("through") / "w"
    job = Job(workdir, "through")
    try:
        assert job.wait(START_S + 120) == [0, 0], job.tails()
    finally:
        job.kill()
    return _last_metrics(workdir)


def _stopped_naming_process_1(job: Job, status: int, elapsed: float) -> str:
    """Which way process 0 stopped after process 1 was lost, checked: 'trainer' (its collective failed: the trainer's
    message, status 4, within a quarter of the heartbeat timeout and a few seconds) or 'jax' (JAX's coordination
    service declared process 1 lost: SIGABRT and JAX's message, within the heartbeat timeout)."""
    err = job.err(0)
    if status == 4:
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: process 0 of 2 stopped: a collective with the other processes failed"), last
        assert "process 1 did not answer" in last and "rerun the same command on every host" in last, last
        assert elapsed < HEARTBEAT / 2, f"{elapsed:.1f} s{job.tails()}"
        return "trainer"
    assert status == -signal.SIGABRT, job.tails()
    assert "Terminating process because the JAX distributed service detected fatal errors" in err, job.tails()
    assert re.search(r"stopped sending heartbeats\):\s*1\s", err), job.tails()
    assert elapsed < HEARTBEAT + 10, f"{elapsed:.1f} s{job.tails()}"
    return "jax"


def _during_save(workdir, step: int):
    """Ready once process 0 started the save of ``step`` (its temporary directory), or it is committed."""
    return lambda: any(
        n.startswith(f"{step}.orbax-checkpoint-tmp") or n == str(step) for n in os.listdir(workdir / "checkpoints")
    )


def test_a_killed_process_stops_the_job_within_the_heartbeat_timeout_and_the_rerun_resumes_identically(
    tmp_path, through
):
    workdir = tmp_path / "w"
    job = Job(workdir, "killed")
    try:
        job.wait_for(_checkpoint_ready(workdir, EVERY), f"checkpoint {EVERY}")
        job.wait_for(_during_save(workdir, 2 * EVERY), f"the save of step {2 * EVERY}")
        killed = time.monotonic()
        os.kill(job.procs[1].pid, signal.SIGKILL)
        status = job.procs[0].wait(timeout=HEARTBEAT + 60)
        elapsed = time.monotonic() - killed
    finally:
        job.kill()
    way = _stopped_naming_process_1(job, status, elapsed)
    print(f"\nkill -9 of process 1 -> process 0 stopped {elapsed:.1f} s later (status {status}, by {way})")
    committed = _committed(workdir)
    if way == "trainer":
        assert f"it resumes from step {committed[-1]}, the last checkpoint committed" in job.err(0)
    _rerun_and_compare(workdir, "rerun", through, committed[-1])


FAILED_COLLECTIVE = """
import os, signal, sys
import numpy as np
from matpac_jax import distributed, main
process, port, workdir, heartbeat, failure = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
distributed.initialize(f"localhost:{port}", 2, process, heartbeat_timeout_s=heartbeat)
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("started")
if process == 1 and failure == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
if process == 1 and failure == "raised":
    main.stop_after_failure(RuntimeError("an error of process 1 alone"), workdir)
try:
    while True:
        multihost_utils.process_allgather(np.ones(2, np.float32))
except Exception as e:
    main.stop_after_failure(e, workdir)
"""


@pytest.mark.parametrize("failure", ["killed", "raised"])
def test_a_failed_collective_names_the_process_that_does_not_answer_and_exits_4_at_once(tmp_path, failure):
    """Process 1 is killed, or fails with an error of its own (it exits 1 at once, its traceback and message on
    stderr); process 0's collective fails: it names process 1 after the check and exits 4."""
    (tmp_path / "checkpoints" / "12").mkdir(parents=True)  # what the messages name as the resume point
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    port, started = _free_port(), time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FAILED_COLLECTIVE, str(i), str(port), str(tmp_path), str(HEARTBEAT), failure],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        _, err = procs[0].communicate(timeout=120)
        elapsed = time.monotonic() - started
        _, err1 = procs[1].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    resume = f"it resumes from step 12, the last checkpoint committed in {tmp_path / 'checkpoints'}"
    if failure == "raised":
        assert procs[1].returncode == 1, err1[-3000:]
        assert "RuntimeError: an error of process 1 alone" in err1, err1[-3000:]
        last = err1.strip().splitlines()[-1]
        assert last.startswith("error: process 1 of 2 failed (RuntimeError; traceback above) and exits now"), last
        assert last.endswith(resume), last
    assert procs[0].returncode == 4, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2 stopped: a collective with the other processes failed ("), last
    check = min(10.0, HEARTBEAT / 4)
    assert f"process 1 did not answer within {check:g} s" in last, last
    assert last.endswith(resume), last
    assert elapsed < 60, elapsed  # start-up, the failed collective, the check; not the heartbeat timeout
    print(f"\nprocess 1 {failure} -> process 0 named it and exited 4, {elapsed:.1f} s after the start")


def test_the_peer_check_reads_the_coordination_service_s_barrier_timeout():
    from matpac_jax.distributed import _timed_out_tasks, is_peer_failure

    message = (
        "DEADLINE_EXCEEDED: Barrier timed out. Id: b::0. ...\n# of tasks that reached the barrier: 1/3.\nThe first "
        "task at the barrier: 0. Some timed out task names:\n2\n1\n\n\nRPC: /xla.coordination.CoordinationService"
    )
    assert _timed_out_tasks(message) == [1, 2]
    assert _timed_out_tasks("Some timed out task names:\n/job:jax_worker/replica:0/task:3\n") == [3]
    assert _timed_out_tasks("UNAVAILABLE: Socket closed") is None
    assert not is_peer_failure(RuntimeError("Connection reset by peer"))  # one process: never a peer's failure


def test_a_stopped_process_stops_the_job_within_the_heartbeat_timeout_and_no_save_is_half_committed(tmp_path):
    workdir = tmp_path / "w"
    job = Job(workdir, "stopped")
    try:
        job.wait_for(_checkpoint_ready(workdir, EVERY), f"checkpoint {EVERY}")
        job.wait_for(_during_save(workdir, 2 * EVERY), f"the save of step {2 * EVERY}")  # stopped in the middle of it
        stopped = time.monotonic()
        os.kill(job.procs[1].pid, signal.SIGSTOP)
        status = job.procs[0].wait(timeout=HEARTBEAT + 60)
        elapsed = time.monotonic() - stopped
    finally:
        job.kill()  # SIGKILL ends the stopped process too
    way = _stopped_naming_process_1(job, status, elapsed)
    print(f"\nSIGSTOP of process 1 -> process 0 stopped {elapsed:.1f} s later (status {status}, by {way})")
    # every committed checkpoint is whole: it verifies and holds both processes' parts; the latest is the resume point
    committed = _committed(workdir)
    assert committed[-1] in (EVERY, 2 * EVERY), committed
    root = workdir / "checkpoints"
    for step in committed:
        named, problem = checksums.verify(str(root / str(step)))
        assert (named, problem) == (step, None), (step, problem)
        for i in range(2):
            assert (root / str(step) / "state" / f"ocdbt.process_{i}").is_dir(), (step, i)
            assert (root / str(step) / "state" / "array_metadatas" / f"process_{i}").is_file(), (step, i)
    assert verified_step_dir(str(workdir)) == str(root / str(committed[-1]))
    ckpt = Checkpointer(str(workdir))
    try:
        assert ckpt.resume_step() == committed[-1]
        config = load_config()
        config.mesh.data = 1
        abstract = pretrain.build(config, parallel.make_mesh({"data": 1}, jax.devices()[:1]))[3]
        assert int(ckpt.restore(abstract, step=committed[-1]).step) == committed[-1]
    finally:
        ckpt.close()


def test_a_process_stuck_with_its_heartbeat_running_stops_the_job_after_the_stall_timeout(tmp_path):
    """JAX never declares such a process lost and the other waits for it in its step's collective: both processes'
    stall watches (train/stall.py) end them, the stuck one showing where its main thread is."""
    workdir = tmp_path / "w"
    job = Job(workdir, "stuck", (f"--config.stall_timeout_s={STALL}",), hang_on_usr2=True)
    try:
        job.wait_for(_checkpoint_ready(workdir, EVERY), f"checkpoint {EVERY}")
        stuck = time.monotonic()
        os.kill(job.procs[1].pid, signal.SIGUSR2)
        statuses = job.wait(STALL + HEARTBEAT + 60)
        elapsed = time.monotonic() - stuck
    finally:
        job.kill()
    print(f"\nprocess 1 stuck, heartbeat running -> both processes ended {elapsed:.1f} s later (statuses {statuses})")
    # each ends by its own watch (5), by its collective failing once the other is gone (4, naming it), or by JAX
    # (SIGABRT); at least one by its watch
    assert set(statuses) <= {4, 5, -signal.SIGABRT} and 5 in statuses, job.tails()
    assert elapsed < STALL + HEARTBEAT + 15, f"{elapsed:.1f} s{job.tails()}"
    for i, status in enumerate(statuses):
        last = job.err(i).strip().splitlines()[-1]
        if status == 5:
            assert last.startswith(f"error: process {i} of 2 stopped: no training step finished in the"), last
            assert f"config.stall_timeout_s={STALL}" in last and f"committed in {workdir / 'checkpoints'}" in last
        if status == 4:
            assert last.startswith(f"error: process {i} of 2 stopped: a collective with the other processes"), last
            assert f"process {1 - i} did not answer" in last, last
    if statuses[1] == 5:
        assert "in hang" in job.err(1), job.tails()  # where its main thread is stuck
    assert EVERY in _committed(workdir)


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_resumes_identically(tmp_path, through):
    workdir = tmp_path / "w"
    job = Job(workdir, "preempted")
    try:
        job.wait_for(_checkpoint_ready(workdir, EVERY), f"checkpoint {EVERY}")
        signalled = time.monotonic()
        os.kill(job.procs[1].pid, signal.SIGTERM)
        statuses = job.wait(120)
        elapsed = time.monotonic() - signalled
    finally:
        job.kill()
    print(f"\nSIGTERM to process 1 -> both processes exited {elapsed:.1f} s later (statuses {statuses})")
    assert statuses == [0, 0], job.tails()
    saved = [int(s) for s in re.findall(r"preempted: saved step (\d+)", job.out(0))]
    assert len(saved) == 1 and EVERY < saved[0] < STEPS, job.tails()
    step = saved[0]
    assert _committed(workdir)[-1] == step
    # committed, so both processes saved that step (orbax commits a save once every process has written its part)
    assert checksums.verify(str(workdir / "checkpoints" / str(step))) == (step, None)
    _rerun_and_compare(workdir, "rerun", through, step)
