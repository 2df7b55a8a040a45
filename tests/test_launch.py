"""The launch scripts run the interpreter named by PYTHON (the tests pass ``sys.executable``), never whatever
``python`` is first on PATH: outside an activated virtual environment that is another interpreter, without the
package."""

import os
import stat
import subprocess

from helpers import ROOT

STUB = """#!/usr/bin/env bash
echo "$*" >> "{log}"
"""


def _stub(tmp_path):
    """A stand-in interpreter that logs its arguments, and a PATH whose `python` fails loudly."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "stub-python"
    stub.write_text(STUB.format(log=log))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    trap = tmp_path / "bin"
    trap.mkdir()
    (trap / "python").write_text("#!/usr/bin/env bash\necho 'plain python was called' >&2\nexit 97\n")
    (trap / "python").chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), PATH=f"{trap}{os.pathsep}{os.environ['PATH']}")
    return env, log


def test_local_multiprocess_runs_PYTHON_for_every_process(tmp_path):
    env, log = _stub(tmp_path)
    r = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "--cpu-devices=2", "--workdir=w"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    calls = sorted(log.read_text().splitlines())
    assert len(calls) == 2 and all(c.startswith("-m matpac_jax.main --coordinator=localhost:") for c in calls)
    assert [c.split("--process_id=")[1].split()[0] for c in calls] == ["0", "1"]


def test_ssondo_demo_runs_PYTHON_for_every_step(tmp_path):
    env, log = _stub(tmp_path)
    r = subprocess.run(["bash", "launch/ssondo_demo.sh", str(tmp_path / "w"), "smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    modules = [c.split()[1] for c in log.read_text().splitlines()]
    assert modules == ["matpac_jax.main", "matpac_jax.data.demo", "matpac_jax.main", "matpac_jax.main",
                       "matpac_jax.distill.export"]  # fmt: skip
