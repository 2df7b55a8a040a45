"""Dataset adapter for NSynth (matpac_jax.evaluate.datasets.nsynth), on a tiny official-layout fixture."""

from __future__ import annotations

import json

import pytest
from dataset_fixtures import build, check, load_quietly

from matpac_jax.evaluate.datasets import load_task


@pytest.fixture
def nsynth_root(tmp_path):
    return build(tmp_path, "nsynth")


def test_nsynth(nsynth_root):
    root, expected = nsynth_root
    task = load_quietly("nsynth", root)
    check(task, "nsynth", expected)
    assert len(task.class_names) == 11 and task.class_names[9] == "synth_lead"


def test_nsynth_rejects_inconsistent_family(nsynth_root):
    root, _ = nsynth_root
    path = root / "nsynth-valid" / "examples.json"
    examples = json.loads(path.read_text())
    next(iter(examples.values()))["instrument_family_str"] = "brass"
    path.write_text(json.dumps(examples))
    with pytest.raises(ValueError, match="instrument_family_str 'brass'"):
        load_task("nsynth", str(root))
