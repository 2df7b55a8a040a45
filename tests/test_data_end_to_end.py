"""A folder of mixed real-world-style audio -> preparation CLI -> shards + manifest -> re-run (no-op) -> pretraining.

Everything runs as a user runs it: two CLI subprocesses and the main job as a subprocess.
"""

import json
import os
import subprocess
import sys

import numpy as np
import soundfile as sf
from helpers import ROOT

from matpac_jax.data.records import decode_record, read_shard, shard_name

GOOD = {  # key: (file, sample rate, channels, soundfile format / subtype)
    "a_wav16k": ("a_wav16k.wav", 16000, 1, {"subtype": "PCM_16"}),
    "b_flac44k_stereo": ("b_flac44k_stereo.flac", 44100, 2, {}),
    "c_ogg22k": ("c_ogg22k.ogg", 22050, 1, {"subtype": "VORBIS"}),
    "d_mp3_48k_stereo": ("d_mp3_48k_stereo.mp3", 48000, 2, {"format": "MP3"}),
    "sub/e_wav8k_24bit": ("sub/e_wav8k_24bit.wav", 8000, 1, {"subtype": "PCM_24"}),
    "sub/f_float32": ("sub/f_float32.wav", 32000, 3, {"subtype": "FLOAT"}),
}
BAD = {"truncated.wav": "truncated", "zero_length.flac": "decode", "not_audio.mp3": "decode"}


def _make_folder(root) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(root / "sub")
    for i, (name, sr, channels, kw) in enumerate(GOOD.values()):
        t = np.arange(int(2.0 * sr)) / sr
        tone = 0.3 * np.sin(2 * np.pi * 200 * (i + 1) * t) + 0.02 * rng.standard_normal(t.size)
        sf.write(root / name, np.stack([tone * (c + 1) / channels for c in range(channels)], 1), sr, **kw)
    sf.write(root / "whole.wav", np.zeros(32000, np.float32) + 0.1, 16000)
    data = (root / "whole.wav").read_bytes()
    (root / "truncated.wav").write_bytes(data[: len(data) // 3])  # an interrupted copy
    (root / "whole.wav").unlink()
    (root / "zero_length.flac").write_bytes(b"")
    (root / "not_audio.mp3").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)  # an image, misnamed
    (root / "README.txt").write_text("not audio, and not named like audio: not considered")


def _run(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_mixed_folder_to_shards_to_pretraining(tmp_path):
    corpus, out, workdir = tmp_path / "corpus", tmp_path / "shards", tmp_path / "run"
    corpus.mkdir()
    _make_folder(corpus)
    prepare = ("matpac_jax.data.prepare", f"--input={corpus}", f"--output={out}", "--num-shards=2", "--workers=2")

    r = _run(*prepare)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prepared 6 clips" in r.stdout and "skipped 3 files" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_clips"] == 6 and [s["clips"] for s in manifest["shards"]] == [3, 3]
    assert manifest["total_hours"] * 3600 == sum(s["seconds"] for s in manifest["shards"])
    assert abs(manifest["total_hours"] * 3600 - 12.0) < 0.01  # six 2-s clips
    skipped = {os.path.basename(s["path"]): s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(BAD)
    for name, word in BAD.items():
        assert word in skipped[name], (name, skipped[name])
    records = [decode_record(x) for i in range(2) for x in read_shard(shard_name(out, i, 2))]
    assert sorted(r.key for r in records) == sorted(GOOD)
    assert all(r.sample_rate == 16000 and abs(r.audio.size - 32000) <= 1 for r in records)

    shards = sorted(p for p in os.listdir(out) if p.endswith(".arrayrecord"))
    stamps = {p: os.stat(out / p).st_mtime_ns for p in shards}
    again = _run(*prepare)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(0 built, 2 already done)" in again.stdout
    assert {p: os.stat(out / p).st_mtime_ns for p in shards} == stamps
    rerun = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in rerun.items() if k != "run"} == {k: v for k, v in manifest.items() if k != "run"}

    train = _run(
        "matpac_jax.main",
        "--config=configs/pp.py:smoke",
        f"--workdir={workdir}",
        "--config.data.source=records",
        f"--config.data.train={out}/*.arrayrecord",
        "--config.data.workers=1",
        "--config.probe.enabled=False",
        "--config.total_steps=3",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in metrics)
