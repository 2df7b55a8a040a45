"""The S-SONDO teacher pass over a record corpus: embeddings equal Encoder.embed of the cropped / padded clip,
resume skips finished shards, the completeness check lists missing keys, the CLI end to end."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
from helpers import ROOT, assert_close_to_scale
from test_inference import HEADS, published_state_dict

from matpac_jax.audio.io import from_int16, to_int16
from matpac_jax.convert import from_torch
from matpac_jax.data.records import ClipRecord, encode_record, read_shard, shard_name, write_shard
from matpac_jax.distill.corpus import decode_embedding, decode_frames, encode_embedding, load_embeddings
from matpac_jax.distill.teacher_pass import check_complete, fit_clip, fit_length, output_name, teacher_pass
from matpac_jax.inference import Encoder
from matpac_jax.load import load_encoder

SECONDS = 2.0  # a short "10 s" keeps the test fast; the code path is the same


def _corpus(root, lengths=(3.0, 0.7, 2.0, 5.5, 1.2)):
    rng = np.random.default_rng(0)
    waves = {f"clip{i}": (0.2 * rng.standard_normal(int(s * 16_000))).astype(np.float32) for i, s in enumerate(lengths)}
    keys = sorted(waves)
    for s in range(2):
        write_shard(shard_name(root, s, 2), [encode_record(ClipRecord(k, waves[k])) for k in keys[s::2]])
    return waves


def test_teacher_pass_embeddings_resume_and_completeness(tmp_path):
    spec, params, _ = from_torch(published_state_dict(seed=2), heads=HEADS)
    enc_dir = Encoder(spec, params).save(str(tmp_path / "teacher"))
    waves = _corpus(tmp_path / "corpus")
    glob_ = str(tmp_path / "corpus" / "*.arrayrecord")
    out = str(tmp_path / "emb")
    r = teacher_pass(glob_, enc_dir, out, seconds=SECONDS, batch=2, dtype="float32", log=lambda *_: None)
    assert r["clips"] == 5 and r["built"] == 2 and r["missing"] == r["extra"] == r["duplicates"] == []
    keys, emb = load_embeddings(out)
    assert sorted(keys) == sorted(waves) and emb.shape == (5, 320)
    enc = load_encoder(enc_dir)
    for k, e in zip(keys, emb, strict=True):
        clip = fit_length(to_int16(waves[k]), int(SECONDS * 16_000))  # first 2 s, zero-padded when shorter
        assert clip.shape == (32_000,)
        assert_close_to_scale(e, enc.embed(clip)["clip"][0])
    short = fit_length(to_int16(waves["clip1"]), 32_000)
    assert np.all(short[len(waves["clip1"]) :] == 0)
    np.testing.assert_array_equal(short[: len(waves["clip1"])], from_int16(to_int16(waves["clip1"])))

    os.remove(output_name(out, 1, 2))  # as if the pass died before finishing shard 1
    os.remove(output_name(out, 1, 2) + ".json")
    again = teacher_pass(glob_, enc_dir, out, seconds=SECONDS, batch=2, dtype="float32", log=lambda *_: None)
    assert again["built"] == 1 and again["skipped"] == 1 and again["missing"] == []
    keys2, emb2 = load_embeddings(out)
    assert keys2 == keys
    np.testing.assert_array_equal(emb2, emb)

    framed = str(tmp_path / "framed")
    teacher_pass(glob_, enc_dir, framed, seconds=SECONDS, batch=2, dtype="float32", log=lambda *_: None, frames=True)
    records = [r for p in sorted(glob.glob(os.path.join(framed, "teacher-*.arrayrecord"))) for r in read_shard(p)]
    for r in records:
        key, clip = decode_embedding(r)
        frames = decode_frames(r)
        want = enc.embed(fit_length(to_int16(waves[key]), int(SECONDS * 16_000)))["frames"][0]
        assert frames.shape == want.shape and frames.shape[1] == 320
        assert_close_to_scale(frames, want)
        assert_close_to_scale(clip, frames.mean(0))
    assert decode_frames(encode_embedding("k", np.ones(3))) is None

    write_shard(shard_name(tmp_path / "more", 0, 1), [encode_record(ClipRecord("late", np.zeros(100)))])
    inputs = sorted(map(str, (tmp_path / "corpus").glob("*.arrayrecord"))) + [shard_name(tmp_path / "more", 0, 1)]
    assert check_complete(inputs, out)["missing"] == ["late"]


def test_teacher_pass_cli(tmp_path):
    spec, params, _ = from_torch(published_state_dict(seed=2), heads=HEADS)
    enc_dir = Encoder(spec, params).save(str(tmp_path / "teacher"))
    _corpus(tmp_path / "corpus", lengths=(1.0, 2.5))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run([sys.executable, "-m", "matpac_jax.distill.teacher_pass",
                        f"--records={tmp_path / 'corpus' / '*.arrayrecord'}", f"--checkpoint={enc_dir}",
                        f"--output={tmp_path / 'emb'}", f"--seconds={SECONDS}", "--clusters=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher pass: 2 clips" in r.stdout and "clips/s" in r.stdout
    assert "every clip has exactly one embedding" in r.stdout
    assert "k-means: 2 clusters of 2 embeddings" in r.stdout
    keys, emb = load_embeddings(str(tmp_path / "emb"))
    assert emb.dtype == np.float32 and len(keys) == 2  # stored float16 by default, loaded as float32
    consolidated = np.load(tmp_path / "emb" / "embeddings.npy")  # corpus order, the stored dtype
    assert consolidated.dtype == np.float16
    np.testing.assert_array_equal(consolidated.astype(np.float32), emb)
    assert json.loads((tmp_path / "emb" / "keys.json").read_text()) == keys
    clusters = np.load(tmp_path / "emb" / "clusters.npz")
    assert sorted(clusters["assignments"]) == [0, 1] and list(clusters["sizes"]) == [1, 1]


def test_fit_clip_resamples_to_the_teacher_rate():
    t32, t16 = np.arange(64_000) / 32_000, np.arange(20_000) / 16_000
    pcm = to_int16(0.5 * np.sin(2 * np.pi * 1000 * t32))  # 2 s at 32 kHz
    clip = fit_clip(pcm, 32_000, 16_000, 1.25)  # the first 1.25 s at 16 kHz
    assert clip.shape == (20_000,)
    np.testing.assert_allclose(clip[100:-100], 0.5 * np.sin(2 * np.pi * 1000 * t16)[100:-100], atol=2e-3)
    padded = fit_clip(pcm[:16_000], 32_000, 16_000, 1.0)  # 0.5 s of audio, padded to 1 s
    assert padded.shape == (16_000,) and np.abs(padded[8_200:]).max() < 1e-4  # silence (filter ringing aside)
