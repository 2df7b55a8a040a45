"""Hostile inputs and faults in data preparation and the input pipeline: resharding into one folder, dying workers,
decompression bombs, undecodable file names, malformed CSVs and settings, unreadable shards, leftovers of a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from matpac_jax.audio import io as audio_io
from matpac_jax.audio.io import AudioError, load_audio, resample
from matpac_jax.data import shard_writer as prep  # where the shards are decoded and written
from matpac_jax.data.pipeline import expand_files, pretrain_dataset
from matpac_jax.data.prepare import PrepareError, main, prepare
from matpac_jax.data.records import (
    ClipRecord,
    audioset_key,
    check_shard,
    decode_record,
    encode_record,
    read_shard,
    shard_name,
    write_shard,
)
from matpac_jax.data.shard_writer import KILL_SHARD_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _noise(n: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (n, channels)).astype(np.float32)
    return x[:, 0] if channels == 1 else x


def _corpus(root, count: int = 6) -> list[str]:
    """``count`` short 16-kHz clips ``a0.wav``.. in ``root``; returns their keys."""
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        sf.write(os.path.join(root, f"a{i}.wav"), _noise(800 + 100 * i, i), 16000)
    return [f"a{i}" for i in range(count)]


def _keys(output, num_shards: int) -> list[str]:
    shards = [shard_name(output, i, num_shards) for i in range(num_shards)]
    return sorted(decode_record(r).key for shard in shards for r in read_shard(shard))


def _reasons(manifest: dict) -> dict[str, str]:
    return {s["key"]: s["reason"] for s in manifest["skipped"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return str(root), _corpus(root)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# --- 7. Resharding into one output; the trainer reads the manifest's shards.


def test_resharding_into_the_same_output_is_refused_then_replaced(corpus, tmp_path, capsys):
    root, keys = corpus
    out = str(tmp_path / "out")
    prepare(root, out, num_shards=3)
    before = sorted(os.listdir(out))
    capsys.readouterr()
    code = main([f"--input={root}", f"--output={out}", "--num-shards=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "clips-00000-of-00003.arrayrecord" in err and "--replace" in err and "new or empty --output" in err
    assert sorted(os.listdir(out)) == before  # refused before anything was built or removed
    manifest = prepare(root, out, num_shards=2, replace=True)
    names = sorted(os.listdir(out))
    assert [n for n in names if n.endswith(".arrayrecord")] == [shard_name("", i, 2) for i in range(2)]
    assert not [n for n in names if "of-00003" in n]  # the old sidecars went too
    assert manifest["total_clips"] == len(keys) and _keys(out, 2) == sorted(keys)  # every clip once
    assert len(manifest["run"]["replaced"]) == 3


def test_trainer_reads_exactly_the_manifest_shards(corpus, tmp_path):
    root, keys = corpus
    out = tmp_path / "out"
    prepare(root, str(out), num_shards=2)
    listed = [shard_name(out, i, 2) for i in range(2)]
    stray = out / "stray.arrayrecord"  # another shard in the folder: a glob reads it, the manifest does not
    write_shard(stray, [encode_record(ClipRecord("stray", _noise(900)))])
    assert str(stray) in expand_files(str(out / "*.arrayrecord"))
    assert expand_files(str(out)) == expand_files(str(out / "manifest.json")) == listed
    it = iter(pretrain_dataset(str(out), global_batch=2, crop_samples=400, seed=0, process_index=0, process_count=1))
    assert next(it)["audio"].shape == (2, 400)
    write_shard(listed[1], [encode_record(ClipRecord("x", _noise(900)))])  # replaced behind the manifest's back
    with pytest.raises(ValueError, match=r"clips-00001-of-00002.arrayrecord holds 1 records, its manifest says 3"):
        expand_files(str(out))
    os.remove(listed[1])
    with pytest.raises(ValueError, match=r"clips-00001-of-00002.arrayrecord, listed in the manifest .* is missing"):
        expand_files(str(out))
    with pytest.raises(ValueError, match="folder without a manifest.json"):
        expand_files(str(tmp_path))


# --- 8. A worker that dies fails its shard (named), never hangs; grain workers do not outlive the trainer.


def test_killed_worker_fails_its_shard_and_a_rerun_resumes(corpus, tmp_path, monkeypatch):
    root, keys = corpus
    out = str(tmp_path / "out")
    monkeypatch.setenv(KILL_SHARD_ENV, "1")  # the worker building shard 1 SIGKILLs itself mid-write
    with pytest.raises(PrepareError, match=r"clips-00001-of-00002.arrayrecord: .* killed by SIGKILL") as e:
        prepare(root, out, num_shards=2, workers=2)
    assert "the 1 finished shards are kept: run the same command again" in str(e.value)
    names = os.listdir(out)
    assert shard_name("", 0, 2) in names and shard_name("", 1, 2) not in names and "manifest.json" not in names
    assert [n for n in names if ".tmp-" in n]  # what the kill left behind
    monkeypatch.delenv(KILL_SHARD_ENV)
    manifest = prepare(root, out, num_shards=2, workers=1)
    assert (manifest["run"]["built"], manifest["run"]["already_done"]) == (1, 1)
    assert len(manifest["run"]["removed_temporaries"]) == 1
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert _keys(out, 2) == sorted(keys)


_TRAINER = """
import sys, time
from absl import flags
from matpac_jax.data.pipeline import pretrain_dataset
flags.FLAGS.mark_as_parsed()  # as absl's app.run does in the trainer: grain's worker prefetch reads absl flags
ds = pretrain_dataset(sys.argv[1], global_batch=2, crop_samples=400, seed=0, process_index=0, process_count=1,
                      workers=1)
it = iter(ds)  # held: a dropped iterator stops its workers
next(it)
print("ready", flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds worker processes through /proc")
def test_grain_workers_exit_when_the_trainer_is_killed(tmp_path):
    write_shard(tmp_path / "s.arrayrecord", [encode_record(ClipRecord(f"k{i}", _noise(1000, i))) for i in range(8)])
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, str(tmp_path / "s.arrayrecord")], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert trainer.stdout.readline().strip() == "ready"
        workers = _children(trainer.pid)  # the grain worker and multiprocessing's resource tracker
        assert any("spawn_main" in open(f"/proc/{p}/cmdline").read() for p in workers)
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 120  # a bound for a loaded machine, not a speed requirement
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [p for p in workers if _alive(p)]
    for pid in survivors:  # do not leave them behind when the check fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors


# --- 9. Decompression bombs: bounded rates and lengths, and one bad file never stops the run.


def _wav_declaring(path, rate: int, frames: int = 20000) -> None:
    """A 16-bit mono WAV whose header declares ``rate`` Hz (written at 16 kHz, then the header patched)."""
    sf.write(path, np.zeros(frames, np.int16), 16000, subtype="PCM_16")
    data = bytearray(open(path, "rb").read())
    data[24:28] = rate.to_bytes(4, "little")  # fmt chunk: sample rate, then byte rate
    data[28:32] = (2 * rate).to_bytes(4, "little")
    open(path, "wb").write(bytes(data))


def test_one_hertz_header_is_refused_by_name(tmp_path):
    bomb = tmp_path / "bomb.wav"
    _wav_declaring(bomb, 1)  # 40 kB declaring 20000 s: 320 M samples at 16 kHz
    assert sf.info(str(bomb)).samplerate == 1
    with pytest.raises(AudioError, match="unusable sample rate 1 Hz") as e:
        load_audio(bomb)
    assert e.value.path == str(bomb)
    _wav_declaring(tmp_path / "fast.wav", 2_000_000)
    with pytest.raises(AudioError, match="unusable sample rate 2000000 Hz"):
        load_audio(tmp_path / "fast.wav")


def test_length_bound_is_checked_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "long.flac"
    sf.write(path, _noise(16000), 16000)

    def no_read(*args, **kwargs):
        raise AssertionError("decoded a file its header already shows too long")

    monkeypatch.setattr(sf.SoundFile, "read", no_read)
    with pytest.raises(AudioError, match=r"too long: the header declares 1.0 s, more than the maximum of 0.5 s"):
        load_audio(path, max_seconds=0.5)


def test_block_decoding_equals_one_shot(tmp_path, monkeypatch):
    x = _noise(21000, 3, channels=3)
    sf.write(tmp_path / "m.wav", x, 44100, subtype="FLOAT")
    monkeypatch.setattr(audio_io, "_BLOCK_VALUES", 4096)  # 4096-frame blocks: 6 of them
    y = load_audio(tmp_path / "m.wav")
    np.testing.assert_array_equal(y, resample(x.mean(axis=1, dtype=np.float32), 44100, 16000))


def test_unexpected_error_on_one_file_skips_only_that_file(corpus, tmp_path, monkeypatch):
    root, keys = corpus
    real = prep.load_audio

    def exhausting(path, *args, **kwargs):
        if path.endswith("a2.wav"):
            raise MemoryError("cannot allocate 1.2 GiB")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prep, "load_audio", exhausting)
    manifest = prepare(root, str(tmp_path / "out"), num_shards=2)
    assert _reasons(manifest) == {"a2": "MemoryError: cannot allocate 1.2 GiB"}
    assert _keys(tmp_path / "out", 2) == sorted(set(keys) - {"a2"})


def test_bomb_in_a_folder_is_skipped_by_name(tmp_path):
    root = tmp_path / "in"
    _corpus(root, 2)
    _wav_declaring(root / "bomb.wav", 1)
    sf.write(root / "hour.wav", _noise(3 * 16000), 16000)
    manifest = prepare(str(root), str(tmp_path / "out"), num_shards=1, max_seconds=2.0)
    reasons = _reasons(manifest)
    assert set(reasons) == {"bomb", "hour"} and "sample rate 1 Hz" in reasons["bomb"] and "too long" in reasons["hour"]
    assert manifest["total_clips"] == 2 and manifest["parameters"]["max_seconds"] == 2.0


# --- 11. Clear errors (exit 2) or named skips instead of tracebacks.


def test_file_name_that_is_not_utf8(tmp_path):
    root = tmp_path / "in"
    _corpus(root, 1)
    bad = os.path.join(os.fsencode(root), b"caf\xe9.wav")  # Latin-1 bytes: not valid UTF-8
    sf.write(tmp_path / "x.wav", _noise(900), 16000)
    os.rename(tmp_path / "x.wav", bad)
    assert load_audio(bad).shape == (900,) and load_audio(os.fsdecode(bad)).shape == (900,)
    manifest = prepare(str(root), str(tmp_path / "out"), num_shards=1)
    assert manifest["total_clips"] == 2 and _keys(tmp_path / "out", 1) == ["a0", "caf\\xe9"]
    with open(tmp_path / "out" / "manifest.json", encoding="utf-8") as f:
        assert json.load(f)["total_clips"] == 2
    paths = {decode_record(r).path for r in read_shard(shard_name(tmp_path / "out", 0, 1))}
    assert os.path.join(str(root), "caf\\xe9.wav") in paths


def test_audioset_rows_with_a_bad_start_are_skipped_naming_the_line(tmp_path):
    sf.write(tmp_path / "good_1000.wav", _noise(900), 16000)
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,A\n")
    (tmp_path / "seg.csv").write_text(
        '# header\ngood, 1.000, 11.0, "/m/a"\nworse, abc, 10.0, "/m/a"\nnanny, nan, 10.0, "/m/a"\nshort, 1.0\n'
    )
    manifest = prepare(str(tmp_path / "seg.csv"), str(tmp_path / "out"), 1, labels_csv=str(tmp_path / "labels.csv"))
    reasons = _reasons(manifest)
    assert manifest["total_clips"] == 1
    assert reasons["worse"] == "seg.csv line 3: start_seconds 'abc' is not a finite number of seconds"
    assert reasons["nanny"].startswith("seg.csv line 4: start_seconds 'nan'")
    assert reasons["short"].startswith("seg.csv line 5: expected YTID, start_seconds")
    with pytest.raises(ValueError, match="'inf' is not a finite number"):
        audioset_key("x", "inf")


def _main_error(capsys, *args) -> str:
    """Run the CLI in-process; assert exit 2 with a one-line message, which is returned."""
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unusable_inputs_exit_2_with_what_to_do(corpus, tmp_path, capsys):
    root, _ = corpus
    out = f"--output={tmp_path / 'out'}"
    (tmp_path / "latin1.csv").write_bytes(b"path\ncaf\xe9.wav\n")
    assert "not UTF-8 text" in _main_error(capsys, f"--input={tmp_path / 'latin1.csv'}", out, "--num-shards=1")
    err = _main_error(capsys, f"--input={os.path.join(root, 'a0.wav')}", out, "--num-shards=1")
    assert "is an audio file: give the folder" in err
    (tmp_path / "huge.csv").write_text("path\na0.wav\n" + "x" * 200_000 + "\n")  # beyond csv's field size limit
    err = _main_error(capsys, f"--input={tmp_path / 'huge.csv'}", out, "--num-shards=1")
    assert "line 3: not a readable CSV row" in err
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,A\nseven,/m/b,B\n")
    (tmp_path / "seg.csv").write_text('x, 0.0, 10.0, "/m/a"\n')
    labels = f"--labels={tmp_path / 'labels.csv'}"
    err = _main_error(capsys, f"--input={tmp_path / 'seg.csv'}", out, "--num-shards=1", labels)
    assert "labels.csv, line 3: expected a mid and a non-negative integer index" in err and "'seven'" in err
    (tmp_path / "file").write_text("")
    err = _main_error(capsys, f"--input={root}", f"--output={tmp_path / 'file'}", "--num-shards=1")
    assert "exists and is not a directory" in err


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--min-seconds=nan", "--min-seconds=nan (expected a finite number >= 0)"),
        ("--min-seconds=inf", "--min-seconds=inf"),
        ("--max-seconds=0", "--max-seconds=0.0 (expected a finite number > 0)"),
        ("--sample-rate=1", "--sample-rate=1 (expected an integer from 1000 to 768000)"),
        ("--num-shards=100000", "--num-shards=100000 (expected 1 to 99999)"),
    ],
)
def test_bad_settings_exit_2(corpus, tmp_path, capsys, flag, expected):
    root, _ = corpus
    args = [f"--input={root}", f"--output={tmp_path / 'out'}", "--num-shards=1", flag]
    assert expected in _main_error(capsys, *args)
    assert not os.path.exists(tmp_path / "out")


def test_unreadable_shards_are_named_before_training(corpus, tmp_path):
    good = tmp_path / "good.arrayrecord"
    write_shard(good, [encode_record(ClipRecord(f"k{i}", _noise(3000, i))) for i in range(20)])
    data = good.read_bytes()
    (tmp_path / "cut.arrayrecord").write_bytes(data[: len(data) // 2])
    (tmp_path / "clip.arrayrecord").write_bytes(open(os.path.join(corpus[0], "a0.wav"), "rb").read())
    assert check_shard(good) == 20
    for name in ("cut.arrayrecord", "clip.arrayrecord"):
        pattern = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf"config.data.train: .*{name}: not a readable ArrayRecord shard"):
            pretrain_dataset([str(good), pattern], global_batch=2, crop_samples=400, seed=0, process_index=0,
                             process_count=1)  # fmt: skip


# --- 12. Never an empty record; temporaries of a killed run are removed, a live writer's are kept.


def test_clip_that_resamples_to_nothing_is_skipped(tmp_path):
    root = tmp_path / "in"
    _corpus(root, 1)
    sf.write(root / "one.wav", np.array([0.25], np.float32), 44100)  # 1 sample at 44.1 kHz: 0 samples at 16 kHz
    with pytest.raises(AudioError, match=r"too short: 0 samples at 16000 Hz \(from 44100 Hz\), need at least 1"):
        load_audio(root / "one.wav")
    manifest = prepare(str(root), str(tmp_path / "out"), num_shards=1)
    assert "too short" in _reasons(manifest)["one"] and _keys(tmp_path / "out", 1) == ["a0"]
    assert all(decode_record(r).audio.size for r in read_shard(shard_name(tmp_path / "out", 0, 1)))


def test_stale_temporaries_are_removed_and_truncated_shards_rebuilt(corpus, tmp_path):
    root, keys = corpus
    out = tmp_path / "out"
    prepare(root, str(out), num_shards=2)
    stale = out / f"{shard_name('', 0, 2)}.tmp-{_dead_pid()}-0123abcd"
    live = out / f"{shard_name('', 1, 2)}.tmp-{os.getpid()}-0123abcd"
    stale.write_bytes(b"partial")
    live.write_bytes(b"being written")
    first = shard_name(out, 0, 2)
    data = open(first, "rb").read()
    open(first, "wb").write(data[: len(data) // 2])  # truncated, its sidecar intact
    manifest = prepare(root, str(out), num_shards=2)
    assert manifest["run"]["removed_temporaries"] == [stale.name]
    assert not stale.exists() and live.exists()
    assert (manifest["run"]["built"], manifest["run"]["already_done"]) == (1, 1)
    assert check_shard(first) == manifest["shards"][0]["clips"] and _keys(out, 2) == sorted(keys)
