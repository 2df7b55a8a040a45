"""The preparation CLI: folder / AudioSet CSV / path CSV -> ArrayRecord shards + manifest, resumable, deterministic."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from matpac_jax.audio.io import load_audio
from matpac_jax.data.prepare import PrepareError, prepare
from matpac_jax.data.records import decode_record, read_shard, shard_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sine(sr: int, seconds: float, freq: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def _make_folder(root) -> dict[str, str]:
    """Six good files (mixed rates, channels, formats, one in a subfolder) + a corrupt and an empty one."""
    good = {
        "a": ("a.wav", 16000, 1, "PCM_16"),
        "b": ("b.flac", 22050, 2, "PCM_16"),
        "c": ("c.wav", 44100, 1, "FLOAT"),
        "sub/d": ("sub/d.ogg", 16000, 1, "VORBIS"),
        "sub/e": ("sub/e.flac", 8000, 1, "PCM_24"),
        "f": ("f.wav", 48000, 2, "PCM_16"),
    }
    os.makedirs(root / "sub", exist_ok=True)
    paths = {}
    for i, (key, (name, sr, ch, subtype)) in enumerate(sorted(good.items())):
        sf.write(root / name, _sine(sr, 0.3 + 0.05 * i, 220.0 * (i + 1), ch), sr, subtype=subtype)
        paths[key] = str(root / name)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x01garbage-not-a-wav-file" * 10)
    sf.write(root / "empty.wav", np.zeros(0, np.float32), 16000)
    (root / "notes.txt").write_text("not audio")
    return paths


def _records(output, num_shards: int) -> list:
    return [decode_record(r) for i in range(num_shards) for r in read_shard(shard_name(output, i, num_shards))]


def _strip_run(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "run"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, _make_folder(root)


def test_folder_roundtrip_and_skips(folder, tmp_path):
    root, paths = folder
    manifest = prepare(str(root), str(tmp_path / "out"), num_shards=3, workers=1)
    records = _records(tmp_path / "out", 3)
    assert sorted(r.key for r in records) == sorted(paths)  # every good file exactly once
    for r in records:
        expected = load_audio(paths[r.key], 16000)
        assert r.sample_rate == 16000 and r.labels == () and r.path == paths[r.key]
        np.testing.assert_allclose(r.audio, np.clip(expected, -1, 1), atol=1 / 32767)
    reasons = {os.path.basename(s["path"]): s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"corrupt.wav", "empty.wav"}
    assert "empty" in reasons["empty.wav"] and "decode" in reasons["corrupt.wav"]
    assert manifest["total_clips"] == 6 == sum(s["clips"] for s in manifest["shards"])
    assert [s["clips"] for s in manifest["shards"]] == [2, 2, 2]  # round robin over the sorted keys
    assert manifest["parameters"]["num_shards"] == 3 and manifest["parameters"]["codec"] == "pcm16"
    seconds = sum(len(r.audio) for r in records) / 16000
    assert manifest["total_hours"] == pytest.approx(seconds / 3600)
    with open(tmp_path / "out" / "manifest.json") as f:
        assert json.load(f) == manifest


def test_min_seconds_and_flac(folder, tmp_path):
    root, paths = folder
    manifest = prepare(str(root), str(tmp_path / "out"), num_shards=2, codec="flac", min_seconds=0.5)
    keys = {r.key for r in _records(tmp_path / "out", 2)}
    assert keys == {"sub/d", "sub/e"}  # 0.5 s and 0.55 s (sorted keys get 0.3 s + 0.05 s each); the others are shorter
    assert sum("too short" in s["reason"] for s in manifest["skipped"]) == 4


def test_resume_rebuilds_only_missing_shard(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "out"
    first = prepare(str(root), str(out), num_shards=3)
    names = [shard_name(out, i, 3) for i in range(3)]
    for name in names:
        os.utime(name, (1_000_000, 1_000_000))
    os.remove(names[1])
    os.remove(names[1] + ".json")
    second = prepare(str(root), str(out), num_shards=3)
    assert second["run"]["built"] == 1 and second["run"]["already_done"] == 2
    assert [os.stat(n).st_mtime for n in (names[0], names[2])] == [1_000_000, 1_000_000]
    assert os.stat(names[1]).st_mtime > 1_000_000
    assert _strip_run(first) == _strip_run(second)


def test_workers_are_deterministic(folder, tmp_path):
    root, _ = folder
    prepare(str(root), str(tmp_path / "one"), num_shards=2, workers=1)
    prepare(str(root), str(tmp_path / "two"), num_shards=2, workers=2)
    for i in range(2):
        with open(shard_name(tmp_path / "one", i, 2), "rb") as a, open(shard_name(tmp_path / "two", i, 2), "rb") as b:
            assert a.read() == b.read()


def test_audioset_csv(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "--PJHxphWEs_30000.flac", _sine(16000, 0.2, 440), 16000)
    sf.write(audio / "ab_c-D.wav", _sine(32000, 0.2, 330), 32000)
    (tmp_path / "labels.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/t/dd00088,"Gush"\n2,/m/04rlf,"Music"\n'
    )
    (tmp_path / "segments.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'
        'ab_c-D, 1.500, 11.500, "/m/04rlf"\n'
        'missing0000, 0.000, 10.000, "/m/04rlf"\n'
    )
    csv_path, labels = str(tmp_path / "segments.csv"), str(tmp_path / "labels.csv")
    manifest = prepare(csv_path, str(tmp_path / "out"), 1, labels_csv=labels, audio_root=str(audio))
    records = {r.key: r for r in _records(tmp_path / "out", 1)}
    assert sorted(records) == ["--PJHxphWEs_30000", "ab_c-D_1500"]
    # head units: positions in mid order (/m/04rlf, /m/09x0r, /t/dd00088), not the index column
    assert records["--PJHxphWEs_30000"].labels == (1, 2) and records["ab_c-D_1500"].labels == (0,)
    assert manifest["skipped"] == [{"key": "missing0000_0", "path": "", "reason": "file not found"}]
    assert manifest["parameters"]["format"] == "audioset_csv"
    with pytest.raises(PrepareError, match="labels"):
        prepare(csv_path, str(tmp_path / "out2"), 1, audio_root=str(audio))


def test_path_csv_and_duplicates(folder, tmp_path):
    root, paths = folder
    (tmp_path / "list.csv").write_text(
        f"path,labels,key\n{paths['a']},1 2,x\n{paths['b']},3,x\n{paths['c']},,\n{root / 'nope.wav'},,\n"
    )
    manifest = prepare(str(tmp_path / "list.csv"), str(tmp_path / "out"), 2)
    records = {r.key: r for r in _records(tmp_path / "out", 2)}
    assert set(records) == {"x", os.path.splitext(paths["c"])[0]}
    assert records["x"].labels == (1, 2) and records["x"].path == paths["a"]
    assert manifest["duplicates"] == [{"key": "x", "path": paths["b"], "first": paths["a"]}]
    reasons = sorted(s["reason"] for s in manifest["skipped"])
    assert reasons == [f"duplicate key of {paths['a']}", "file not found"]


def test_folder_duplicate_keys(tmp_path):
    root = tmp_path / "dup"
    root.mkdir()
    sf.write(root / "x.flac", _sine(16000, 0.1, 440), 16000)
    sf.write(root / "x.wav", _sine(16000, 0.1, 440), 16000)
    manifest = prepare(str(root), str(tmp_path / "out"), 1)
    assert manifest["total_clips"] == 1
    assert manifest["duplicates"] == [{"key": "x", "path": str(root / "x.wav"), "first": str(root / "x.flac")}]


def test_cli(folder, tmp_path):
    root, _ = folder
    cmd = [sys.executable, "-m", "matpac_jax.data.prepare", f"--input={root}", f"--output={tmp_path / 'out'}"]
    done = subprocess.run([*cmd, "--num-shards=2", "--workers=2"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "prepared 6 clips" in done.stdout and "skipped 2 files" in done.stdout
    assert os.path.isfile(tmp_path / "out" / "manifest.json")
    missing = tmp_path / "does-not-exist"
    cmd = [sys.executable, "-m", "matpac_jax.data.prepare", f"--input={missing}", f"--output={tmp_path / 'o'}"]
    done = subprocess.run([*cmd, "--num-shards=1"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and str(missing) in done.stderr


def test_no_audio_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no usable audio"):
        prepare(str(tmp_path / "empty"), str(tmp_path / "out"), 1)
