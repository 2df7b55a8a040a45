"""The type check: mypy over the files pyproject.toml's ``[tool.mypy]`` names (the trainer, ``train/``, and the
tasks), strict on them (every function annotated, ``Optional`` spelled out, ...). Run from the repository root so that
pyproject.toml's settings and file list apply; its cache is ``.mypy_cache`` there (a cold run takes ~20-40 s)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mypy_passes_on_the_trainer_and_the_tasks():
    run = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, f"mypy failed (rc {run.returncode}):\n{run.stdout}{run.stderr}"
