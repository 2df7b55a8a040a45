"""bench/end_to_end.py's reductions, checked against figures computed by hand: the steady window of a metrics.jsonl,
the data-wait share and rates over it, the CPU of a process tree, and the presets' flags."""

import json
import os
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))

from end_to_end import parse_args, steady_state, tree_cpu_s  # noqa: E402

# step: (step_time_s, data_wait_s) of a batch-8 run of 6 steps; 1 compiles, 6 waits for the device at the end
STEPS = {1: (9.0, 0.5), 2: (0.20, 0.01), 3: (0.10, 0.00), 4: (0.30, 0.05), 5: (0.20, 0.02), 6: (1.0, 0.0)}


def _metrics_lines(tmp_path) -> list[dict]:
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(
            json.dumps({"step": s, "loss": 1.0, "step_time_s": t, "data_wait_s": w, "samples_per_s": 8 / t}) + "\n"
            for s, (t, w) in STEPS.items()
        )
    )
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_steady_state_keeps_the_steps_between_skip_and_the_last(tmp_path):
    r = steady_state(_metrics_lines(tmp_path), skip=1, last=6)  # steps 2..5
    assert r["steps"] == 4 and r["batch"] == 8
    assert r["median_step_s"] == pytest.approx(0.20)  # of 0.10, 0.20, 0.20, 0.30
    assert r["window_s"] == pytest.approx(0.80)
    assert r["data_wait_share"] == pytest.approx(0.08 / 0.80)  # 10 %: summed waits over summed step times
    assert r["samples_per_s"] == pytest.approx(32 / 0.80)  # 40 samples/s
    assert r["samples_per_s_no_wait"] == pytest.approx(32 / 0.72)


def test_steady_state_refuses_a_window_too_short(tmp_path):
    with pytest.raises(ValueError, match="raise --steps"):
        steady_state(_metrics_lines(tmp_path), skip=4, last=6)


def test_tree_cpu_counts_the_root_and_every_descendant_only():
    procs = {  # pid: (parent, CPU-s): trainer 10 -> workers 11, 12 -> 13; 20 is a sibling; 14's parent is gone
        1: (0, 100.0),
        10: (1, 5.0),
        11: (10, 1.5),
        12: (10, 2.0),
        13: (12, 0.25),
        20: (1, 7.0),
        14: (99, 3.0),
    }
    assert tree_cpu_s(procs, 10) == pytest.approx(8.75)
    assert tree_cpu_s(procs, 12) == pytest.approx(2.25)
    assert tree_cpu_s(procs, 42) == 0.0  # exited


def test_presets_fill_only_the_flags_not_given():
    args = parse_args(["--accelerator", "--clips=100", "--workers=0,8"])
    assert args.clips == 100 and args.workers == [0, 8] and args.config == "configs/pp.py:batch=256"
    args = parse_args(["--cpu-rehearsal"])
    assert args.workers == [0, 2] and args.config == "configs/pp.py:smoke"
    with pytest.raises(SystemExit):
        parse_args(["--cpu-rehearsal", "--skip=99"])  # no steady window left
    with pytest.raises(SystemExit):
        parse_args([])  # a preset must be chosen
