"""The embed CLI on a folder with a bad file, and the HEAR 2021 module (numpy path; the official validator when
hearvalidator and its torch + tensorflow requirements are installed)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT, assert_close_to_scale
from test_inference import HEADS, published_state_dict

import matpac_jax.hear as hear
from matpac_jax.audio.io import load_audio
from matpac_jax.convert import from_torch
from matpac_jax.inference import Encoder
from matpac_jax.load import load_encoder


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    spec, params, _ = from_torch(published_state_dict(seed=7), heads=HEADS)
    return Encoder(spec, params).save(str(tmp_path_factory.mktemp("enc") / "pp"))


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_embed_cli_folder_with_a_bad_file(encoder_dir, tmp_path):
    folder = tmp_path / "audio"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(folder / "a.wav", 0.1 * rng.standard_normal(16_000 * 2), 16_000)
    sf.write(folder / "sub" / "b.flac", 0.1 * rng.standard_normal((44_100 * 3, 2)), 44_100)
    (folder / "broken.mp3").write_bytes(b"not an mp3 at all" * 20)
    out = tmp_path / "emb.npz"
    r = _run("matpac_jax.embed", f"--checkpoint={encoder_dir}", f"--input={folder}", f"--output={out}", "--frames")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "embedded 2 files" in r.stdout and "skipped 1" in r.stdout
    assert "skipped: " in r.stderr and "broken.mp3" in r.stderr
    skipped = json.loads((tmp_path / "emb.npz.skipped.json").read_text())
    assert [os.path.basename(s["path"]) for s in skipped] == ["broken.mp3"]
    data = np.load(out)
    assert list(data["paths"]) == ["a.wav", "sub/b.flac"]
    enc = load_encoder(encoder_dir)
    for i, name in enumerate(data["paths"]):
        want = enc.embed(load_audio(folder / name))
        assert_close_to_scale(data["clip"][i], want["clip"][0])
        assert_close_to_scale(data[f"frames/{i}"], want["frames"][0])
    per_file = tmp_path / "per_file"
    r = _run("matpac_jax.embed", f"--checkpoint={encoder_dir}", f"--input={folder / 'a.wav'}", f"--output={per_file}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close_to_scale(np.load(per_file / "a.wav.clip.npy"), data["clip"][0])


def test_hear_api(encoder_dir):
    model = hear.load_model(encoder_dir)
    assert model.sample_rate == 16_000 and model.scene_embedding_size == model.timestamp_embedding_size == 320
    audio = (0.1 * np.random.default_rng(1).standard_normal((3, 16_000 * 2))).astype(np.float32)
    scene = hear.get_scene_embeddings(audio, model)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    frames = 1 + (32_000 - 400) // 160  # 198 front-end frames -> 13 patches of 16 (padded)
    assert scene.shape == (3, 320) and emb.shape == (3, 13, 320) and ts.shape == (3, 13)
    assert scene.dtype == emb.dtype == np.float32
    np.testing.assert_allclose(ts[0], 160 * np.arange(13) + 87.5)  # centre of frames 16i .. 16i+15, 10 ms hop
    assert frames == 198
    enc = load_encoder(encoder_dir)
    assert_close_to_scale(scene, enc.embed(audio)["clip"])
    assert_close_to_scale(scene, emb.mean(axis=1))
    with pytest.raises(ValueError, match="needs a model path"):
        hear.load_model("")


_VALIDATOR = all(importlib.util.find_spec(m) for m in ("hearvalidator", "torch", "tensorflow"))


@pytest.mark.skipif(not _VALIDATOR, reason="hearvalidator + torch + tensorflow not installed (optional)")
def test_official_hear_validator(encoder_dir):
    r = _run("hearvalidator.validate", "matpac_jax.hear", "--model", encoder_dir, "--device", "cpu")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.strip().endswith("Looks good!")


def test_embed_cli_tags_with_audioset_labels(tmp_path):
    from test_inference import published_state_dict as sd_with

    spec, params, _ = from_torch(sd_with(seed=8, grid_t=62, head_classes=527), heads=HEADS)
    enc_dir = Encoder(spec, params).save(str(tmp_path / "as"))
    mids = [f"/m/{(i * 7919) % 100000:05d}" for i in range(527)]  # CSV order differs from mid order
    rows = "\n".join(f'{i},{mid},"label {i}"' for i, mid in enumerate(mids))
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n" + rows + "\n")
    sf.write(tmp_path / "x.wav", 0.1 * np.random.default_rng(9).standard_normal(16_000 * 3), 16_000)
    out = tmp_path / "t.npz"
    r = _run("matpac_jax.embed", f"--checkpoint={enc_dir}", f"--input={tmp_path / 'x.wav'}", f"--output={out}",
             "--tag", f"--labels={tmp_path / 'labels.csv'}", "--top-k=3")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    probs = load_encoder(enc_dir).tag(load_audio(tmp_path / "x.wav"))[0]
    assert_close_to_scale(np.load(out)["tags"][0], probs)
    by_mid = [f"label {i}" for i in sorted(range(527), key=lambda i: mids[i])]  # head index -> mid-sorted row
    top = np.argsort(-probs)[:3]
    assert r.stdout.splitlines()[0] == "x.wav: " + ", ".join(f"{by_mid[i]} ({probs[i]:.2f})" for i in top)
    spec2, params2, _ = from_torch(published_state_dict(seed=7), heads=HEADS)
    plain = Encoder(spec2, params2).save(str(tmp_path / "plain"))
    r = _run("matpac_jax.embed", f"--checkpoint={plain}", f"--input={tmp_path / 'x.wav'}", f"--output={out}", "--tag")
    assert r.returncode == 2 and "has no AudioSet head" in r.stderr
