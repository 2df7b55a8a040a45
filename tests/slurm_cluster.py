"""A one-node SLURM cluster for the tests (tests/test_slurm.py): munged, slurmctld and slurmd of Debian's packages,
started by ``Cluster.start`` under a temporary folder with a ``slurm.conf`` written there (no systemd, no cgroups, no
accounting), and the jobs submitted to it."""

import getpass
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from helpers import ROOT

PACKAGES = "slurmctld slurmd slurm-client munge"
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
JAX_PORTS = 61440  # JAX's SLURM detection: the coordinator listens on job id % 4096 + 61440 (clusters/slurm_cluster.py)

SLURM_CONF = """\
ClusterName=matpac
MailProg=/bin/true
SlurmctldHost={host}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it starts again (120 s by default)
AuthInfo=socket={dir}/munge.socket,cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
OverTimeLimit=0
MinJobAge=3600
FirstJobId={first_job_id}
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_job_id() -> int:
    """A first job id whose next 16 jobs find their JAX coordinator port free (other clusters may run beside)."""
    rng = random.Random()
    for _ in range(200):
        offset = rng.randrange(4096 - 16)
        if all(_port_free(JAX_PORTS + offset + i) for i in range(16)):
            return 4096 * rng.randrange(1, 200) + offset
    raise RuntimeError(f"no 16 free ports in [{JAX_PORTS}, 65535] for JAX's coordinator")


class Cluster:
    """The daemons of a one-node cluster under ``root``, and the jobs submitted to it."""

    def __init__(self, root, tools: dict[str, str]):
        self.root, self.tools = root, tools
        self.daemons: dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"):
            env.pop(k, None)  # only SLURM's environment says who is who
        env["PATH"] = os.pathsep.join([os.path.dirname(tools["sbatch"]), env.get("PATH", "")])
        self.env = dict(env, SLURM_CONF=str(self.conf))

    def start(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        ports = [_free_port()]
        while (port := _free_port()) == ports[0]:
            pass
        ports.append(port)
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host,
                user=getpass.getuser(),
                ctld_port=ports[0],
                slurmd_port=ports[1],
                dir=self.root,
                first_job_id=_first_job_id(),
                cpus=max(2, os.cpu_count() or 1),  # config_overrides: 2 tasks of one CPU on a 1-CPU machine too
            )
        )
        r = self.root
        self._daemon(  # --force: the socket's folder is private (pytest's), as every client runs as this user
            "munged",
            "-F",
            "--force",
            f"--key-file={key}",
            f"--socket={r}/munge.socket",
            f"--pid-file={r}/munged.pid",
            f"--seed-file={r}/munged.seed",
            f"--log-file={r}/munged.log",
        )
        self._wait(lambda: (r / "munge.socket").exists(), 30, "munged did not create its socket")
        self._daemon("slurmctld", "-D")
        self._daemon("slurmd", "-D", "-N", self.host)
        self._wait(self._node_idle, 60, f"node {self.host} not idle")

    def _daemon(self, name: str, *args: str) -> None:
        with open(self.root / f"{name}.out", "w") as out:
            proc = subprocess.Popen(
                [self.tools[name], *args], stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.daemons[name] = proc

    def _node_idle(self) -> bool:
        return self._client("sinfo", "-h", "-N", "-o", "%T").stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        t0 = time.time()
        while not ready():
            for proc in self.daemons.values():
                assert proc.poll() is None, f"{proc.args[0]} exited ({proc.returncode}): {self.logs()}"
            assert time.time() - t0 < timeout, f"{what} after {timeout} s: {self.logs()}"
            time.sleep(0.5)

    def logs(self) -> str:
        parts = []
        for name in ("munged.out", "munged.log", "slurmctld.out", "slurmctld.log", "slurmd.out", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:  # end the jobs first
            self._client("scancel", f"--user={getpass.getuser()}")
            t0 = time.time()
            while time.time() - t0 < 60 and self._client("squeue", "-h").stdout.strip():
                time.sleep(1)
        for proc in reversed(self.daemons.values()):  # slurmd, slurmctld, munged
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _client(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)

    def submit(self, workdir, flags: list[str], *options: str) -> str:
        """sbatch launch/slurm.sbatch on this node as 2 tasks of 4 CPU devices; the job id."""
        cmd = [
            "sbatch",
            "--parsable",
            f"--output={self.root}/job-%j.out",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--gpus-per-node=0",
            *options,
            "launch/slurm.sbatch",
            "configs/pp.py:smoke",
            str(workdir),
            "",
            *flags,
        ]
        env = dict(
            self.env, PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
        )
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr + self.logs()
        return r.stdout.strip().split(";")[0]

    def update(self, job_id: str, *fields: str) -> None:
        r = self._client("scontrol", "update", f"JobId={job_id}", *fields)
        assert r.returncode == 0, r.stderr

    def job(self, job_id: str) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S*)", self._client("scontrol", "-o", "show", "job", job_id).stdout))

    def output(self, job_id: str) -> str:
        path = self.root / f"job-{job_id}.out"
        return path.read_text() if path.exists() else ""

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """The job's record once it ended for good (a requeued job goes on)."""
        t0 = time.time()
        while (job := self.job(job_id)).get("JobState") not in FINAL_STATES:
            if time.time() - t0 > timeout:
                self._client("scancel", job_id)
                pytest.fail(f"job {job_id} not done after {timeout} s ({job}):\n{self.output(job_id)[-4000:]}")
            time.sleep(1)
        return job
