"""Multi-host on one machine: 2 processes × 4 simulated CPU devices (launch/local_multiprocess.sh, jax.distributed
over localhost, a hybrid mesh with each process as one "slice") train the smoke run to the same metrics as 1 process ×
8 devices; the start-up arguments; the hybrid mesh's device order."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ROOT

from matpac_jax.distributed import cluster_args
from matpac_jax.load import load_model
from matpac_jax.trained_state import read_trained_state

ARGS = ["--config=configs/pp.py:smoke", "--config.probe.enabled=False"]


def _last_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
    return {k: v for k, v in last.items() if not k.endswith(("_s", "samples_per_s", "tokens_per_s", "mfu"))}


def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    one = subprocess.run([sys.executable, "-m", "matpac_jax.main", *ARGS, "--config.mesh.data=8",
                          f"--workdir={tmp_path / 'one'}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "--cpu-devices=4", *ARGS,
                          "--config.mesh.data=4", "--config.mesh.dcn_data=2",  # hybrid: a process per "slice"
                          f"--workdir={tmp_path / 'two'}"], cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable),
                         capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a, b = _last_metrics(tmp_path / "one"), _last_metrics(tmp_path / "two")
    assert a["step"] == b["step"] == 8
    assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == sorted(os.listdir(tmp_path / "one" / "checkpoints"))
    # This one process reads what 2 processes wrote (their shardings name devices it does not have: orbax's default
    # restore refused it, "Topology mismatch"), and builds the model from it.
    (_, two), (_, one) = read_trained_state(str(tmp_path / "two")), read_trained_state(str(tmp_path / "one"))
    assert jax.tree.structure(two) == jax.tree.structure(one)
    for x, y in zip(jax.tree.leaves(two), jax.tree.leaves(one), strict=True):
        assert isinstance(x, np.ndarray) and x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4 * max(1.0, float(np.max(np.abs(y)))))
    encoder = load_model(str(tmp_path / "two"))
    audio = np.random.default_rng(0).standard_normal((1, 16000)).astype(np.float32)
    a, b = encoder.embed(audio)["clip"], load_model(str(tmp_path / "one")).embed(audio)["clip"]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(b))))


def test_cluster_arguments_explicit_automatic_and_incomplete():
    assert cluster_args(env={}) is None
    assert cluster_args("h:1", 2, 1, env={}) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    env = {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert cluster_args(env=env) == {"coordinator_address": "h:2", "num_processes": 4, "process_id": 3}
    assert cluster_args("h:1", 1, 0, env={}) is None
    assert cluster_args(env={"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == {}
    assert cluster_args(env={"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert cluster_args(env={"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"}) == {}
    with pytest.raises(ValueError, match="--num_processes, --process_id missing"):
        cluster_args("h:1", env={})
    with pytest.raises(ValueError, match="--process_id=2 must be in"):
        cluster_args("h:1", 2, 2, env={})


def test_hybrid_mesh_needs_whole_slices():
    import jax

    from matpac_jax.parallel import make_mesh

    with pytest.raises(ValueError, match="dcn_data=3: 8 devices do not split into 3 slices"):
        make_mesh({"data": -1, "dcn_data": 3}, jax.devices()[:8])
    with pytest.raises(ValueError, match="dcn_data needs a 'data' axis"):
        make_mesh({"fsdp": -1, "dcn_data": 2}, jax.devices()[:8])
    assert dict(make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:8]).shape) == {"data": 8, "fsdp": 1}
