"""Dataset adapter for OpenMIC-2018 (matpac_jax.evaluate.datasets.openmic), on a tiny official-layout fixture."""

from __future__ import annotations

import numpy as np
import pytest
from dataset_fixtures import build, check, load_quietly


@pytest.fixture
def openmic_root(tmp_path):
    return build(tmp_path, "openmic")


def test_openmic_labels_and_mask(openmic_root):
    root, expected = openmic_root
    task = load_quietly("openmic", root)
    check(task, "openmic", expected)
    assert set(task.split.tolist()) == {"train", "test"}  # no validation split is defined by the dataset
    assert np.all(task.labels <= task.mask)  # a positive label is always a known label
