"""A labelled audio folder + CSV prepared as a TFDS ArrayRecord dataset and read back without TensorFlow."""

import csv
import pickle
import subprocess
import sys

import grain
import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds

from matpac_jax.audio.io import from_int16, load_audio
from matpac_jax.data.tfds_audio import main, make_builder, prepare_labelled_folder, read_csv

SR = 16000
# (path, label, split, native rate, format)
FILES = [
    ("dog/a.wav", "dog", "train", 16000, "WAV"),
    ("dog/b.flac", "dog", "train", 22050, "FLAC"),
    ("cat/c.wav", "cat", "train", 44100, "WAV"),
    ("cat/d.flac", "cat", "test", 8000, "FLAC"),
    ("bird/e.wav", "bird", "train", 48000, "WAV"),
    ("bird/f.wav", "bird", "test", 16000, "WAV"),
    ("g.wav", "dog", "train", 32000, "WAV"),
]
CORRUPT = ("bad.wav", "cat", "train")


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for i, (path, _, _, sr, fmt) in enumerate(FILES):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        n = int(sr * (0.2 + 0.05 * i))
        wave = 0.5 * np.sin(2 * np.pi * 440 * (i + 1) * np.arange(n) / sr) + 0.05 * rng.standard_normal(n)
        sf.write(root / path, wave.astype(np.float32), sr, format=fmt)
    (root / CORRUPT[0]).write_bytes(b"RIFF not really a wave file" * 10)
    _write_csv(root / "labels.csv", ["path", "label", "split"], [r[:3] for r in FILES] + [CORRUPT])
    return root


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    sources = prepare_labelled_folder("tiny_labelled", folder, folder / "labels.csv", data_dir)
    return data_dir, sources


def _by_key(source):
    return {bytes(r["key"]).decode(): r for r in (source[i] for i in range(len(source)))}


def test_splits_lengths_audio_and_labels(folder, prepared):
    _, sources = prepared
    assert sorted(sources) == ["test", "train"]
    assert len(sources["train"]) == 5  # 6 train rows, one corrupt
    assert len(sources["test"]) == 2
    info = sources["train"].dataset_info
    names = info.features["label"].names
    assert names == ["bird", "cat", "dog"] == info.metadata["class_names"]
    for split in ("train", "test"):
        records = _by_key(sources[split])
        expected = {r[0]: r for r in FILES if r[2] == split}
        assert set(records) == set(expected)
        for key, rec in records.items():
            ref = load_audio(folder / key, sample_rate=SR)
            assert rec["audio"].dtype == np.int16 and rec["audio"].shape == ref.shape
            np.testing.assert_allclose(from_int16(rec["audio"]), np.clip(ref, -1, 1), atol=0.5 / 32767 + 1e-7)
            assert int(rec["sample_rate"]) == SR and int(rec["fold"]) == -1
            assert names[int(rec["label"])] == expected[key][1]


def test_corrupt_file_skipped_and_reported(prepared):
    _, sources = prepared
    skipped = sources["train"].dataset_info.metadata["skipped"]
    assert [s[0] for s in skipped] == [CORRUPT[0]]
    assert "decode" in skipped[0][1]


def test_grain_reads_the_source(prepared):
    _, sources = prepared
    ds = grain.MapDataset.source(sources["train"]).map(lambda r: (r["audio"].shape[0], int(r["label"])))
    items = list(ds)
    assert len(items) == 5 and all(n > 0 for n, _ in items)
    batches = list(
        grain.MapDataset.source(sources["test"]).map(lambda r: {"label": r["label"], "fold": r["fold"]}).batch(2)
    )
    assert len(batches) == 1 and batches[0]["label"].shape == (2,)
    clone = pickle.loads(pickle.dumps(sources["train"]))  # grain worker processes receive the source pickled
    assert len(clone) == 5 and _by_key(clone).keys() == _by_key(sources["train"]).keys()


def test_fresh_process_reads_without_tensorflow(prepared):
    data_dir, _ = prepared
    code = (
        "import sys, tensorflow_datasets as tfds\n"
        f"s = tfds.data_source('tiny_labelled', data_dir={str(data_dir)!r})\n"
        "m = s['train'].dataset_info.metadata\n"
        "print(len(s['train']), len(s['test']), s['test'][0]['audio'].dtype, m['skipped'][0][0],"
        " 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-5:] == ["5", "2", "int16", CORRUPT[0], "False"]


def test_multi_label_folds_and_float32(folder, tmp_path):
    rows = [(p, lab if i % 2 else f"{lab};loud", "", str(i % 3)) for i, (p, lab, *_) in enumerate(FILES)]
    _write_csv(tmp_path / "multi.csv", ["path", "label", "split", "fold"], rows)
    builder = make_builder(
        "tiny_multi", folder, tmp_path / "multi.csv", tmp_path / "data", audio_dtype="float32", workers=1
    )
    builder.download_and_prepare(file_format="array_record")
    assert builder.skipped == []
    source = tfds.data_source("tiny_multi", data_dir=str(tmp_path / "data"))["train"]
    names = source.dataset_info.metadata["class_names"]
    assert names == ["bird", "cat", "dog", "loud"] and source.dataset_info.metadata["multi_label"]
    records = _by_key(source)
    assert len(records) == len(FILES)
    for i, (path, lab, *_) in enumerate(FILES):
        rec = records[path]
        want = {lab} if i % 2 else {lab, "loud"}
        assert rec["label"].dtype == np.int8 and {names[j] for j in np.flatnonzero(rec["label"])} == want
        assert int(rec["fold"]) == i % 3
        assert rec["audio"].dtype == np.float32
        np.testing.assert_array_equal(rec["audio"], load_audio(folder / path, sample_rate=SR))


def test_clear_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        make_builder("x_missing", folder, tmp_path / "nope.csv", tmp_path)
    _write_csv(tmp_path / "nolabel.csv", ["path", "split"], [["dog/a.wav", "train"]])
    with pytest.raises(ValueError, match=r"nolabel.csv: missing required column\(s\) 'label'"):
        make_builder("x_nolabel", folder, tmp_path / "nolabel.csv", tmp_path)
    _write_csv(tmp_path / "nopath.csv", ["file", "label"], [["dog/a.wav", "dog"]])
    with pytest.raises(ValueError, match="missing required column.*'path'"):
        read_csv(tmp_path / "nopath.csv", folder)
    _write_csv(tmp_path / "fold.csv", ["path", "label", "fold"], [["dog/a.wav", "dog", "one"]])
    with pytest.raises(ValueError, match="fold.csv:2: 'fold' must be an integer"):
        read_csv(tmp_path / "fold.csv", folder)
    with pytest.raises(ValueError, match="TFDS catalogue"):
        make_builder("mnist", folder, folder / "labels.csv", tmp_path)
    _write_csv(tmp_path / "allbad.csv", ["path", "label"], [["bad.wav", "cat"], ["missing.wav", "dog"]])
    builder = make_builder("x_allbad", folder, tmp_path / "allbad.csv", tmp_path / "d")
    with pytest.raises(Exception, match="none of its 2 files could be decoded"):
        builder.download_and_prepare(file_format="array_record")


def test_reuse_and_overwrite(folder, tmp_path):
    _write_csv(tmp_path / "one.csv", ["path", "label"], [FILES[0][:2], FILES[2][:2]])
    first = prepare_labelled_folder("tiny_rebuild", folder, tmp_path / "one.csv", tmp_path / "d")
    assert len(first["train"]) == 2
    _write_csv(tmp_path / "one.csv", ["path", "label"], [r[:2] for r in FILES[:3]])
    assert len(prepare_labelled_folder("tiny_rebuild", folder, tmp_path / "one.csv", tmp_path / "d")["train"]) == 2
    rebuilt = prepare_labelled_folder("tiny_rebuild", folder, tmp_path / "one.csv", tmp_path / "d", overwrite=True)
    assert len(rebuilt["train"]) == 3


def test_command_line_prepares_and_names_bad_input(folder, tmp_path, capsys):
    args = [f"--folder={folder}", f"--data_dir={tmp_path / 'd'}", "--workers=1"]
    assert main(["--name=tiny_cli", f"--csv={folder / 'labels.csv'}", *args]) == 0
    out = capsys.readouterr().out
    assert "prepared tiny_cli/1.0.0" in out and "test 2, train 5 clips; 1 skipped" in out
    assert len(tfds.data_source("tiny_cli", data_dir=str(tmp_path / "d"))["train"]) == 5
    assert main(["--name=tiny_cli2", f"--csv={tmp_path / 'nope.csv'}", *args]) == 2
    assert "labels CSV not found" in capsys.readouterr().err
