"""Dataset adapter for fault-filtered GTZAN (matpac_jax.evaluate.datasets.gtzan), on a tiny official-layout fixture."""

from __future__ import annotations

import pytest
from dataset_fixtures import build, check, load_quietly


@pytest.fixture
def gtzan_root(tmp_path):
    return build(tmp_path, "gtzan")


def test_gtzan_resolves_au_and_keeps_list_order(gtzan_root):
    root, expected = gtzan_root
    task = load_quietly("gtzan", root)
    check(task, "gtzan", expected)
    assert task.files[1].endswith("blues.00029.au") and task.files[3].endswith("blues.00003.wav")
