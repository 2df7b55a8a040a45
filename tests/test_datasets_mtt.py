"""Dataset adapter for MagnaTagATune top-50 (matpac_jax.evaluate.datasets.mtt), on a tiny official-layout fixture."""

from __future__ import annotations

import numpy as np
import pytest
from dataset_fixtures import build, check, load_quietly

from matpac_jax.evaluate.datasets import mtt


@pytest.fixture
def mtt_root(tmp_path):
    return build(tmp_path, "mtt")


def test_mtt(mtt_root):
    root, expected = mtt_root
    check(load_quietly("mtt", root), "mtt", expected)


def test_mtt_keeps_top_k_by_count_ties_by_column_order(mtt_root):
    root, _ = mtt_root
    task = mtt(str(root), top_k=2)
    assert task.class_names == ["guitar", "slow"]
    np.testing.assert_array_equal(task.labels, [[1, 1], [1, 0], [0, 1], [1, 1], [0, 0]])
    assert len(task.files) == 5  # clips without a positive top-k tag are kept
