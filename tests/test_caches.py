"""No stale results, atomic outputs, a few compiled programs for any clip length.

Embeddings of clips of many lengths equal the float64 SPEC implementation whatever the length bucket they run in, and
new lengths in known buckets compile nothing; the probe's embedding cache and the teacher pass's shards are keyed on
the content of the weights, the inputs and the settings (new weights at the same path are recomputed, with a notice);
an unreadable cache is recomputed, never a crash; encoder directories, students and probe results are written
atomically and a truncated file is an error naming it; nonsense numbers are refused before any work."""

import json
import os
import shutil
import types

import numpy as np
import pytest
import soundfile as sf
from helpers import assert_close_to_scale, write_tone_folder
from test_frontend import reference_log_mel
from test_inference import HEADS, numpy_layers, published_state_dict

import matpac_jax.fileio as fileio
from matpac_jax import probe
from matpac_jax.convert import from_torch
from matpac_jax.data.records import ClipRecord, decode_pcm, encode_record, read_shard, shard_name, write_shard
from matpac_jax.distill import teacher_pass as tp
from matpac_jax.evaluate.datasets import load_task
from matpac_jax.evaluate.harness import probe_split
from matpac_jax.inference import TRACES, Encoder
from matpac_jax.load import load_encoder

RATE = 16_000


@pytest.fixture(scope="module")
def models():
    """Two encoders of the same shape with other weights: (state dict, Encoder) each."""
    out = []
    for seed in (0, 7):
        sd = published_state_dict(seed=seed)
        spec, params, _ = from_torch(sd, heads=HEADS)
        out.append((sd, Encoder(spec, params)))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A folder dataset of 8 clips of 8 lengths (two tones, 2 folds)."""
    root = tmp_path_factory.mktemp("set")
    write_tone_folder(root, 8, RATE, 4_000, 1_500, 2000, "fold", lambda i: i % 2 + 1)
    return root


# --- One compilation per length bucket.


def _noise(frames, seed: int = 1, extra: int = 37) -> list[np.ndarray]:
    """One clip per frame count (``extra`` samples past its last full frame)."""
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(400 + 160 * (f - 1) + extra)).astype(np.float32) for f in frames]


def test_any_lengths_match_the_spec_and_compile_once_per_bucket(models):
    sd, enc = models[0]
    narrow = _noise(range(200, 300, 9))  # 12 lengths, 1 or 2 chunks of 128 frames and a last one of 0 to 8 patches
    before = TRACES.copy()
    alone = [enc.embed(w) for w in narrow]
    counts = TRACES - before
    assert counts["log_mel"] <= 3 and counts["encoder"] <= 4, counts  # buckets 224, 256, 320; widths 1, 2, 4, 8
    wide = _noise([30, 128, 257, 420], seed=2)  # 1 to 4 chunks
    together = enc.embed_clips(wide + narrow[::4])
    for w, got in zip(wide + narrow[::4], together, strict=True):
        want = numpy_layers(sd, reference_log_mel(w, enc.spec.frontend))[-1]  # float64, the clip's own chunks
        assert got["frames"].shape == want.shape
        assert_close_to_scale(got["frames"], want)
        assert_close_to_scale(got["clip"], want.mean(axis=0))
    for a, b in zip(alone[::4], together[len(wide) :], strict=True):
        assert_close_to_scale(a["frames"][0], b["frames"])  # alone or batched with others: the same
    before = TRACES.copy()
    for w in narrow:
        enc.embed(np.concatenate([w, np.zeros(59, np.float32)]))  # other sample counts, same frame counts
    for w in _noise(range(201, 300, 9), seed=3):
        enc.embed(w)  # other frame counts in the same buckets
    assert not +(TRACES - before), TRACES - before


# --- The probe's embedding cache.


def _lines():
    lines = []
    return lines, lines.append


def test_probe_cache_follows_the_weights_the_files_and_survives_a_truncated_file(models, dataset, tmp_path):
    (_, a), (_, b) = models
    shutil.copytree(dataset, tmp_path / "set")
    task = load_task("folder", str(tmp_path / "set"))
    ckpt, cache = str(tmp_path / "enc"), str(tmp_path / "out" / "folder.embeddings.npz")
    a.save(ckpt)
    lines, log = _lines()
    xa = probe.cached_embeddings(load_encoder(ckpt), task, ckpt, cache, log=log)
    assert lines == [] and os.listdir(tmp_path / "out") == ["folder.embeddings.npz"]  # no temporary left
    b.save(ckpt)  # new weights at the same path
    xb = probe.cached_embeddings(load_encoder(ckpt), task, ckpt, cache, log=log)
    assert len(lines) == 1 and "other weights: recomputing" in lines[0]
    assert_close_to_scale(xb, probe.embed_task(b, task, progress=False))
    assert np.abs(xb - xa).max() > 1e-2 * np.abs(xa).max()
    again = probe.cached_embeddings(load_encoder(ckpt), task, ckpt, cache, log=log)
    assert len(lines) == 1 and np.array_equal(again, xb)  # reused: same content

    data = open(cache, "rb").read()
    with open(cache, "wb") as f:
        f.write(data[: len(data) // 2])  # a truncated cache
    x = probe.cached_embeddings(b, task, ckpt, cache, log=log)
    assert "is unreadable" in lines[-1]
    assert_close_to_scale(x, xb)
    with np.load(cache) as z:  # rewritten whole
        assert np.array_equal(z["clip"], x)

    sf.write(tmp_path / "set" / "3.wav", np.zeros(9_000, np.float32), RATE, subtype="FLOAT")  # rewritten in place
    x2 = probe.cached_embeddings(b, task, ckpt, cache, log=log)
    assert "other files: recomputing" in lines[-1]
    assert_close_to_scale(np.delete(x2, 3, 0), np.delete(xb, 3, 0))
    assert np.abs(x2[3] - xb[3]).max() > 1e-3 * np.abs(xb).max()


@pytest.mark.parametrize(
    "flag, match",
    [("--seeds=0", "--seeds=0"), ("--seeds=-2", "--seeds=-2"), ("--lr=0", "--lr=0.0"), ("--lr=nan", "--lr=nan"),
     ("--lr=inf", "--lr=inf"), ("--max-steps=0", "--max-steps=0")],
)  # fmt: skip
def test_probe_refuses_nonsense_numbers_before_any_work(flag, match, capsys):
    code = probe.main(["--checkpoint=/nonexistent", "--dataset=folder", "--root=/nonexistent", flag])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {match}") and len(err.strip().splitlines()) == 1


def test_harness_refuses_empty_seeds_and_infinite_hyperparameters():
    x, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    args = (x, y, np.arange(15), np.arange(15, 20))
    with pytest.raises(ValueError, match="seeds must be a non-empty sequence"):
        probe_split(*args, multilabel=False, num_classes=2, seeds=())
    with pytest.raises(ValueError, match="lr must be > 0 and finite"):
        probe_split(*args, multilabel=False, num_classes=2, seeds=(0,), lr=float("inf"))


def test_probe_result_is_written_atomically(models, dataset, tmp_path, monkeypatch, capsys):
    _, a = models[0]
    ckpt, out = a.save(str(tmp_path / "enc")), tmp_path / "out"
    fake = {"task": "folder", "metric": "accuracy", "mean": 0.5, "ci95": float("nan"), "runs": [], "num_clips": 8}
    monkeypatch.setattr(probe, "evaluate_task", lambda task, x, **_: dict(fake, dim=x.shape[1]))  # the write only
    argv = [f"--checkpoint={ckpt}", "--dataset=folder", f"--root={dataset}", f"--output={out}", "--seeds=1",
            "--max-steps=20"]  # fmt: skip
    assert probe.main(argv) == 0
    result = (out / "folder.json").read_text()
    assert json.loads(result)["dim"] == 320 and "NaN" in result  # as matpac_jax.results reads it
    real = os.replace

    def dies_on_json(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", dies_on_json)
    fake["mean"] = 0.75
    with pytest.raises(OSError, match="disk full"):
        probe.main(argv)  # the cache is reused, the new result's write fails
    assert (out / "folder.json").read_text() == result  # the previous result, whole
    assert sorted(os.listdir(out)) == ["folder.embeddings.npz", "folder.json"]


# --- Saved encoders and students.


def test_encoder_directory_is_atomic_and_a_truncated_one_is_named(models, tmp_path, monkeypatch):
    (_, a), (_, b) = models
    path = a.save(str(tmp_path / "enc"))
    assert sorted(os.listdir(path)) == ["model.json", "weights.npz"]
    monkeypatch.setattr(fileio.os, "replace", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        b.save(path)
    monkeypatch.undo()
    assert load_encoder(path).weights_digest() == a.weights_digest() != b.weights_digest()  # the old one, whole
    assert sorted(os.listdir(path)) == ["model.json", "weights.npz"]
    params = os.path.join(path, "weights.npz")
    data = open(params, "rb").read()
    with open(params, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"weights.npz is missing, truncated or not an .npz .*write the directory"):
        load_encoder(path)
    with open(os.path.join(path, "model.json"), "w") as f:
        f.write('{"format": "matpac_jax model", "spec": {"di')
    with pytest.raises(ValueError, match="model.json is unreadable or malformed"):
        load_encoder(path)


def test_student_files_are_atomic_and_a_truncated_one_is_named(tmp_path):
    from helpers import load_config

    from matpac_jax.models.student import Student, save_student

    config = load_config("ssondo.py", "smoke")
    w = {"conv": {"kernel": np.ones((3, 3), np.float32)}}  # any variables: the files, not the model, are tested here
    state = types.SimpleNamespace(params={"backbone": w}, batch_stats={"backbone": w}, step=3)
    path = save_student(str(tmp_path / "student"), config, state)
    assert sorted(os.listdir(path)) == ["model.json", "weights.npz"]  # no temporary left
    assert json.loads(open(os.path.join(path, "model.json")).read())["spec"]["step"] == 3
    config.audio.unwritable = object()  # the metadata's write fails half-way: the previous file stays whole
    with pytest.raises(TypeError):
        save_student(path, config, types.SimpleNamespace(**(vars(state) | {"step": 4})))
    assert json.loads(open(os.path.join(path, "model.json")).read())["spec"]["step"] == 3
    assert sorted(os.listdir(path)) == ["model.json", "weights.npz"]
    variables = os.path.join(path, "weights.npz")
    data = open(variables, "rb").read()
    with open(variables, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="weights.npz is missing, truncated or not an .npz"):
        Student.load(path)
    with open(os.path.join(path, "model.json"), "w") as f:
        f.write('{"student": {')
    with pytest.raises(ValueError, match="model.json is unreadable or malformed"):
        Student.load(path)


# --- The S-SONDO teacher pass.


def _corpus(root):
    rng = np.random.default_rng(0)
    for s in range(2):
        clips = [ClipRecord(f"c{s}{i}", (0.2 * rng.standard_normal(8_000 + 3_000 * i)).astype(np.float32))
                 for i in range(2)]  # fmt: skip
        write_shard(shard_name(root, s, 2), [encode_record(c) for c in clips])
    return str(root / "*.arrayrecord")


def test_teacher_pass_recomputes_shards_of_another_teacher_and_its_derived_files(models, tmp_path):
    (_, a), (_, b) = models
    records, ckpt, out = _corpus(tmp_path / "corpus"), str(tmp_path / "teacher"), str(tmp_path / "emb")
    lines, log = _lines()
    run = dict(seconds=1.0, batch=4, dtype="float32", log=log)
    a.save(ckpt)
    assert tp.teacher_pass(records, ckpt, out, **run)["built"] == 2
    keys, xa = tp.consolidate(out, log=log)
    ca = tp.cluster(out, k=2, steps=5, batch=4, log=log)
    mean_a, _ = tp.target_stats(out, log=log)

    b.save(ckpt)  # another teacher at the same path
    lines.clear()
    r = tp.teacher_pass(records, ckpt, out, **run)
    assert r["built"] == r["rebuilt"] == 2 and r["skipped"] == 0 and r["missing"] == r["duplicates"] == []
    assert sum("another teacher weights: recomputing" in line for line in lines) == 2
    keys_b, xb = tp.consolidate(out, log=log)
    assert keys_b == keys and any("built from other shards" in line for line in lines)
    header, pcm = decode_pcm(read_shard(records.replace("*", "clips-00000-of-00002"))[0])
    clip = tp.fit_clip(pcm, header["sample_rate"], RATE, 1.0)  # what the pass embeds: the first second
    assert_close_to_scale(xb[keys.index(header["key"])], b.embed(clip)["clip"][0])
    assert np.abs(np.asarray(xb) - np.asarray(xa)).max() > 1e-2 * np.abs(np.asarray(xa)).max()
    assert not np.array_equal(tp.target_stats(out, log=log)[0], mean_a)
    cb = tp.cluster(out, k=2, steps=5, batch=4, log=log)
    assert any("k-means: " in line and "recomputing" in line for line in lines)
    assert int(cb["k"]) == 2 and ca["source"] != cb["source"]
    assert int(tp.cluster(out, k=3, steps=5, batch=4, log=log)["k"]) == 3  # another k: recomputed, not the k=2 file

    again = tp.teacher_pass(records, ckpt, out, **run)
    assert again["skipped"] == 2 and again["built"] == 0
    side = tp.output_name(out, 1, 2) + ".json"
    text = open(side).read()
    with open(side, "w") as f:
        f.write(text[:10])  # a truncated sidecar: that shard again, no crash
    lines.clear()
    r = tp.teacher_pass(records, ckpt, out, **(run | {"seconds": 1.5}))  # and other settings for the other one
    assert r["built"] == 2 and any("sidecar is unreadable" in line for line in lines)
    assert any("another --seconds" in line for line in lines)
    assert not [n for n in os.listdir(out) if fileio.TMP_MARK in n]


def test_teacher_pass_refuses_more_clusters_than_clips_before_embedding(models, tmp_path, capsys):
    _, a = models[0]
    records, ckpt, out = _corpus(tmp_path / "corpus"), a.save(str(tmp_path / "teacher")), tmp_path / "emb"
    with pytest.raises(ValueError, match=r"clusters=5 \(--clusters / config.teacher_pass.clusters\) is more than the"):
        tp.teacher_pass(records, ckpt, str(out), seconds=1.0, clusters=5)
    assert not out.exists()  # refused before any shard was embedded
    code = tp.main([f"--records={records}", f"--checkpoint={ckpt}", f"--output={out}", "--clusters=9"])
    assert code == 2 and "is more than the 4 clips" in capsys.readouterr().err
    code = tp.main([f"--records={records}", f"--checkpoint={ckpt}", f"--output={out}", "--batch=0"])
    assert code == 2 and "batch=0 (--batch" in capsys.readouterr().err
    code = tp.main([f"--records={records}", f"--checkpoint={ckpt}", f"--output={out}", "--seconds=-1"])
    assert code == 2 and "seconds=-1.0 (--seconds" in capsys.readouterr().err
    assert not out.exists()
