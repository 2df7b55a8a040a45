"""Named sweeps: launch commands per run in their own workdirs, runs in sequence (a failing one reported, the sweep
going on), the final-metrics table."""

import os
import subprocess
import sys

from helpers import ROOT

from matpac_jax.sweep import commands, load_sweeps, main


def test_config_sweeps_print_one_command_per_run(tmp_path, capsys):
    sweeps = load_sweeps(os.path.join(ROOT, "configs", "pp.py"))
    assert [r["model.mcl_heads"] for r in sweeps["mcl_heads"]] == [1, 3, 5]
    assert set(load_sweeps(os.path.join(ROOT, "configs", "ssondo.py"))["losses"][0]) == {"distill.loss"}
    assert main(["--config=configs/pp.py:demo", "--sweep=large_batch", f"--workdir={tmp_path}", "--print"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert all(line.startswith("python -m matpac_jax.main --config=configs/pp.py:demo --workdir=") for line in lines)
    assert f"--workdir={tmp_path}/data.batch_size=8192,optim.optimizer=lamb,optim.lr_scaling=sqrt" in lines[3]
    assert lines[3].endswith("--config.optim.optimizer=lamb --config.optim.lr_scaling=sqrt")
    assert main(["--config=configs/pp.py", "--sweep=nope", f"--workdir={tmp_path}"]) == 2


def test_sweep_runs_in_sequence_and_tabulates(tmp_path):
    config = tmp_path / "sweepcfg.py"
    config.write_text(
        "from matpac_jax import config_lib\n"
        f"def get_config(arg=None):\n    return config_lib.load_config_file({os.path.join(ROOT, 'configs', 'pp.py')!r},"
        " 'pp.py', 'smoke')\n"
        "SWEEPS = {'t': [{'total_steps': 3, 'probe.enabled': False}, {'optim.nonexistent': 1}]}\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run([sys.executable, "-m", "matpac_jax.sweep", f"--config={config}", "--sweep=t",
                        f"--workdir={tmp_path / 'runs'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]  # the second run fails
    assert "run optim.nonexistent=1 failed with exit status" in r.stdout
    table = (tmp_path / "runs" / "sweep.md").read_text()
    first = next(line for line in table.splitlines() if line.startswith("| total_steps=3,probe.enabled=False |"))
    assert first.split("|")[2].strip() == "3"  # final step
    assert "| optim.nonexistent=1 | failed (exit" in table
    assert [d for d, _ in commands(str(config), [{"a": 1}], "/w")] == ["/w/a=1"]
