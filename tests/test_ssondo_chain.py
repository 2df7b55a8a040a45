"""The S-SONDO chain as a user runs it (launch/ssondo_demo.sh, smoke sizes): pretrain a teacher -> demo corpus as
records -> teacher pass + k-means (main, task teacher_pass) -> distil (main, the trainer) -> probes of the student, the
initial student and the teacher side by side -> ONNX export checked against JAX with onnxruntime."""

import json
import os
import re
import subprocess
import sys

import numpy as np
from helpers import ROOT


def test_ssondo_demo_chain_smoke(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHON=sys.executable)
    r = subprocess.run(["bash", "launch/ssondo_demo.sh", str(tmp_path), "smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    assert "teacher pass: 32 clips" in out and "every clip has exactly one embedding" in out
    assert "k-means: 4 clusters of 32 embeddings" in out
    keys = json.loads((tmp_path / "teacher_pass" / "keys.json").read_text())
    assert keys == [f"demo-{i:05d}" for i in range(0, 32, 2)] + [f"demo-{i:05d}" for i in range(1, 32, 2)]
    assert np.load(tmp_path / "teacher_pass" / "embeddings.npy").shape == (32, 5 * 64)  # smoke teacher: 5 x 64
    probe = re.search(r"probe: student=([\d.]+) init=([\d.]+) teacher=([\d.]+)", out)
    assert probe, out[-2000:]
    assert all(0.0 <= float(v) <= 1.0 for v in probe.groups())
    assert re.search(r"\| student \| [\d,]+ \| 96 \|", out)  # MobileNetV3 width 0.1: 6 x 16 channels
    diff = float(re.search(r"max_abs_diff: ([\d.e-]+)", out).group(1))
    assert diff <= 1e-4 and (tmp_path / "student.onnx").stat().st_size > 10_000
