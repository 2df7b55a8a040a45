"""tfds datasets in ArrayRecord format serve pretraining (config.data.source='tfds') and probing (--dataset=tfds:NAME)
through the shared grain pipeline and the probe task loader, without importing TensorFlow."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from helpers import load_config

from matpac_jax.audio.io import from_int16, load_audio, to_int16
from matpac_jax.config_lib import ConfigError
from matpac_jax.data.pipeline import pretrain_dataset, train_input
from matpac_jax.data.tfds_audio import make_builder
from matpac_jax.data.tfds_source import TfdsAudioSource
from matpac_jax.evaluate.datasets import load_task
from matpac_jax.tasks import check_config

SR, CROP = 16000, 3000
SPLITS = ["train"] * 6 + ["validation"] * 2 + ["test"] * 2
CLIPS = [(f"tone{i}.wav", "low" if i % 2 else "high", split) for i, split in enumerate(SPLITS)]  # path, label, split


def _tone(i: int) -> np.ndarray:
    """Clip ``i``: 0.5 s of a sine tone of its own pitch."""
    return (0.6 * np.sin(2 * np.pi * (220 + 110 * i) * np.arange(SR // 2) / SR)).astype(np.float32)


def _build(root, name: str, rows: list[tuple], header: list[str]) -> str:
    """Prepare ``rows`` of the tones in ``root`` as the tfds dataset ``name`` (ArrayRecord); returns its data_dir."""
    with open(root / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    data_dir = root / f"{name}_tfds"
    make_builder(name, root, root / f"{name}.csv", data_dir, workers=1).download_and_prepare(file_format="array_record")
    return str(data_dir)


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    root = tmp_path_factory.mktemp("tones")
    for i, (path, _, _) in enumerate(CLIPS):
        sf.write(root / path, _tone(i), SR, subtype="FLOAT")  # float WAV: load_audio gives the tone back exactly
    return root, _build(root, "tiny_tones", CLIPS, ["path", "label", "split"])


def _tfds_config(data_dir: str, **data):
    c = load_config("pp.py", None)
    c.data.source, c.data.tfds_name, c.data.tfds_data_dir = "tfds", "tiny_tones:1.0.0", data_dir
    c.data.update(data)
    return c


def _source_of(row: np.ndarray, clips: dict[int, np.ndarray]) -> int:
    """The clip whose int16 PCM holds ``row`` as a contiguous crop (-1 if none)."""
    for i, pcm in clips.items():
        windows = np.lib.stride_tricks.sliding_window_view(pcm, len(row))
        if (windows == row).all(axis=1).any():
            return i
    return -1


def _tone_of(wave: np.ndarray, count: int) -> int:
    """The clip among the first ``count`` whose int16 PCM ``wave`` is."""
    return next(i for i in range(count) if np.array_equal(to_int16(_tone(i)), to_int16(wave)))


def test_pretraining_batches_are_crops_of_the_train_split(tones):
    _, data_dir = tones
    source = train_input(_tfds_config(data_dir))
    assert isinstance(source, TfdsAudioSource) and len(source) == 6
    ds = pretrain_dataset(source, global_batch=4, crop_samples=CROP, seed=0, process_index=0, process_count=1)
    it = iter(ds)
    batches = [next(it)["audio"] for _ in range(3)]  # 12 crops: two epochs of the 6 train clips
    train = {i: to_int16(_tone(i)) for i, (_, _, split) in enumerate(CLIPS) if split == "train"}
    ids = []
    for batch in batches:
        assert batch.shape == (4, CROP) and batch.dtype == np.int16
        ids += [_source_of(row, train) for row in batch]
    assert sorted(ids) == sorted(list(train) * 2)  # each train clip once per epoch; no validation / test clip


def test_pretraining_iterator_state_resumes_and_splits_processes(tones):
    _, data_dir = tones
    source = train_input(_tfds_config(data_dir, tfds_split="train+validation"))
    assert len(source) == 8
    args = dict(global_batch=4, crop_samples=CROP, seed=3, process_count=1, process_index=0)
    it = iter(pretrain_dataset(source, **args))
    next(it)
    state = it.get_state()
    expected = [next(it)["audio"] for _ in range(2)]
    resumed = iter(pretrain_dataset(source, **args))
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["audio"], want)
    halves = [next(iter(pretrain_dataset(source, **(args | dict(process_count=2, process_index=p))))) for p in (0, 1)]
    whole = next(iter(pretrain_dataset(source, **args)))["audio"]
    assert all(h["audio"].shape == (2, CROP) for h in halves)
    np.testing.assert_array_equal(np.stack([halves[0]["audio"], halves[1]["audio"]], 1).reshape(4, CROP), whole)


def test_pretraining_with_worker_processes(tones):
    _, data_dir = tones
    ds = pretrain_dataset(
        train_input(_tfds_config(data_dir)), global_batch=2, crop_samples=CROP, seed=0, process_index=0,
        process_count=1, workers=1,
    )  # fmt: skip
    train = {i: to_int16(_tone(i)) for i in range(6)}
    batch = next(iter(ds))["audio"]
    assert batch.shape == (2, CROP) and all(_source_of(row, train) >= 0 for row in batch)


def test_probe_task_has_the_labels_splits_and_audio(tones):
    root, data_dir = tones
    task = load_task("tfds:tiny_tones", data_dir)
    assert task.name == "tfds_tiny_tones" and task.metric == "accuracy" and task.folds is None
    assert task.class_names == ["high", "low"]
    assert task.split.tolist() == ["train"] * 6 + ["valid"] * 2 + ["test"] * 2
    by_tone = {}
    for path, label, split in zip(task.files, task.labels, task.split, strict=True):
        wave = load_audio(path, SR)
        i = _tone_of(wave, len(CLIPS))
        np.testing.assert_array_equal(wave, from_int16(to_int16(_tone(i))))  # the stored int16 PCM, exactly
        by_tone[i] = (task.class_names[label], split)
    assert by_tone == {i: (lab, "valid" if s == "validation" else s) for i, (_, lab, s) in enumerate(CLIPS)}
    stamps = [os.stat(p).st_mtime_ns for p in task.files]
    again = load_task("tfds:tiny_tones:1.0.0", data_dir)  # reads the export's index, writes nothing
    assert again.files == task.files and [os.stat(p).st_mtime_ns for p in again.files] == stamps
    np.testing.assert_array_equal(again.labels, task.labels)
    os.remove(task.files[0])  # an incomplete export is written again
    assert load_task("tfds:tiny_tones", data_dir).files == task.files and os.path.isfile(task.files[0])


def test_probe_command_runs_on_a_tfds_dataset_unchanged(tones, tmp_path, capsys):
    from test_inference import HEADS, published_state_dict

    from matpac_jax import probe
    from matpac_jax.convert import from_torch
    from matpac_jax.inference import Encoder

    _, data_dir = tones
    spec, params, _ = from_torch(published_state_dict(seed=3), heads=HEADS)
    encoder = Encoder(spec, params).save(str(tmp_path / "enc"))
    argv = [f"--checkpoint={encoder}", "--dataset=tfds:tiny_tones", f"--root={data_dir}", f"--output={tmp_path}"]
    assert probe.main([*argv, "--seeds=1", "--max-steps=20"]) == 0
    assert "| tfds_tiny_tones | accuracy | 10 | 1 |" in capsys.readouterr().out
    assert (tmp_path / "tfds_tiny_tones.json").is_file()


def test_probe_task_with_folds_and_multi_labels(tones):
    root, _ = tones
    rows = [(path, "low;loud" if i < 3 else "high", "train", str(i % 3)) for i, (path, _, _) in enumerate(CLIPS[:6])]
    data_dir = _build(root, "tiny_folds", rows, ["path", "label", "split", "fold"])
    task = load_task("tfds:tiny_folds", data_dir)
    assert task.multilabel and task.metric == "mAP" and task.split is None
    assert task.class_names == ["high", "loud", "low"]
    by_tone = {}
    for path, fold, target in zip(task.files, task.folds, task.labels, strict=True):
        i = _tone_of(load_audio(path, SR), 6)
        by_tone[i] = (int(fold), target.tolist())
    assert by_tone == {i: (i % 3, [0.0, 1.0, 1.0] if i < 3 else [1.0, 0.0, 0.0]) for i in range(6)}


def test_reading_never_imports_tensorflow(tones, tmp_path):
    """A fresh process reads batches (one grain worker too) and the probe task. A stand-in ``tensorflow`` package on
    the path records any import attempt, so the check bites even where TensorFlow is not installed."""
    _, data_dir = tones
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os, traceback\nopen(os.environ['TF_MARKER'], 'a').write(''.join(traceback.format_stack()))\n"
        "raise ImportError('tensorflow imported while reading a tfds dataset')\n"
    )
    code = f"""
import sys
from absl import flags
flags.FLAGS.mark_as_parsed()
from matpac_jax.data.pipeline import pretrain_dataset
from matpac_jax.data.tfds_source import TfdsAudioSource
from matpac_jax.evaluate.datasets import load_task
source = TfdsAudioSource.open("tiny_tones", {data_dir!r}, "train", {SR})
for workers in (0, 1):
    ds = pretrain_dataset(source, global_batch=2, crop_samples={CROP}, seed=0, process_index=0, process_count=1,
                          workers=workers)
    print(next(iter(ds))["audio"].shape)
print(len(load_task("tfds:tiny_tones", {data_dir!r}).files), "tensorflow" in sys.modules)
"""
    marker = tmp_path / "marker"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]),
                        "TF_MARKER": str(marker), "JAX_PLATFORMS": "cpu"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["(2,", f"{CROP})", "(2,", f"{CROP})", str(len(CLIPS)), "False"]
    assert not marker.exists(), marker.read_text()


def test_errors_name_the_problem_and_the_fix(tones, tmp_path):
    _, data_dir = tones
    where = re.escape(f"not prepared under {tmp_path} (looked for {tmp_path}/nope/<version>/dataset_info.json")
    with pytest.raises(FileNotFoundError, match=rf"^--dataset=tfds:nope: {where}; prepared there: none\)"):
        load_task("tfds:nope", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"config.data.tfds_name='nope'.*there: tiny_tones:1.0.0.*tfds_audio"):
        train_input(_tfds_config(data_dir, tfds_name="nope"))
    with pytest.raises(ValueError, match=r"at 16000 Hz, the model reads 8000 Hz \(config.audio.sample_rate\)"):
        TfdsAudioSource.open("tiny_tones", data_dir, "train", 8000)
    with pytest.raises(ValueError, match=r"Unknown split 'dev'"):
        train_input(_tfds_config(data_dir, tfds_split="dev"))
    with pytest.raises(ValueError, match="names no dataset"):
        load_task("tfds:", data_dir)
    with pytest.raises(ValueError, match=r"unknown dataset adapter 'nope'.*tfds:NAME"):
        load_task("nope", data_dir)


def test_a_probe_task_needs_a_test_split_or_folds(tones):
    root, _ = tones
    data_dir = _build(root, "tiny_train_only", [r[:2] for r in CLIPS[:4]], ["path", "label"])
    with pytest.raises(ValueError, match="without train and test splits every record needs a 'fold' >= 0"):
        load_task("tfds:tiny_train_only", data_dir)


def _edited_copy(data_dir: str, tmp_path, edit) -> str:
    """A copy of the prepared tiny_tones whose features.json / dataset_info.json ``edit(name, json)`` changes."""
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    version = copy / "tiny_tones" / "1.0.0"
    for name in ("features.json", "dataset_info.json"):
        info = json.loads((version / name).read_text())
        edit(name, info)
        (version / name).write_text(json.dumps(info))
    return str(copy)


def test_datasets_that_need_tensorflow_or_are_not_array_record_are_named(tones, tmp_path):
    _, data_dir = tones

    def audio_feature(name, info):  # what tfds.features.Audio writes: building that feature imports TensorFlow
        if name == "features.json":
            info["featuresDict"]["features"]["audio"] = {
                "pythonClassName": "tensorflow_datasets.core.features.audio_feature.Audio",
                "audio": {"dtype": "int16", "shape": {"dimensions": ["-1"]}, "sampleRate": "16000", "encoding": "none"},
            }

    def tfrecord(name, info):
        if name == "dataset_info.json":
            info["fileFormat"] = "tfrecord"

    with pytest.raises(ValueError, match=r"features need TensorFlow.*store the audio as tfds.features.Tensor"):
        TfdsAudioSource.open("tiny_tones", _edited_copy(data_dir, tmp_path / "a", audio_feature), "train", SR)
    with pytest.raises(ValueError, match=r"not stored in ArrayRecord format.*file_format='array_record'"):
        load_task("tfds:tiny_tones", _edited_copy(data_dir, tmp_path / "b", tfrecord))


@pytest.mark.parametrize(
    "damage",
    [
        lambda v: open(sorted(v.glob("*train.array_record*"))[0], "r+b").truncate(100),
        lambda v: os.remove(sorted(v.glob("*train.array_record*"))[0]),
        lambda v: (v / "dataset_info.json").write_text("{garbage"),
    ],
    ids=["truncated shard", "deleted shard", "garbled dataset_info.json"],
)
def test_a_damaged_dataset_is_named_with_the_fix_before_compute(tones, tmp_path, damage):
    """Training (TfdsAudioSource.open reads a first record) and the probe (every record) alike: a ValueError naming
    the dataset and the fix, never array_record's RuntimeError or protobuf's ParseError."""
    from matpac_jax.evaluate.datasets.tfds_task import EXPORT_DIR

    _, data_dir = tones
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shutil.rmtree(copy / "tiny_tones" / "1.0.0" / EXPORT_DIR, ignore_errors=True)  # the probe's WAVs of other tests
    damage(copy / "tiny_tones" / "1.0.0")
    fix = r"prepare the dataset again \(python -m matpac_jax.data.tfds_audio\) or restore its directory"
    bad = rf"(damaged|cannot be read).*{fix}"
    with pytest.raises(ValueError, match=rf"^config.data.tfds_name='tiny_tones:1.0.0'.*{bad}"):
        train_input(_tfds_config(str(copy)))
    with pytest.raises(ValueError, match=rf"^--dataset=tfds:tiny_tones.*{bad}"):
        load_task("tfds:tiny_tones", str(copy))


def test_config_check_rejects_bad_sources_before_compute():
    c = load_config("pp.py", None)
    c.data.source = "tfrecord"
    with pytest.raises(ConfigError, match=r"config.data.source='tfrecord': expected one of 'records', 'tfds'"):
        check_config(c)
    c.data.source = "tfds"
    with pytest.raises(ConfigError, match=r"config.data.tfds_name is empty"):
        check_config(c)
    c.data.tfds_name = "tiny_tones"
    check_config(c)
    c.probe.enabled = True  # the closing probe is the demo's: refused before compute, not after training
    with pytest.raises(ConfigError, match=r"config.probe.enabled=True with config.data.source='tfds'"):
        check_config(c)
