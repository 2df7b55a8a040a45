"""Fine-tuning inputs checked before compute: the labels of the training set (``config.data.train``) and of the
evaluation set (``config.finetune.eval``) against ``config.finetune.num_classes``, with or without ``balanced``; an
evaluation set with an unlabelled record refused; every refusal a ConfigError at ``make_input`` (exit 2 from
``main``) naming the key, the shard and the record; a degenerate evaluation set still ends with ``model/`` and a
strict ``eval.json``."""

import json

import numpy as np
import pytest
from helpers import load_config

from matpac_jax.config_lib import ConfigError
from matpac_jax.data.records import ClipRecord, encode_record, shard_name, write_shard
from matpac_jax.finetune import data as ft_data
from matpac_jax.finetune.metrics import bootstrap_ci, evaluate_scores
from matpac_jax.tasks import train_and_evaluate

CLASSES = 8  # the smoke recipe's head


def _shards(folder, labels: list[list[int]], num_shards: int = 2) -> list[str]:
    """Record shards of 2-s noise clips, record ``i`` labelled ``labels[i]``, split in ``num_shards`` in order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    clips = [ClipRecord(f"clip-{i}", rng.uniform(-0.1, 0.1, 32_000).astype(np.float32), labels=y)
             for i, y in enumerate(labels)]  # fmt: skip
    per = -(-len(clips) // num_shards)
    paths = [shard_name(folder, s, num_shards) for s in range(num_shards)]
    for s, path in enumerate(paths):
        write_shard(path, [encode_record(c) for c in clips[s * per : (s + 1) * per]])
    return paths


def _good(folder) -> list[str]:
    return _shards(folder, [[i % CLASSES] for i in range(16)])


def _config(train, evaluate, balanced: bool = False, steps: int = 3):
    c = load_config("finetune_as.py", "smoke")
    c.data.source, c.data.train, c.data.workers = "records", f"{train}/*.arrayrecord", 0
    c.finetune.eval, c.finetune.balanced, c.finetune.eval_every = f"{evaluate}/*.arrayrecord", balanced, 0
    c.finetune.num_classes, c.total_steps, c.mesh = CLASSES, steps, {"data": 1}
    return c


def _refused(config, workdir, *named: str) -> str:
    """The run's ConfigError (raised at make_input, before anything is compiled or saved), checked to name each of
    ``named``."""
    with pytest.raises(ConfigError) as e:
        train_and_evaluate(config, str(workdir))
    message = str(e.value)
    for part in named:
        assert part in message, (part, message)
    assert not (workdir / "model").exists() and not (workdir / "checkpoints").exists()
    return message


@pytest.mark.parametrize("balanced", [False, True])
def test_a_training_label_out_of_range_is_refused_at_start_naming_key_shard_and_record(tmp_path, balanced):
    labels = [[i % CLASSES] for i in range(16)]
    labels[11] = [3, CLASSES]  # shard 1 (records 8..15), its record 3
    paths = _shards(tmp_path / "train", labels)
    _good(tmp_path / "eval")
    message = _refused(_config(tmp_path / "train", tmp_path / "eval", balanced), tmp_path / "w", "config.data.train",
                       f"record 3 of {paths[1]}", "'clip-11'", "config.finetune.num_classes=8")  # fmt: skip
    assert "config.finetune.eval" not in message


def test_an_evaluation_label_out_of_range_is_refused_at_start_naming_key_shard_and_record(tmp_path):
    _good(tmp_path / "train")
    labels = [[i % CLASSES] for i in range(16)]
    labels[2] = [-1]
    paths = _shards(tmp_path / "eval", labels)
    _refused(_config(tmp_path / "train", tmp_path / "eval"), tmp_path / "w", "config.finetune.eval",
             f"record 2 of {paths[0]}", "[-1]")  # fmt: skip


def test_an_evaluation_set_prepared_without_labels_is_refused_at_start(tmp_path):
    _good(tmp_path / "train")
    paths = _shards(tmp_path / "eval", [[] for _ in range(16)])
    _refused(_config(tmp_path / "train", tmp_path / "eval"), tmp_path / "w", "config.finetune.eval",
             "no record of its 2 shard(s) holds a label", f"record 0 of {paths[0]}", "--labels")  # fmt: skip


def test_an_evaluation_record_without_labels_is_refused_at_start(tmp_path):
    _good(tmp_path / "train")
    labels = [[i % CLASSES] for i in range(16)]
    labels[9] = []
    paths = _shards(tmp_path / "eval", labels)
    _refused(_config(tmp_path / "train", tmp_path / "eval"), tmp_path / "w", "config.finetune.eval",
             "1 of 16 records hold no label", f"record 1 of {paths[1]}")  # fmt: skip


def test_a_training_set_without_any_label_is_refused_at_start(tmp_path):
    paths = _shards(tmp_path / "train", [[] for _ in range(16)])
    _good(tmp_path / "eval")
    _refused(_config(tmp_path / "train", tmp_path / "eval"), tmp_path / "w", "config.data.train",
             f"record 0 of {paths[0]}")  # fmt: skip


def test_evaluation_set_file_errors_name_config_finetune_eval(tmp_path):
    _good(tmp_path / "train")
    message = _refused(_config(tmp_path / "train", tmp_path / "nowhere"), tmp_path / "w", "config.finetune.eval",
                       "no files match")  # fmt: skip
    assert "config.data.train" not in message
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "x.arrayrecord").write_bytes(b"not a shard")
    _refused(_config(tmp_path / "train", tmp_path / "eval"), tmp_path / "w2", "config.finetune.eval", "x.arrayrecord")


def test_the_demo_refuses_fewer_classes_than_it_has(tmp_path):
    c = load_config("finetune_as.py", "smoke")
    c.data.source, c.finetune.num_classes = "demo", 5
    _refused(c, tmp_path / "w", "config.finetune.num_classes=5", "8 classes")


def test_training_labels_are_read_once_per_corpus(tmp_path, monkeypatch):
    paths = _good(tmp_path / "train")
    cache = str(tmp_path / "train_labels.npz")
    first = ft_data.record_labels(paths, CLASSES, cache)
    assert first.shape == (16, CLASSES) and np.array_equal(first.argmax(axis=1), np.arange(16) % CLASSES)

    def read_again(*args):
        raise AssertionError("labels read again")

    monkeypatch.setattr(ft_data, "read_labels", read_again)
    np.testing.assert_array_equal(ft_data.record_labels(paths, CLASSES, cache), first)  # from the cache
    with pytest.raises(ConfigError, match=f"record 7 of {paths[0]}"):  # a smaller head: checked on the cached labels
        ft_data.record_labels(paths, 7, cache)


@pytest.mark.parametrize("targets", ["none", "all", "one_clip"])
def test_metrics_of_a_degenerate_evaluation_set_never_raise(targets):
    scores = np.random.default_rng(0).standard_normal((1 if targets == "one_clip" else 6, CLASSES))
    y = np.ones_like(scores) if targets == "all" else np.zeros_like(scores)
    if targets == "one_clip":
        y[0, 2] = 1
    point, ci = evaluate_scores(scores, y), bootstrap_ci(scores, y, n_resamples=20)
    assert np.isfinite(point["mAP"]) and ci["mAP"][0] == point["mAP"] and np.isfinite(ci["mAP"]).all()


def test_a_run_on_an_evaluation_set_with_one_class_writes_the_model_and_eval_json(tmp_path):
    _good(tmp_path / "train")
    _shards(tmp_path / "eval", [[0] for _ in range(8)])  # AUC undefined for every class
    train_and_evaluate(_config(tmp_path / "train", tmp_path / "eval"), str(tmp_path / "w"))
    assert (tmp_path / "w" / "model").is_dir()
    result = json.loads((tmp_path / "w" / "eval.json").read_text())  # strict JSON: an undefined AUC is null
    assert result["mAP"][0] == pytest.approx(1 / CLASSES, abs=0.2) and result["AUC"][0] is None
