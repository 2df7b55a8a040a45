"""Fixture builders for the dataset-adapter tests (tests/test_datasets_*.py): each writes a dataset's official
layout into a folder and returns what the adapter must produce; plus the loader and the Task checker they share."""

from __future__ import annotations

import csv
import json
import os
import warnings

import numpy as np
import soundfile as sf

from matpac_jax.evaluate.datasets import NSYNTH_FAMILIES, Task, load_task


def touch(path, wav: bool = True) -> str:
    """A placeholder audio file: 0.1 s of silence for .wav, empty bytes otherwise (never decoded)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if wav:
        sf.write(path, np.zeros(1600, dtype=np.float32), 16000)
    else:
        with open(path, "wb"):
            pass
    return str(path)


def write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def make_esc50(root) -> dict:
    write(
        root / "meta" / "esc50.csv",
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-100032-A-0.wav,1,0,dog,True,100032,A\n"
        "1-115545-A-1.wav,1,1,rooster,False,115545,A\n"
        "2-109505-A-2.wav,2,2,pig,False,109505,A\n"
        "3-100018-A-0.wav,3,0,dog,True,100018,A\n"
        "5-103415-A-1.wav,5,1,rooster,False,103415,A\n",
    )
    names = ["1-100032-A-0.wav", "1-115545-A-1.wav", "2-109505-A-2.wav", "3-100018-A-0.wav", "5-103415-A-1.wav"]
    files = [touch(root / "audio" / n) for n in names]
    return dict(
        files=files,
        labels=np.array([0, 1, 2, 0, 1]),
        class_names=["dog", "rooster", "pig"],
        multilabel=False,
        folds=np.array([1, 1, 2, 3, 5]),
        split=None,
        metadata="meta/esc50.csv",
    )


def make_us8k(root) -> dict:
    write(
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
    files = [touch(root / "audio" / d / n) for d, n in rel]
    return dict(
        files=files,
        labels=np.array([2, 1, 0, 1]),
        class_names=["air_conditioner", "car_horn", "children_playing"],
        multilabel=False,
        folds=np.array([5, 10, 10, 3]),
        split=None,
        metadata="metadata/UrbanSound8K.csv",
    )


def make_gtzan(root) -> dict:
    write(root / "train_filtered.txt", "rock/rock.00001.wav\nblues/blues.00029.wav\n")
    write(root / "valid_filtered.txt", "classical/classical.00002.wav\n\n")
    write(root / "test_filtered.txt", "blues/blues.00003.wav\nrock/rock.00007.wav\n")
    genres = root / "genres"
    files = [
        touch(genres / "rock" / "rock.00001.wav"),  # the listed name exists
        touch(genres / "blues" / "blues.00029.au", wav=False),  # the original archive's .au
        touch(genres / "classical" / "classical.00002.au", wav=False),
        touch(genres / "blues" / "blues.00003.wav"),
        touch(genres / "rock" / "rock.00007.au", wav=False),
    ]
    touch(genres / "blues" / "blues.00003.au", wav=False)  # the listed name wins over the .au twin
    return dict(
        files=files,
        labels=np.array([2, 0, 1, 0, 2]),
        class_names=["blues", "classical", "rock"],
        multilabel=False,
        folds=None,
        split=np.array(["train", "train", "valid", "test", "test"]),
        metadata="train_filtered.txt",
    )


def make_nsynth(root) -> dict:
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
        write(root / f"nsynth-{part}" / "examples.json", json.dumps(examples))
        for n in notes:
            touch(root / f"nsynth-{part}" / "audio" / f"{n}.wav")
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


def make_openmic(root) -> dict:
    write(
        root / "openmic-2018-aggregated-labels.csv",
        "sample_key,instrument,relevance,num_responses\n"
        "000046_3840,bass,0.17251,3\n"
        "000046_3840,accordion,0.85,2\n"
        "000135_483840,banjo,0.5,4\n"
        "014655_42240,bass,1.0,3\n"
        "014655_42240,banjo,0.0,3\n"
        "099999_0,banjo,1.0,3\n",  # in no partition: ignored
    )
    write(root / "class-map.json", json.dumps({"banjo": 1, "bass": 2, "accordion": 0}))
    write(root / "partitions" / "split01_train.csv", "000046_3840\n014655_42240\n")
    write(root / "partitions" / "split01_test.csv", "000135_483840\n")
    keys = ["000046_3840", "014655_42240", "000135_483840"]
    files = [touch(root / "audio" / k[:3] / f"{k}.ogg", wav=False) for k in keys]
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


def make_fsd50k(root) -> dict:
    gt = root / "FSD50K.ground_truth"
    write(
        gt / "vocabulary.csv",
        "0,Accelerating_and_revving_and_vroom,/m/07q2z82\n1,Accordion,/m/0mkg\n2,Acoustic_guitar,/m/042v_gx\n",
    )
    write(
        gt / "dev.csv",
        "fname,labels,mids,split\n"
        '64760,"Accordion,Acoustic_guitar","/m/0mkg,/m/042v_gx",train\n'
        "16399,Accelerating_and_revving_and_vroom,/m/07q2z82,val\n"
        "16400,Accordion,/m/0mkg,train\n",
    )
    write(gt / "eval.csv", 'fname,labels,mids\n37199,"Acoustic_guitar,Accelerating_and_revving_and_vroom","x,y"\n')
    files = [
        touch(root / "FSD50K.dev_audio" / "64760.wav"),
        touch(root / "FSD50K.dev_audio" / "16399.wav"),
        touch(root / "FSD50K.dev_audio" / "16400.wav"),
        touch(root / "FSD50K.eval_audio" / "37199.wav"),
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


MTT_ROWS = [
    # clip_id, guitar, classical, slow, techno, mp3_path
    ("2", 1, 0, 1, 0, "f/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-30-59.mp3"),
    ("6", 1, 1, 0, 0, "0/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-59-88.mp3"),
    ("10", 0, 0, 1, 0, "c/jacob_heringman-black_cow-03-mille_regres-0-29.mp3"),
    ("12", 1, 0, 1, 0, "b/magnatune_compilation-rock-05-last_song-146-175.mp3"),
    ("15", 0, 0, 0, 0, "d/tilopa-out_of_the_blue-01-hana-0-29.mp3"),  # no positive tag: kept
]


def make_mtt(root) -> dict:
    os.makedirs(root, exist_ok=True)
    with open(root / "annotations_final.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)  # the real file quotes every field
        writer.writerow(["clip_id", "guitar", "classical", "slow", "techno", "mp3_path"])
        writer.writerows(MTT_ROWS)
    files = [touch(root / "mp3" / row[-1], wav=False) for row in MTT_ROWS]
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


def make_folder(root) -> dict:
    absolute = touch(root.parent / f"{root.name}_elsewhere" / "abs.wav")
    write(
        root / "labels.csv",
        f"path,labels,split,comment\na/dog1.wav,dog,train,x\nb/cat1.flac,cat,test,y\ndog2.wav,dog,valid,\n{absolute},cat,train,\n",
    )
    files = [touch(root / "a" / "dog1.wav"), touch(root / "b" / "cat1.flac", wav=False), touch(root / "dog2.wav")]
    return dict(
        files=files + [absolute],
        labels=np.array([1, 0, 1, 0]),
        class_names=["cat", "dog"],
        multilabel=False,
        folds=None,
        split=np.array(["train", "test", "valid", "train"]),
        metadata="labels.csv",
    )


BUILDERS = {
    "esc50": make_esc50,
    "us8k": make_us8k,
    "gtzan": make_gtzan,
    "nsynth": make_nsynth,
    "openmic": make_openmic,
    "fsd50k": make_fsd50k,
    "mtt": make_mtt,
    "folder": make_folder,
}


def build(tmp_path, name):
    root = tmp_path / name
    os.makedirs(root, exist_ok=True)
    return root, BUILDERS[name](root)


def load_quietly(name: str, root) -> Task:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete fixture must load without a missing-audio warning
        return load_task(name, str(root))


def check(task: Task, name: str, expected: dict) -> None:
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
