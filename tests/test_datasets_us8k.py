"""Dataset adapter for UrbanSound8K (matpac_jax.evaluate.datasets.us8k), on a tiny official-layout fixture."""

from __future__ import annotations

import pytest
from dataset_fixtures import build, check, load_quietly


@pytest.fixture
def us8k_root(tmp_path):
    return build(tmp_path, "us8k")


def test_us8k(us8k_root):
    root, expected = us8k_root
    check(load_quietly("us8k", root), "us8k", expected)
