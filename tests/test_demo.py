"""The README's first command: the demo trains, checkpoints, and its learned encoder beats the initial one (slow:
run with `pytest -m slow`)."""

import json
import os

import pytest
from test_main import main


@pytest.mark.slow  # minutes of CPU: `pytest -m slow`
def test_demo_learned_encoder_beats_the_initial_one(tmp_path):
    r = main("--config=configs/pp.py:demo", f"--workdir={tmp_path}", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("probe: learned=")
    learned, init = (float(x.split("=")[1]) for x in last.split()[1:])
    # 8 classes, 800 held-out clips: a 0.04 margin is ~1.7 standard errors of the difference; the run gives ~0.085.
    assert learned > init + 0.04, last
    assert os.listdir(tmp_path / "checkpoints")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50 - 0.5
