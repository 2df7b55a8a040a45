"""Dataset adapter for FSD50K (matpac_jax.evaluate.datasets.fsd50k), on a tiny official-layout fixture."""

from __future__ import annotations

import pytest
from dataset_fixtures import build, check, load_quietly, write

from matpac_jax.evaluate.datasets import load_task


@pytest.fixture
def fsd50k_root(tmp_path):
    return build(tmp_path, "fsd50k")


def test_fsd50k(fsd50k_root):
    root, expected = fsd50k_root
    check(load_quietly("fsd50k", root), "fsd50k", expected)


def test_fsd50k_unknown_label_is_an_error(fsd50k_root):
    root, _ = fsd50k_root
    write(root / "FSD50K.ground_truth" / "eval.csv", "fname,labels,mids\n37199,Kazoo,/m/x\n")
    with pytest.raises(ValueError, match="'Kazoo' is not in vocabulary.csv"):
        load_task("fsd50k", str(root))
