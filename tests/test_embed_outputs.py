"""The embed CLI's outputs: every file stays inside --output under a distinct name, unwritable outputs fail before any
audio is encoded, writes are atomic and the printed count is of files actually written. A stand-in encoder (clip =
the clip's length in samples) makes these checks fast and tells which input each output came from."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

import matpac_jax.embed as embed
from matpac_jax.fileio import TMP_MARK


class StandInEncoder:
    """What embed uses of an Encoder; records how many clips it embedded."""

    def __init__(self, classes: int = 0):
        self.sample_rate, self.min_samples, self.frame_rate = 16_000, 400, 6.25
        self.params = {"head": {"bias": np.zeros(classes, np.float32)}} if classes else {}
        self.calls = 0

    def embed(self, wave, sample_rate=16_000):
        self.calls += 1
        n = float(len(wave))
        return {"clip": np.full((1, 4), n, np.float32), "frames": np.full((1, 2, 4), n, np.float32)}

    def tag(self, wave, sample_rate=16_000):
        return np.full((1, self.params["head"]["bias"].shape[0]), 0.5, np.float32)


@pytest.fixture
def encoder(monkeypatch):
    enc = StandInEncoder()
    monkeypatch.setattr(embed, "load_model", lambda path, chunk_batch=16: enc)
    return enc


def _wav(path, samples):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.full(samples, 0.1, np.float32), 16_000)
    return path


def _run(*args):
    return embed.main(["--checkpoint=unused", *map(str, args)])


def _written(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_csv_paths_stay_inside_output_under_distinct_names(tmp_path, encoder, capsys):
    _wav(tmp_path / "clips" / "a.wav", 1000)
    _wav(tmp_path / "a.wav", 2000)
    other = _wav(tmp_path / "other" / "a.wav", 3000)
    _wav(tmp_path / "clips" / "B.wav", 4000)
    _wav(tmp_path / "clips" / "b.wav", 5000)
    rows = ["a.wav", "../a.wav", str(other), "", "a.wav", "B.wav", "b.wav", "./../clips/a.wav"]
    csv = tmp_path / "clips" / "list.csv"
    csv.write_text("\ufeffpath,label\n" + "".join(f"{r},x\n" for r in rows))  # with a spreadsheet's byte-order mark
    out = tmp_path / "out"
    before = set(_written(tmp_path))
    assert _run(f"--input={csv}", f"--output={out}", "--frames") == 0
    captured = capsys.readouterr()
    new = set(_written(tmp_path)) - before
    assert all(p.startswith("out" + os.sep) or p == "out.skipped.json" for p in new), new  # nothing outside
    other_key = str(other).lstrip("/")
    want = {"a.wav": 1000, "a~2.wav": 2000, other_key: 3000, "a~3.wav": 1000, "B.wav": 4000, "b~2.wav": 5000,
            "clips/a.wav": 1000}  # fmt: skip
    assert len(new) == 2 * len(want) + 1
    for key, samples in want.items():
        assert np.load(out / f"{key}.clip.npy", allow_pickle=False)[0] == samples, key
        assert np.load(out / f"{key}.frames.npy", allow_pickle=False).shape == (2, 4)
    assert f"embedded {len(want)} files" in captured.out and "skipped 1" in captured.out
    assert "renamed: ../a.wav -> " in captured.err and "a~2.wav.clip.npy" in captured.err
    assert "renamed: b.wav -> " in captured.err  # differs from B.wav only in case
    assert "line 5 has no path" in captured.err
    skipped = json.loads((tmp_path / "out.skipped.json").read_text())
    assert skipped == [{"path": f"{csv}:5", "reason": "line 5 has no path"}]


@pytest.mark.parametrize(
    "name, key",
    [("../a/x.wav", "a/x.wav"), ("/data/x.wav", "data/x.wav"), ("a/../../b.wav", "b.wav"), ("..", "_"),
     ("./x.wav", "x.wav"), ("a//b/./c.wav", "a/b/c.wav"), ("../../..", "_")],
)  # fmt: skip
def test_output_key_never_leaves_the_folder(name, key):
    assert embed.output_key(name) == key


def test_output_keys_are_distinct_ignoring_case():
    keys, renamed = embed.output_keys(["x.wav", "X.wav", "x~2.wav", "../x.wav", "d/y"])
    assert len({k.casefold() for k in keys}) == len(keys)
    assert keys == ["x.wav", "X~2.wav", "x~2~2.wav", "x~3.wav", "d/y"]
    assert [n for n, _ in renamed] == ["X.wav", "x~2.wav", "../x.wav"]


def test_unwritable_outputs_fail_before_any_audio_is_encoded(tmp_path, encoder, capsys):
    wav = _wav(tmp_path / "a.wav", 1000)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "out" / "a.wav.clip.npy").mkdir(parents=True)
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep.npz.skipped.json").mkdir()
    cases = {
        blocker / "emb": "is a file, not a directory",
        blocker / "emb.npz": "is a file, not a directory",
        blocker: "exists and is not a directory",
        tmp_path / "dir.npz": "exists and is not a file",
        tmp_path / "out": "a.wav.clip.npy exists and is not a file",
        tmp_path / "rep.npz": "rep.npz.skipped.json exists and is not a file",
    }
    for output, fragment in cases.items():
        assert _run(f"--input={wav}", f"--output={output}") == 2, output
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, (output, err)
    assert encoder.calls == 0


def test_writes_are_atomic_and_the_count_is_of_files_written(tmp_path, encoder, monkeypatch, capsys):
    for name, n in (("a.wav", 1000), ("b.wav", 2000), ("c.wav", 3000)):
        _wav(tmp_path / "in" / name, n)
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "b.wav.clip.npy", np.zeros(4, np.float32))  # from an earlier run
    old = (out / "b.wav.clip.npy").read_bytes()
    real_save = np.save

    def save(f, array, *a, **k):  # the disk fills up while writing b.wav's embedding
        if array[0] == 2000:
            f.write(b"\x93NUMPY partial")
            raise OSError("No space left on device")
        real_save(f, array, *a, **k)

    monkeypatch.setattr(np, "save", save)
    assert _run(f"--input={tmp_path / 'in'}", f"--output={out}") == 1
    captured = capsys.readouterr()
    assert "embedded 2 files" in captured.out and "No space left on device" in captured.err
    assert (out / "b.wav.clip.npy").read_bytes() == old  # the earlier file is whole, not half-overwritten
    assert sorted(os.listdir(out)) == ["a.wav.clip.npy", "b.wav.clip.npy", "c.wav.clip.npy"]  # no temporaries
    skipped = json.loads((tmp_path / "out.skipped.json").read_text())
    assert [s["path"] for s in skipped] == ["b.wav"] and "cannot write" in skipped[0]["reason"]


def test_npz_output_is_atomic(tmp_path, encoder, monkeypatch, capsys):
    wav = _wav(tmp_path / "a.wav", 1000)
    out = tmp_path / "e.npz"
    assert _run(f"--input={wav}", f"--output={out}") == 0
    old = out.read_bytes()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".npz"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert _run(f"--input={wav}", f"--output={out}", "--frames") == 1
    captured = capsys.readouterr()
    assert "embedded 0 files" in captured.out and "disk full" in captured.err
    assert out.read_bytes() == old
    assert not [n for n in os.listdir(tmp_path) if TMP_MARK in n]


def test_csv_problems_are_named(tmp_path, encoder, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.wav,x\n")
    assert _run(f"--input={bad}", f"--output={tmp_path / 'o.npz'}") == 2
    assert "expected a CSV with a 'path' column" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("path\n\n,\n \n")
    assert _run(f"--input={empty}", f"--output={tmp_path / 'o.npz'}") == 2
    assert "no audio files" in capsys.readouterr().err
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"path\na.wav\nb\x00.wav\n")
    assert _run(f"--input={nul}", f"--output={tmp_path / 'o'}") == 0
    assert "line 3 has a NUL character in its path" in capsys.readouterr().err
    with pytest.raises(ValueError, match="line 3 has no path"):
        embed.list_inputs(str(empty))


def test_labels_must_match_the_head(tmp_path, monkeypatch, capsys):
    enc = StandInEncoder(classes=3)
    monkeypatch.setattr(embed, "load_model", lambda path, chunk_batch=16: enc)
    wav = _wav(tmp_path / "a.wav", 1000)
    labels = tmp_path / "labels.csv"
    labels.write_text("index,mid,display_name\n0,/m/1,one\n1,/m/2,two\n")
    assert _run(f"--input={wav}", f"--output={tmp_path / 't.npz'}", "--tag", f"--labels={labels}") == 2
    assert "2 labels for a head of 3 classes" in capsys.readouterr().err and enc.calls == 0
