"""SLURM for real: a one-node cluster on this machine (munged, slurmctld and slurmd of Debian's slurm packages, with a
slurm.conf written here: no systemd, no cgroups, every file under a temporary folder) runs launch/slurm.sbatch as 2
tasks x 4 simulated CPU devices. JAX finds the job from SLURM's environment alone (SLURM_JOB_ID, SLURM_STEP_NODELIST,
SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID; coordinator on the first node, port job id % 4096 + 61440): nothing else
tells the two processes about each other, and the run's mesh (dcn_data=2 x data=4) needs the devices of both. Its
metrics and checkpoints match 1 process x 8 devices. At its time limit, SLURM signals the job, the processes save, the
script requeues the job, and the rerun ends bit-identical to the job that ran through.

The cluster (tests/slurm_cluster.py) needs the Debian packages slurmctld, slurmd, slurm-client and munge (.ci/run
installs them); without them these tests skip, saying so. The script's own logic (interpreter, flags, GPUs, the
requeue on the warning signal) is tested without SLURM too, against stand-ins for srun, scancel and scontrol.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import ROOT, load_config
from slurm_cluster import FINAL_STATES, PACKAGES, PROGRAMS, Cluster, which
from test_multiprocess import ARGS, _last_metrics

from matpac_jax import parallel
from matpac_jax.checkpoint import Checkpointer
from matpac_jax.matpac import task as pretrain
from matpac_jax.train.metrics_log import TIMING_KEYS

MESH = ["--config.mesh.data=4", "--config.mesh.dcn_data=2"]  # hybrid: each task one "slice" of 4 devices


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    tools = {name: which(name) for name in PROGRAMS}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found): apt-get install {PACKAGES}")
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        pytest.fail(f"this machine's name {host} does not resolve: SLURM's node and JAX's coordinator use it")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"), tools)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


STEPS = 200  # about 75 s uninterrupted on 2 cores: SLURM's warning (0 to 30 s after the limit is lowered) comes mid-run


def _flags(steps: int) -> list[str]:
    return [
        *ARGS[1:],
        *MESH,
        f"--config.total_steps={steps}",
        "--config.log_every=10",
        "--config.checkpoint.every=1000",
    ]


def _metrics(workdir) -> list[dict]:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]


def _state(workdir, step: int):
    config = load_config()
    config.mesh.data = 1
    abstract = pretrain.build(config, parallel.make_mesh({"data": 1}, jax.devices()[:1]))[3]
    return jax.device_get(Checkpointer(str(workdir)).restore(abstract, step=step))


@pytest.fixture(scope="module")
def through(slurm, tmp_path_factory):
    """``steps -> workdir`` of an uninterrupted sbatch job of 2 tasks x 4 CPU devices, each run once."""
    root, done = tmp_path_factory.mktemp("through"), {}

    def run(steps: int):
        if steps not in done:
            job_id = slurm.submit(root / str(steps), _flags(steps), "--time=30")
            job = slurm.wait(job_id, 900)
            out = slurm.output(job_id)
            assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{out[-4000:]}"
            assert job["NumTasks"] == "2" and job["NumNodes"] == "1" and job["Restarts"] == "0", job
            done[steps] = root / str(steps)
        return done[steps]

    return run


def test_sbatch_two_tasks_match_one_process_with_the_same_devices(through, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    flags = [a for a in _flags(STEPS) if not a.startswith("--config.mesh.")]
    one = subprocess.run(
        [sys.executable, "-m", "matpac_jax.main", *ARGS[:1], *flags, "--config.mesh.data=8", f"--workdir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = through(STEPS)
    a, b = _last_metrics(tmp_path), _last_metrics(two)
    assert a["step"] == b["step"] == STEPS
    assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert sorted(os.listdir(two / "checkpoints")) == sorted(os.listdir(tmp_path / "checkpoints"))


def _lower_time_limit_when_training(slurm, job_id: str, workdir, timeout: float = 600) -> None:
    """Once the job trains (its first metrics line), its time limit becomes the next whole minute more than a
    minute away: SLURM's warning (``--signal=B:USR1@120``) then comes at its next time-limit check, 0 to 30 s later,
    while the job trains, on any machine."""
    t0 = time.time()
    while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text().strip():
        job = slurm.job(job_id)
        assert job.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), f"{job}\n{slurm.output(job_id)[-4000:]}"
        assert time.time() - t0 < timeout, f"job {job_id} not training after {timeout} s:\n{slurm.output(job_id)}"
        time.sleep(0.5)
    elapsed = _minutes(slurm.job(job_id)["RunTime"])
    slurm.update(job_id, f"TimeLimit={int(elapsed) + 2}")


def _minutes(run_time: str) -> float:
    """scontrol's ``[days-]hours:minutes:seconds`` in minutes."""
    days, _, hms = run_time.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + s / 60


def _restore_time_limit_when_requeued(slurm, job_id: str, minutes: int, timeout: float = 600) -> dict[str, str]:
    """Waits for the requeue (the job pending again, ``Restarts`` 1) and gives the rerun its limit back before it
    starts (SLURM starts a requeued job ``cred_expire`` = 10 s later); the job's record once it ended for good."""
    t0 = time.time()
    while (job := slurm.job(job_id)).get("Restarts") == "0" and job.get("JobState") not in FINAL_STATES:
        assert time.time() - t0 < timeout, f"job {job_id} not requeued after {timeout} s:\n{slurm.output(job_id)}"
        time.sleep(0.2)
    if job.get("JobState") not in FINAL_STATES:
        slurm.update(job_id, f"TimeLimit={minutes}")
    return slurm.wait(job_id, 1200)


def test_time_limit_saves_requeues_and_ends_bit_identical(slurm, through, tmp_path):
    """The job reaches its time limit: SLURM sends the warning signal to the batch script, whose trap has SLURM send
    SIGTERM to both processes; they save at one step and exit 0, the script requeues the job, the rerun resumes and
    ends bit-identical to the uninterrupted job. Where the limit falls is set while the job trains (an operator's
    ``scontrol update TimeLimit``), so the warning comes mid-run however fast the machine is; the requeued run gets
    the job's first limit back. On a machine that ends the job inside SLURM's 30-s check cycle, steps quadruple."""
    for steps in (STEPS, 4 * STEPS):
        workdir = tmp_path / str(steps)
        requeued = slurm.submit(workdir, _flags(steps), "--time=30", "--signal=B:USR1@120")
        _lower_time_limit_when_training(slurm, requeued, workdir)
        job = _restore_time_limit_when_requeued(slurm, requeued, 30)
        out = slurm.output(requeued)
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{out[-4000:]}"
        if job["Restarts"] != "0":
            break
    else:
        pytest.fail(f"{steps} steps end before SLURM's warning, 0 to 30 s after the limit is lowered:\n{out[-4000:]}")
    assert job["Restarts"] == "1", f"{job}\n{out[-4000:]}"
    saved = [int(s) for s in re.findall(r"preempted: saved step (\d+)", out)]
    assert out.count(f"requeueing job {requeued} (restart 1)") == 1 and len(saved) == 1, out[-4000:]
    assert 0 < saved[0] < steps and re.findall(r"resumed from \S+ at step (\d+)", out) == [str(saved[0])], out[-4000:]
    reference = through(steps)
    assert _metrics(workdir) == _metrics(reference)
    for x, y in zip(jax.tree.leaves(_state(workdir, steps)), jax.tree.leaves(_state(reference, steps)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- The script's logic, without SLURM: srun, scancel and scontrol are stand-ins that log their calls.

SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$STUB_LOG"
echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS-unset}" >> "$STUB_LOG"
if [[ -n "${STUB_WAIT:-}" ]]; then  # run until SIGTERM, then save and exit 0 as the trainer does
  trap 'echo "srun: TERM" >> "$STUB_LOG"; exit 0' TERM
  echo $$ > "$STUB_LOG.pid"
  while :; do sleep 0.05; done
fi
exit "${STUB_STATUS:-0}"
"""
SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$STUB_LOG"
kill -TERM "$(cat "$STUB_LOG.pid")"
"""
SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
"""


def _stubs(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("srun", SRUN), ("scancel", SCANCEL), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "JAX_LOCAL_DEVICE_IDS"}
    return dict(
        base,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        STUB_LOG=str(log),
        SLURM_JOB_ID="42",
        PYTHON="/opt/py/bin/python3",
        **env,
    ), log


def test_script_flags_interpreter_and_gpus(tmp_path):
    env, log = _stubs(tmp_path, SLURM_GPUS_PER_NODE="gpu:4")
    r = subprocess.run(
        ["bash", "launch/slurm.sbatch", "configs/pp.py", "/w", "/d/*.ar", "--config.seed=3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == [
        "srun --kill-on-bad-exit=1 /opt/py/bin/python3 -m matpac_jax.main --config=configs/pp.py --workdir=/w "
        "--config.mesh.data=-1 --config.data.train=/d/*.ar --config.seed=3",
        "JAX_LOCAL_DEVICE_IDS=0,1,2,3",  # one process per node drives all its GPUs
    ]
    log.unlink()
    env, log = _stubs(tmp_path / "cpu", SLURM_GPUS_PER_NODE="0", SRUN_ARGS="--overcommit --mpi=none", STUB_STATUS="3")
    r = subprocess.run(
        ["bash", "launch/slurm.sbatch", "configs/pp.py:smoke", "/w", ""],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3  # the trainer's status, and no requeue
    assert log.read_text().splitlines() == [
        "srun --overcommit --mpi=none /opt/py/bin/python3 -m matpac_jax.main --config=configs/pp.py:smoke --workdir=/w "
        "--config.mesh.data=-1",
        "JAX_LOCAL_DEVICE_IDS=unset",
    ]


def test_script_warning_signal_saves_then_requeues(tmp_path):
    env, log = _stubs(tmp_path, STUB_WAIT="1")
    proc = subprocess.Popen(
        ["bash", "launch/slurm.sbatch", "configs/pp.py", "/w", ""],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while not (tmp_path / "calls.log.pid").exists():
        assert proc.poll() is None and time.time() - t0 < 30, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends the batch shell
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert log.read_text().splitlines()[2:] == ["scancel --signal=TERM 42", "srun: TERM", "scontrol requeue 42"]
    assert "requeueing job 42 (restart 1)" in out
