"""Exact resume, as a real job dies: the main command in a subprocess, killed with SIGKILL at an arbitrary step or
preempted with SIGTERM, then rerun; it must end bit-identical to an uninterrupted run, data order included."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import ROOT

from matpac_jax import parallel
from matpac_jax.checkpoint import Checkpointer
from matpac_jax.matpac import task as pretrain
from matpac_jax.train.metrics_log import TIMING_KEYS

STEPS = 10


def _args(data_glob: str, workdir) -> list[str]:
    return [
        sys.executable,
        "-m",
        "matpac_jax.main",
        "--config=configs/pp.py:smoke",  # checkpoints every 2 steps
        f"--workdir={workdir}",
        "--config.data.source=records",
        f"--config.data.train={data_glob}",
        "--config.data.workers=1",  # grain worker processes, their iterator state in every checkpoint
        "--config.probe.enabled=False",
        f"--config.total_steps={STEPS}",
    ]


def _start(data_glob, workdir) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.Popen(
        _args(data_glob, workdir),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the signal reaches the grain workers too, as on a node
    )


def _finish(proc: subprocess.Popen, timeout=600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _logged_steps(workdir) -> int:
    path = workdir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _wait_for_step(proc, workdir, step: int, timeout=600) -> None:
    t0 = time.time()
    while _logged_steps(workdir) < step:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        assert time.time() - t0 < timeout, "the run did not get there in time"
        time.sleep(0.05)


def _metrics(workdir) -> list[dict]:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]


def _final_state(workdir):
    from helpers import load_config

    config = load_config()
    config.mesh.data = 1
    abstract = pretrain.build(config, parallel.make_mesh({"data": 1}, jax.devices()[:1]))[3]
    return jax.device_get(Checkpointer(str(workdir)).restore(abstract, step=STEPS))


def _assert_identical(a, b) -> None:
    assert _metrics(a) == _metrics(b)
    for x, y in zip(jax.tree.leaves(_final_state(a)), jax.tree.leaves(_final_state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from test_main import write_demo_shards

    root = tmp_path_factory.mktemp("resume")
    write_demo_shards(root / "data", num_clips=40)
    glob = str(root / "data" / "*.arrayrecord")
    _finish(_start(glob, root / "reference"))
    assert [m["step"] for m in _metrics(root / "reference")] == list(range(1, STEPS + 1))
    return glob, root / "reference"


def test_sigkill_mid_run_then_rerun_is_bit_identical(uninterrupted, tmp_path):
    glob, reference = uninterrupted
    workdir = tmp_path / "killed"
    proc = _start(glob, workdir)
    _wait_for_step(proc, workdir, 5)  # between the checkpoints of steps 4 and 6 (or during the save of 6)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _logged_steps(workdir)
    assert killed_at < STEPS
    out = _finish(_start(glob, workdir))
    resumed_from = int(out.split("at step ")[1].split()[0])
    assert 2 <= resumed_from <= killed_at
    _assert_identical(reference, workdir)


def test_sigterm_saves_exits_zero_and_resumes_exactly(uninterrupted, tmp_path):
    glob, reference = uninterrupted
    workdir = tmp_path / "preempted"
    proc = _start(glob, workdir)
    _wait_for_step(proc, workdir, 3)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as a scheduler does
    out = _finish(proc)
    last = out.strip().splitlines()[-1]
    assert last.startswith("preempted: saved step ") and "rerun the same command to resume from step" in last
    saved = int(last.split("saved step ")[1].split()[0])
    assert 3 <= saved < STEPS and Checkpointer(str(workdir)).latest_step() == saved
    out = _finish(_start(glob, workdir))
    assert f"resumed from {workdir / 'checkpoints'} at step {saved}" in out
    _assert_identical(reference, workdir)
