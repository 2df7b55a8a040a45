"""Dataset adapter for ESC-50 (matpac_jax.evaluate.datasets.esc50), on a tiny official-layout fixture."""

from __future__ import annotations

import pytest
from dataset_fixtures import build, check, load_quietly


@pytest.fixture
def esc50_root(tmp_path):
    return build(tmp_path, "esc50")


def test_esc50(esc50_root):
    root, expected = esc50_root
    check(load_quietly("esc50", root), "esc50", expected)
