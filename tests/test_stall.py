"""train/stall.py alone: a loop that stops beating ends its process (status 5) with the stuck thread's stack and a
message naming the step, the timeout and where the rerun resumes; one that beats, or a timeout of 0, is left alone;
a negative timeout is a config error. The multi-process case: tests/test_multihost_failures.py."""

import subprocess
import sys

import pytest
from helpers import load_config

from matpac_jax.config_lib import ConfigError, check_config

LOOP = """
import sys, time
from matpac_jax.train.stall import StallWatch
timeout, steps, pause = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
with StallWatch(timeout, "/runs/x/checkpoints", (1, 2)) as watch:
    for step in range(steps):
        time.sleep(0.05)
        watch.beat(step + 1)
    time.sleep(pause)  # no beat: stuck here
print("finished")
"""


def _run(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", LOOP, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_loop_without_progress_stops_with_status_5_and_says_where_it_was():
    r = _run(1.0, 3, 60)
    assert r.returncode == 5 and "finished" not in r.stdout, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: process 1 of 2 stopped: no training step finished in the "), last
    assert "since step 3 (config.stall_timeout_s=1)" in last and "committed in /runs/x/checkpoints" in last, last
    assert 'File "<string>", line 9' in r.stderr  # the main thread's frame: the sleep that never ends


def test_a_beating_loop_and_a_zero_timeout_are_left_alone():
    assert _run(1.0, 40, 0).stdout.strip() == "finished"  # 2 s of steps 0.05 s apart under a 1-s timeout
    r = _run(0, 3, 1.5)
    assert r.returncode == 0 and r.stdout.strip() == "finished", r.stderr


def test_a_negative_stall_timeout_is_a_config_error():
    config = load_config()
    config.stall_timeout_s = -1
    with pytest.raises(ConfigError, match=r"config.stall_timeout_s=-1: expected a number of seconds >= 0"):
        check_config(config)
