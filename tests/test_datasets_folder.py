"""Dataset adapter for any folder with a labels.csv (matpac_jax.evaluate.datasets.folder), on tiny fixtures."""

from __future__ import annotations

import re

import numpy as np
import pytest
from dataset_fixtures import build, check, load_quietly, touch, write

from matpac_jax.evaluate.datasets import load_task


@pytest.fixture
def folder_root(tmp_path):
    return build(tmp_path, "folder")


def test_folder_single_label_with_split(folder_root):
    root, expected = folder_root
    check(load_quietly("folder", root), "folder", expected)


def test_folder_multilabel_with_folds(tmp_path):
    write(tmp_path / "labels.csv", "labels,path,fold\ndog; cat,x.wav,1\ncat,sub/y.wav,2\nbird;cat;cat,z.wav,1\n")
    files = [touch(tmp_path / "x.wav"), touch(tmp_path / "sub" / "y.wav"), touch(tmp_path / "z.wav")]
    task = load_quietly("folder", tmp_path)
    check(
        task,
        "folder",
        dict(
            files=files,
            labels=np.array([[0, 1, 1], [0, 1, 0], [1, 1, 0]], dtype=np.float32),
            class_names=["bird", "cat", "dog"],
            multilabel=True,
            folds=np.array([1, 2, 1]),
            split=None,
        ),
    )


@pytest.mark.parametrize(
    "header, row, message",
    [
        ("path,split", "a.wav,train", "'labels'"),
        ("labels,split", "dog,train", "'path'"),
        ("path,labels", "a.wav,dog", "exactly one of the columns 'split' or 'fold'"),
        ("path,labels,split,fold", "a.wav,dog,train,1", "exactly one of the columns 'split' or 'fold'"),
        ("path,labels,split", "a.wav,dog,validation", "split values must be one of"),
        ("path,labels,fold", "a.wav,dog,one", "'fold' must be an integer"),
    ],
)
def test_folder_bad_csv_is_a_value_error(tmp_path, header, row, message):
    write(tmp_path / "labels.csv", f"{header}\n{row}\n")
    touch(tmp_path / "a.wav")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_task("folder", str(tmp_path))
