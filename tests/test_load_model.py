"""One model interface (``matpac_jax.load.load_model``): a distilled student is used by the probe, ``embed`` and
``hear`` exactly like an encoder, and the saved-model format reads back every kind it writes."""

import json
import types

import jax
import numpy as np
import pytest
from helpers import assert_close_to_scale, load_config, write_tone_folder

import matpac_jax.embed as embed
import matpac_jax.hear as hear
from matpac_jax import probe
from matpac_jax.audio.io import load_audio
from matpac_jax.load import load_encoder, load_model
from matpac_jax.models.student import Student, save_student
from matpac_jax.saved_model import MODEL_FILE

RATE = 32_000  # the students' front-end


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A MobileNetV3 (width 0.1) student of the smoke recipe with its initial weights, saved as a distillation's end
    writes it."""
    config = load_config("ssondo.py", "smoke")
    spec = types.SimpleNamespace(student=config.student, audio=config.audio)
    variables = Student.initial_variables(spec, seed=3)
    state = types.SimpleNamespace(step=7, params={"backbone": variables["params"]},
                                  batch_stats={"backbone": variables["batch_stats"]})  # fmt: skip
    return save_student(str(tmp_path_factory.mktemp("run") / "student"), config, state)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder dataset: 12 clips of two tones at 44.1 kHz (resampled to the student's rate), split train/valid/test."""
    root = tmp_path_factory.mktemp("set")
    write_tone_folder(
        root, 12, 44_100, 44_100, 2_000, 3000, "split", lambda i: ("train", "train", "valid", "test")[i % 4]
    )
    return root


def test_a_student_directory_loads_as_a_model_with_its_metadata(student_dir):
    model = load_model(student_dir)
    assert isinstance(model, Student)
    assert model.sample_rate == RATE and model.frame_rate is None and model.min_samples == 1024
    meta = json.loads(open(f"{student_dir}/{MODEL_FILE}").read())
    assert meta["kind"] == "student" and meta["spec"]["step"] == 7
    wave = (0.1 * np.random.default_rng(1).standard_normal((3, RATE))).astype(np.float32)
    out = model.embed(wave, RATE)
    assert set(out) == {"clip"} and out["clip"].shape == (3, model.embedding_dim)
    each = model.embed_clips([wave[0], wave[1][: RATE // 2]], RATE)
    np.testing.assert_allclose(each[0]["clip"], out["clip"][0], rtol=1e-5, atol=1e-6 * np.abs(out["clip"]).max())
    again = Student.load(model.save(student_dir + "_copy"))
    np.testing.assert_array_equal(again.embed(wave, RATE)["clip"], out["clip"])
    assert again.weights_digest() == model.weights_digest()
    with pytest.raises(ValueError, match="holds a 'student' model, not a ViT encoder|holds a student model"):
        load_encoder(student_dir)


def test_probe_cli_on_a_student(student_dir, folder, tmp_path, capsys):
    out = tmp_path / "results"
    argv = [f"--checkpoint={student_dir}", "--dataset=folder", f"--root={folder}", f"--output={out}", "--seeds=1",
            "--max-steps=50"]  # fmt: skip
    assert probe.main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "folder.json").read_text())
    assert result["metric"] == "accuracy" and 0.0 <= result["mean"] <= 1.0 and result["num_clips"] == 12
    cache = np.load(out / "folder.embeddings.npz")
    model = load_model(student_dir)
    for i in (0, 5):  # the cached embeddings are the model's embeddings of the decoded files
        want = model.embed(load_audio(folder / f"{i}.wav", RATE), RATE)["clip"][0]
        np.testing.assert_allclose(cache["clip"][i], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_embed_cli_and_hear_on_a_student(student_dir, folder, tmp_path, capsys):
    target = tmp_path / "emb.npz"
    assert embed.main([f"--checkpoint={student_dir}", f"--input={folder}", f"--output={target}"]) == 0
    data = np.load(target)
    model = load_model(student_dir)
    assert data["clip"].shape == (12, model.embedding_dim)
    want = model.embed(load_audio(folder / "3.wav", RATE), RATE)["clip"][0]
    np.testing.assert_allclose(data["clip"][list(data["paths"]).index("3.wav")], want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())  # fmt: skip
    assert embed.main([f"--checkpoint={student_dir}", f"--input={folder}", f"--output={tmp_path / 'f.npz'}",
                       "--frames"]) == 2  # fmt: skip
    assert "without frame embeddings" in capsys.readouterr().err

    h = hear.load_model(student_dir)
    assert h.sample_rate == RATE and h.scene_embedding_size == model.embedding_dim
    audio = (0.1 * np.random.default_rng(2).standard_normal((2, RATE))).astype(np.float32)
    scene = hear.get_scene_embeddings(audio, h)
    assert_close_to_scale(scene, model.embed(audio, RATE)["clip"], rtol=1e-5)
    with pytest.raises(ValueError, match="scene embeddings only"):
        hear.get_timestamp_embeddings(audio, h)


def test_unknown_kind_and_missing_model_are_named(tmp_path, student_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MODEL_FILE).write_text(json.dumps({"format": "matpac_jax model", "version": 2, "kind": "rnn", "spec": {}}))
    np.savez(bad / "weights.npz", x=np.zeros(1))
    with pytest.raises(ValueError, match="unknown model kind 'rnn'"):
        load_model(str(bad))
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        load_model(str(tmp_path))
    assert jax.tree.structure(load_model(student_dir).variables) is not None
