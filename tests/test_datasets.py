"""Dataset adapters for the linear-probe harness (matpac_jax.evaluate.datasets), on tiny official-layout fixtures."""

from __future__ import annotations

import csv
import json
import os
import re
import warnings

import numpy as np
import pytest
import soundfile as sf

from matpac_jax.evaluate.datasets import ADAPTERS, NSYNTH_FAMILIES, Task, load_task, mtt

# ------------------------------------------------------------------------------------------------------------------
# Fixture builders: each writes the official layout into a folder and returns what the adapter must produce.
# ------------------------------------------------------------------------------------------------------------------


def _touch(path, wav: bool = True) -> str:
    """A placeholder audio file: 0.1 s of silence for .wav, empty bytes otherwise (never decoded)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if wav:
        sf.write(path, np.zeros(1600, dtype=np.float32), 16000)
    else:
        with open(path, "wb"):
            pass
    return str(path)


def _write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def _make_esc50(root) -> dict:
    _write(
        root / "meta" / "esc50.csv",
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-100032-A-0.wav,1,0,dog,True,100032,A\n"
        "1-115545-A-1.wav,1,1,rooster,False,115545,A\n"
        "2-109505-A-2.wav,2,2,pig,False,109505,A\n"
        "3-100018-A-0.wav,3,0,dog,True,100018,A\n"
        "5-103415-A-1.wav,5,1,rooster,False,103415,A\n",
    )
    names = ["1-100032-A-0.wav", "1-115545-A-1.wav", "2-109505-A-2.wav", "3-100018-A-0.wav", "5-103415-A-1.wav"]
    files = [_touch(root / "audio" / n) for n in names]
    return dict(
        files=files,
        labels=np.array([0, 1, 2, 0, 1]),
        class_names=["dog", "rooster", "pig"],
        multilabel=False,
        folds=np.array([1, 1, 2, 3, 5]),
        split=None,
        metadata="meta/esc50.csv",
    )


def _make_us8k(root) -> dict:
    _write(
        root / "metadata" / "UrbanSound8K.csv",
        "slice_file_name,fsID,start,end,salience,fold,classID,class\n"
        "100263-2-0-117.wav,100263,58.5,62.5,1,5,2,children_playing\n"
        "100648-1-0-0.wav,100648,4.823402,5.471927,2,10,1,car_horn\n"
        "101729-0-0-1.wav,101729,0.5,4.5,1,10,0,air_conditioner\n"
        "102871-1-0-0.wav,102871,0.0,1.2,1,3,1,car_horn\n",
    )
    rel = [
        ("fold5", "100263-2-0-117.wav"),
        ("fold10", "100648-1-0-0.wav"),
        ("fold10", "101729-0-0-1.wav"),
        ("fold3", "102871-1-0-0.wav"),
    ]
    files = [_touch(root / "audio" / d / n) for d, n in rel]
    return dict(
        files=files,
        labels=np.array([2, 1, 0, 1]),
        class_names=["air_conditioner", "car_horn", "children_playing"],
        multilabel=False,
        folds=np.array([5, 10, 10, 3]),
        split=None,
        metadata="metadata/UrbanSound8K.csv",
    )


def _make_gtzan(root) -> dict:
    _write(root / "train_filtered.txt", "rock/rock.00001.wav\nblues/blues.00029.wav\n")
    _write(root / "valid_filtered.txt", "classical/classical.00002.wav\n\n")
    _write(root / "test_filtered.txt", "blues/blues.00003.wav\nrock/rock.00007.wav\n")
    genres = root / "genres"
    files = [
        _touch(genres / "rock" / "rock.00001.wav"),  # the listed name exists
        _touch(genres / "blues" / "blues.00029.au", wav=False),  # the original archive's .au
        _touch(genres / "classical" / "classical.00002.au", wav=False),
        _touch(genres / "blues" / "blues.00003.wav"),
        _touch(genres / "rock" / "rock.00007.au", wav=False),
    ]
    _touch(genres / "blues" / "blues.00003.au", wav=False)  # the listed name wins over the .au twin
    return dict(
        files=files,
        labels=np.array([2, 0, 1, 0, 2]),
        class_names=["blues", "classical", "rock"],
        multilabel=False,
        folds=None,
        split=np.array(["train", "train", "valid", "test", "test"]),
        metadata="train_filtered.txt",
    )


def _make_nsynth(root) -> dict:
    def example(note: str, family: int) -> dict:
        return {
            "note_str": note,
            "pitch": 50,
            "velocity": 100,
            "instrument_family": family,
            "instrument_family_str": NSYNTH_FAMILIES[family],
            "instrument_source_str": "acoustic",
            "qualities": [0] * 10,
        }

    parts = {
        # JSON order is deliberately unsorted: the adapter sorts note_str within a part.
        "train": ["guitar_acoustic_001-082-050", "bass_synthetic_033-022-050"],
        "valid": ["keyboard_electronic_001-021-127"],
        "test": ["vocal_synthetic_003-088-100", "bass_electronic_018-022-100"],
    }
    family = {"guitar": 3, "bass": 0, "keyboard": 4, "vocal": 10}
    for part, notes in parts.items():
        examples = {n: example(n, family[n.split("_")[0]]) for n in notes}
        _write(root / f"nsynth-{part}" / "examples.json", json.dumps(examples))
        for n in notes:
            _touch(root / f"nsynth-{part}" / "audio" / f"{n}.wav")
    order = [
        ("train", "bass_synthetic_033-022-050"),
        ("train", "guitar_acoustic_001-082-050"),
        ("valid", "keyboard_electronic_001-021-127"),
        ("test", "bass_electronic_018-022-100"),
        ("test", "vocal_synthetic_003-088-100"),
    ]
    return dict(
        files=[str(root / f"nsynth-{p}" / "audio" / f"{n}.wav") for p, n in order],
        labels=np.array([0, 3, 4, 0, 10]),
        class_names=list(NSYNTH_FAMILIES),
        multilabel=False,
        folds=None,
        split=np.array(["train", "train", "valid", "test", "test"]),
        metadata="nsynth-train/examples.json",
    )


def _make_openmic(root) -> dict:
    _write(
        root / "openmic-2018-aggregated-labels.csv",
        "sample_key,instrument,relevance,num_responses\n"
        "000046_3840,bass,0.17251,3\n"
        "000046_3840,accordion,0.85,2\n"
        "000135_483840,banjo,0.5,4\n"
        "014655_42240,bass,1.0,3\n"
        "014655_42240,banjo,0.0,3\n"
        "099999_0,banjo,1.0,3\n",  # in no partition: ignored
    )
    _write(root / "class-map.json", json.dumps({"banjo": 1, "bass": 2, "accordion": 0}))
    _write(root / "partitions" / "split01_train.csv", "000046_3840\n014655_42240\n")
    _write(root / "partitions" / "split01_test.csv", "000135_483840\n")
    keys = ["000046_3840", "014655_42240", "000135_483840"]
    files = [_touch(root / "audio" / k[:3] / f"{k}.ogg", wav=False) for k in keys]
    return dict(
        files=files,
        labels=np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=np.float32),
        mask=np.array([[1, 0, 1], [0, 1, 1], [0, 1, 0]], dtype=np.float32),
        class_names=["accordion", "banjo", "bass"],
        multilabel=True,
        folds=None,
        split=np.array(["train", "train", "test"]),
        metadata="openmic-2018-aggregated-labels.csv",
    )


def _make_fsd50k(root) -> dict:
    gt = root / "FSD50K.ground_truth"
    _write(
        gt / "vocabulary.csv",
        "0,Accelerating_and_revving_and_vroom,/m/07q2z82\n1,Accordion,/m/0mkg\n2,Acoustic_guitar,/m/042v_gx\n",
    )
    _write(
        gt / "dev.csv",
        "fname,labels,mids,split\n"
        '64760,"Accordion,Acoustic_guitar","/m/0mkg,/m/042v_gx",train\n'
        "16399,Accelerating_and_revving_and_vroom,/m/07q2z82,val\n"
        "16400,Accordion,/m/0mkg,train\n",
    )
    _write(gt / "eval.csv", 'fname,labels,mids\n37199,"Acoustic_guitar,Accelerating_and_revving_and_vroom","x,y"\n')
    files = [
        _touch(root / "FSD50K.dev_audio" / "64760.wav"),
        _touch(root / "FSD50K.dev_audio" / "16399.wav"),
        _touch(root / "FSD50K.dev_audio" / "16400.wav"),
        _touch(root / "FSD50K.eval_audio" / "37199.wav"),
    ]
    return dict(
        files=files,
        labels=np.array([[0, 1, 1], [1, 0, 0], [0, 1, 0], [1, 0, 1]], dtype=np.float32),
        class_names=["Accelerating_and_revving_and_vroom", "Accordion", "Acoustic_guitar"],
        multilabel=True,
        folds=None,
        split=np.array(["train", "valid", "train", "test"]),
        metadata="FSD50K.ground_truth/dev.csv",
    )


_MTT_ROWS = [
    # clip_id, guitar, classical, slow, techno, mp3_path
    ("2", 1, 0, 1, 0, "f/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-30-59.mp3"),
    ("6", 1, 1, 0, 0, "0/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-59-88.mp3"),
    ("10", 0, 0, 1, 0, "c/jacob_heringman-black_cow-03-mille_regres-0-29.mp3"),
    ("12", 1, 0, 1, 0, "b/magnatune_compilation-rock-05-last_song-146-175.mp3"),
    ("15", 0, 0, 0, 0, "d/tilopa-out_of_the_blue-01-hana-0-29.mp3"),  # no positive tag: kept
]


def _make_mtt(root) -> dict:
    os.makedirs(root, exist_ok=True)
    with open(root / "annotations_final.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)  # the real file quotes every field
        writer.writerow(["clip_id", "guitar", "classical", "slow", "techno", "mp3_path"])
        writer.writerows(_MTT_ROWS)
    files = [_touch(root / "mp3" / row[-1], wav=False) for row in _MTT_ROWS]
    # counts: guitar 3, classical 1, slow 3, techno 0 -> descending, ties by column order
    return dict(
        files=files,
        labels=np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32),
        class_names=["guitar", "slow", "classical", "techno"],
        multilabel=True,
        folds=None,
        split=np.array(["test", "train", "valid", "train", "test"]),
        metadata="annotations_final.csv",
    )


def _make_folder(root) -> dict:
    absolute = _touch(root.parent / f"{root.name}_elsewhere" / "abs.wav")
    _write(
        root / "labels.csv",
        f"path,labels,split,comment\na/dog1.wav,dog,train,x\nb/cat1.flac,cat,test,y\ndog2.wav,dog,valid,\n{absolute},cat,train,\n",
    )
    files = [_touch(root / "a" / "dog1.wav"), _touch(root / "b" / "cat1.flac", wav=False), _touch(root / "dog2.wav")]
    return dict(
        files=files + [absolute],
        labels=np.array([1, 0, 1, 0]),
        class_names=["cat", "dog"],
        multilabel=False,
        folds=None,
        split=np.array(["train", "test", "valid", "train"]),
        metadata="labels.csv",
    )


_BUILDERS = {
    "esc50": _make_esc50,
    "us8k": _make_us8k,
    "gtzan": _make_gtzan,
    "nsynth": _make_nsynth,
    "openmic": _make_openmic,
    "fsd50k": _make_fsd50k,
    "mtt": _make_mtt,
    "folder": _make_folder,
}


def _build(tmp_path, name):
    root = tmp_path / name
    os.makedirs(root, exist_ok=True)
    return root, _BUILDERS[name](root)


@pytest.fixture
def esc50_root(tmp_path):
    return _build(tmp_path, "esc50")


@pytest.fixture
def us8k_root(tmp_path):
    return _build(tmp_path, "us8k")


@pytest.fixture
def gtzan_root(tmp_path):
    return _build(tmp_path, "gtzan")


@pytest.fixture
def nsynth_root(tmp_path):
    return _build(tmp_path, "nsynth")


@pytest.fixture
def openmic_root(tmp_path):
    return _build(tmp_path, "openmic")


@pytest.fixture
def fsd50k_root(tmp_path):
    return _build(tmp_path, "fsd50k")


@pytest.fixture
def mtt_root(tmp_path):
    return _build(tmp_path, "mtt")


@pytest.fixture
def folder_root(tmp_path):
    return _build(tmp_path, "folder")


def _load_quietly(name: str, root) -> Task:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete fixture must load without a missing-audio warning
        return load_task(name, str(root))


def _check(task: Task, name: str, expected: dict) -> None:
    assert task.name == name
    assert task.files == expected["files"]
    assert all(os.path.isabs(f) and os.path.isfile(f) for f in task.files)
    assert task.class_names == expected["class_names"]
    assert task.multilabel is expected["multilabel"]
    assert task.metric == ("mAP" if expected["multilabel"] else "accuracy")
    if expected["multilabel"]:
        assert task.labels.dtype == np.float32
        assert task.labels.shape == (len(expected["files"]), len(expected["class_names"]))
    else:
        assert task.labels.dtype == np.int64
    np.testing.assert_array_equal(task.labels, expected["labels"])
    if expected["folds"] is None:
        assert task.folds is None
    else:
        assert task.folds.dtype == np.int64
        np.testing.assert_array_equal(task.folds, expected["folds"])
    if expected["split"] is None:
        assert task.split is None
    else:
        assert task.split.dtype.kind == "U"
        np.testing.assert_array_equal(task.split, expected["split"])
    if "mask" in expected:
        assert task.mask.dtype == np.float32
        np.testing.assert_array_equal(task.mask, expected["mask"])
    else:
        assert task.mask is None


# ------------------------------------------------------------------------------------------------------------------
# One test per adapter on its official layout
# ------------------------------------------------------------------------------------------------------------------


def test_esc50(esc50_root):
    root, expected = esc50_root
    _check(_load_quietly("esc50", root), "esc50", expected)


def test_us8k(us8k_root):
    root, expected = us8k_root
    _check(_load_quietly("us8k", root), "us8k", expected)


def test_gtzan_resolves_au_and_keeps_list_order(gtzan_root):
    root, expected = gtzan_root
    task = _load_quietly("gtzan", root)
    _check(task, "gtzan", expected)
    assert task.files[1].endswith("blues.00029.au") and task.files[3].endswith("blues.00003.wav")


def test_nsynth(nsynth_root):
    root, expected = nsynth_root
    task = _load_quietly("nsynth", root)
    _check(task, "nsynth", expected)
    assert len(task.class_names) == 11 and task.class_names[9] == "synth_lead"


def test_nsynth_rejects_inconsistent_family(nsynth_root):
    root, _ = nsynth_root
    path = root / "nsynth-valid" / "examples.json"
    examples = json.loads(path.read_text())
    next(iter(examples.values()))["instrument_family_str"] = "brass"
    path.write_text(json.dumps(examples))
    with pytest.raises(ValueError, match="instrument_family_str 'brass'"):
        load_task("nsynth", str(root))


def test_openmic_labels_and_mask(openmic_root):
    root, expected = openmic_root
    task = _load_quietly("openmic", root)
    _check(task, "openmic", expected)
    assert set(task.split.tolist()) == {"train", "test"}  # no validation split is defined by the dataset
    assert np.all(task.labels <= task.mask)  # a positive label is always a known label


def test_fsd50k(fsd50k_root):
    root, expected = fsd50k_root
    _check(_load_quietly("fsd50k", root), "fsd50k", expected)


def test_fsd50k_unknown_label_is_an_error(fsd50k_root):
    root, _ = fsd50k_root
    _write(root / "FSD50K.ground_truth" / "eval.csv", "fname,labels,mids\n37199,Kazoo,/m/x\n")
    with pytest.raises(ValueError, match="'Kazoo' is not in vocabulary.csv"):
        load_task("fsd50k", str(root))


def test_mtt(mtt_root):
    root, expected = mtt_root
    _check(_load_quietly("mtt", root), "mtt", expected)


def test_mtt_keeps_top_k_by_count_ties_by_column_order(mtt_root):
    root, _ = mtt_root
    task = mtt(str(root), top_k=2)
    assert task.class_names == ["guitar", "slow"]
    np.testing.assert_array_equal(task.labels, [[1, 1], [1, 0], [0, 1], [1, 1], [0, 0]])
    assert len(task.files) == 5  # clips without a positive top-k tag are kept


def test_folder_single_label_with_split(folder_root):
    root, expected = folder_root
    _check(_load_quietly("folder", root), "folder", expected)


def test_folder_multilabel_with_folds(tmp_path):
    _write(tmp_path / "labels.csv", "labels,path,fold\ndog; cat,x.wav,1\ncat,sub/y.wav,2\nbird;cat;cat,z.wav,1\n")
    files = [_touch(tmp_path / "x.wav"), _touch(tmp_path / "sub" / "y.wav"), _touch(tmp_path / "z.wav")]
    task = _load_quietly("folder", tmp_path)
    _check(
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
    _write(tmp_path / "labels.csv", f"{header}\n{row}\n")
    _touch(tmp_path / "a.wav")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_task("folder", str(tmp_path))


# ------------------------------------------------------------------------------------------------------------------
# Behaviour shared by every adapter
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_BUILDERS))
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
    root, _ = _build(tmp_path, name)
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


@pytest.mark.parametrize("name", sorted(_BUILDERS))
def test_missing_audio_is_skipped_with_one_warning(tmp_path, name):
    root, expected = _build(tmp_path, name)
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
    _write(tmp_path / "labels.csv", "path,labels,split\n" + lines)
    _touch(tmp_path / "clip7.wav")
    with pytest.warns(UserWarning, match=r"7 of 8 audio files") as record:
        task = load_task("folder", str(tmp_path))
    message = str(record[0].message)
    assert "clip4.wav" in message and "clip5.wav" not in message and message.endswith(", ...")
    assert task.files == [str(tmp_path / "clip7.wav")] and task.class_names == ["a", "b"]


@pytest.mark.parametrize("name", ["esc50", "openmic"])
def test_all_audio_missing_is_an_error(tmp_path, name):
    root, expected = _build(tmp_path, name)
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
