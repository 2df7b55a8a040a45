"""Behaviour shared by every dataset adapter (matpac_jax.evaluate.datasets): missing metadata / audio, registry."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from dataset_fixtures import BUILDERS, build, touch, write

from matpac_jax.evaluate.datasets import ADAPTERS, load_task


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_empty_folder_names_the_expected_metadata_path(tmp_path, name):
    expected = {
        "esc50": "meta/esc50.csv",
        "us8k": "metadata/UrbanSound8K.csv",
        "gtzan": "train_filtered.txt",
        "nsynth": "nsynth-train/examples.json",
        "openmic": "openmic-2018-aggregated-labels.csv",
        "fsd50k": "FSD50K.ground_truth/dev.csv",
        "mtt": "annotations_final.csv",
        "folder": "labels.csv",
    }[name]
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(str(tmp_path), *expected.split("/")))):
        load_task(name, str(tmp_path))


@pytest.mark.parametrize(
    "name, remove",
    [
        ("gtzan", "test_filtered.txt"),
        ("nsynth", "nsynth-test/examples.json"),
        ("openmic", "class-map.json"),
        ("openmic", "partitions/split01_test.csv"),
        ("fsd50k", "FSD50K.ground_truth/vocabulary.csv"),
        ("fsd50k", "FSD50K.ground_truth/eval.csv"),
    ],
)
def test_each_missing_metadata_file_is_named(tmp_path, name, remove):
    root, _ = build(tmp_path, name)
    missing = os.path.join(str(root), *remove.split("/"))
    os.remove(missing)
    with pytest.raises(FileNotFoundError) as info:
        load_task(name, str(root))
    message = str(info.value)
    assert missing in message and "layout" in message


def test_missing_metadata_message_describes_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_task("esc50", str(tmp_path))
    assert str(info.value) == (
        f"ESC-50: expected the metadata file {tmp_path / 'meta' / 'esc50.csv'} "
        "(the ESC-50 repository layout: meta/esc50.csv and audio/*.wav)"
    )


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_missing_audio_is_skipped_with_one_warning(tmp_path, name):
    root, expected = build(tmp_path, name)
    gone = [0, 2]
    for i in gone:
        os.remove(expected["files"][i])
    with pytest.warns(UserWarning) as record:
        task = load_task(name, str(root))
    assert len(record) == 1
    message = str(record[0].message)
    assert f"2 of {len(expected['files'])} audio files" in message
    assert os.path.basename(expected["files"][0]) in message
    keep = [i for i in range(len(expected["files"])) if i not in gone]
    assert task.files == [expected["files"][i] for i in keep]
    assert task.class_names == expected["class_names"]  # class ids come from the metadata, not from the audio
    np.testing.assert_array_equal(task.labels, expected["labels"][keep])
    for key in ("folds", "split", "mask"):
        if expected.get(key) is not None:
            np.testing.assert_array_equal(getattr(task, key), expected[key][keep])


def test_missing_audio_warning_names_at_most_five(tmp_path):
    lines = "".join(f"clip{i}.wav,{'ab'[i % 2]},train\n" for i in range(8))
    write(tmp_path / "labels.csv", "path,labels,split\n" + lines)
    touch(tmp_path / "clip7.wav")
    with pytest.warns(UserWarning, match=r"7 of 8 audio files") as record:
        task = load_task("folder", str(tmp_path))
    message = str(record[0].message)
    assert "clip4.wav" in message and "clip5.wav" not in message and message.endswith(", ...")
    assert task.files == [str(tmp_path / "clip7.wav")] and task.class_names == ["a", "b"]


@pytest.mark.parametrize("name", ["esc50", "openmic"])
def test_all_audio_missing_is_an_error(tmp_path, name):
    root, expected = build(tmp_path, name)
    for f in expected["files"]:
        os.remove(f)
    with pytest.raises(FileNotFoundError, match="none of the"):
        load_task(name, str(root))


def test_unknown_adapter_lists_the_available_ones(tmp_path):
    with pytest.raises(ValueError) as info:
        load_task("audioset", str(tmp_path))
    for name in ADAPTERS:
        assert name in str(info.value)


def test_registry_covers_the_protocol():
    assert set(ADAPTERS) == {"esc50", "us8k", "gtzan", "nsynth", "openmic", "fsd50k", "mtt", "folder"}
    assert all(callable(adapter) for adapter in ADAPTERS.values())
