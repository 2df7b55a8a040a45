"""The linear-probe harness (SPEC §7): metrics against hand computations, seeds, folds, early stopping, the probe
and results CLIs end to end on a generated dataset."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT

from matpac_jax.evaluate.harness import (
    average_precision,
    confidence_interval,
    evaluate_task,
    mean_average_precision,
    probe_split,
    stratified_split,
)


def test_average_precision_by_hand():
    # ranking by score: pos, neg, pos, neg, pos -> precisions at the positives 1/1, 2/3, 3/5
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 1, 0, 1])
    assert average_precision(scores, targets) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert np.isnan(average_precision(scores, np.zeros(5)))
    # two classes; the mask hides the one wrongly ranked positive of class 1 (known labels only)
    s = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9]])
    t = np.array([[1, 1], [0, 0], [0, 1]], np.float32)
    assert mean_average_precision(s, t) == pytest.approx((1.0 + (1 / 1 + 2 / 3) / 2) / 2)
    mask = np.array([[1, 0], [1, 1], [1, 1]], np.float32)
    assert mean_average_precision(s, t, mask) == pytest.approx(1.0)


def test_confidence_interval_by_hand():
    mean, half = confidence_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)  # t(0.975, 2) = 4.3027
    assert np.isnan(confidence_interval([0.5])[1])


def _blobs(n=300, d=32, c=4, sep=3.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    centers = rng.normal(size=(c, d)) * sep
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_single_label_probe_learns_and_seeds_are_vmapped():
    x, y = _blobs()
    runs = probe_split(x, y, np.arange(200), np.arange(200, 300), multilabel=False, num_classes=4, seeds=(0, 1, 2))
    assert [r["seed"] for r in runs] == [0, 1, 2]
    assert all(r["test"] >= 0.95 for r in runs)
    again = probe_split(x, y, np.arange(200), np.arange(200, 300), multilabel=False, num_classes=4, seeds=(0, 1, 2))
    assert runs == again  # deterministic
    # a probe on standardised features does not care about scale and offset of the embeddings
    moved = probe_split(x * 7 + 3, y, np.arange(200), np.arange(200, 300), multilabel=False, num_classes=4, seeds=(0,))
    assert abs(moved[0]["test"] - runs[0]["test"]) <= 0.02


def test_early_stopping_keeps_the_best_validation_step():
    x, y = _blobs(sep=0.3, seed=1)  # hard: validation accuracy peaks early
    runs = probe_split(x, y, np.arange(200), np.arange(200, 300), multilabel=False, num_classes=4, seeds=(0,),
                       max_steps=2000, eval_every=10, patience=5)  # fmt: skip
    assert 10 <= runs[0]["val_best_step"] < 2000


def test_multilabel_probe_with_mask():
    rng = np.random.default_rng(2)
    n, d, c = 400, 24, 3
    y = (rng.uniform(size=(n, c)) < 0.4).astype(np.float32)
    x = (y @ rng.normal(size=(c, d)) * 3 + rng.normal(size=(n, d))).astype(np.float32)
    runs = probe_split(x, y, np.arange(300), np.arange(300, 400), multilabel=True, num_classes=c, seeds=(0, 1))
    assert all(r["test"] >= 0.9 for r in runs)


@dataclasses.dataclass
class _Task:
    name: str
    labels: np.ndarray
    class_names: list
    multilabel: bool = False
    metric: str = "accuracy"
    folds: np.ndarray | None = None
    split: np.ndarray | None = None
    mask: np.ndarray | None = None


def test_folds_each_test_once_with_every_seed():
    x, y = _blobs(n=250)
    task = _Task("blobs", y, ["a", "b", "c", "d"], folds=np.arange(250) % 5 + 1)
    r = evaluate_task(task, x, seeds=(0, 1))
    assert sorted((run["fold"], run["seed"]) for run in r["runs"]) == [(f, s) for f in range(1, 6) for s in (0, 1)]
    values = [run["test"] for run in r["runs"]]
    assert r["mean"] == pytest.approx(np.mean(values)) and r["ci95"] == pytest.approx(confidence_interval(values)[1])
    split = np.where(np.arange(250) < 150, "train", np.where(np.arange(250) < 200, "valid", "test"))
    fixed = evaluate_task(_Task("blobs", y, ["a", "b", "c", "d"], split=split), x, seeds=(0,))
    assert [run["fold"] for run in fixed["runs"]] == [0] and fixed["mean"] >= 0.95


def test_probe_and_results_cli_on_a_generated_folder_dataset(tmp_path):
    from test_inference import HEADS, published_state_dict

    from matpac_jax.convert import from_torch
    from matpac_jax.inference import Encoder

    spec, params, _ = from_torch(published_state_dict(seed=3), heads=HEADS)
    enc = Encoder(spec, params).save(str(tmp_path / "enc"))
    root = tmp_path / "set"
    (root / "wav").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):  # two classes: low tone vs high tone, 4 folds
        f = 300 if i % 2 else 2000
        t = np.arange(16_000) / 16_000
        sf.write(
            root / "wav" / f"{i}.wav", 0.3 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(t.size), 16_000
        )
        rows.append(f"wav/{i}.wav,{'low' if i % 2 else 'high'},{i % 4 + 1}")
    (root / "labels.csv").write_text("path,labels,fold\n" + "\n".join(rows) + "\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = tmp_path / "results" / "tiny"

    def run(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    text = run("matpac_jax.probe", f"--checkpoint={enc}", "--dataset=folder", f"--root={root}", f"--output={out}",
               "--seeds=2")  # fmt: skip
    result = json.loads((out / "folder.json").read_text())
    assert len(result["runs"]) == 8 and result["metric"] == "accuracy" and result["mean"] >= 0.9
    assert "| folder | accuracy | 24 | 8 |" in text
    cached = run("matpac_jax.probe", f"--checkpoint={enc}", "--dataset=folder", f"--root={root}", f"--output={out}",
                 "--seeds=2")  # fmt: skip
    assert json.loads((out / "folder.json").read_text())["embed_seconds"] < result["embed_seconds"]
    assert cached.splitlines()[2] == text.splitlines()[2]  # same table row from the cached embeddings
    table = run("matpac_jax.results", str(out))
    assert "| MATPAC++ (published) | 85.6 | 76.8 | 87.6 | 40.8 | 56.1 | 93.1 | 89.7 | 75.7 |" in table
    assert "| tiny · folder (accuracy) |" in table
    bad = subprocess.run([sys.executable, "-m", "matpac_jax.probe", f"--checkpoint={enc}", "--dataset=esc50",
                          f"--root={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "meta/esc50.csv" in bad.stderr


def test_random_labels_give_chance_and_constant_features_stay_finite():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(500, 32)).astype(np.float32), rng.integers(0, 4, 500)
    runs = probe_split(x, y, np.arange(400), np.arange(400, 500), multilabel=False, num_classes=4, seeds=(0,))
    assert runs[0]["test"] <= 0.25 + 0.15
    xb, yb = _blobs(n=200, d=8, c=3, seed=4)
    xb[:150, 0], xb[150:, 0] = 5.0, 7.0  # constant in training, another constant at test: the std clamp holds
    runs = probe_split(xb, yb, np.arange(150), np.arange(150, 200), multilabel=False, num_classes=3, seeds=(0,))
    assert runs[0]["test"] >= 0.9


def test_stratified_split_keeps_class_proportions_and_is_a_partition():
    labels = np.repeat(np.arange(4), [50, 20, 10, 2])
    fit, val = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(labels)))
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=4), [10, 4, 2, 1])
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], val)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(labels=np.arange(39) % 3), "shape mismatch: 39 labels for 40 embeddings"),
        (dict(x=np.zeros(40)), "non-empty 2-D array"),
        (dict(x=np.full((40, 4), np.nan)), "NaN/Inf"),
        (dict(labels=np.arange(40) % 4), r"labels out of range \[0, 3\)"),
        (dict(labels=(np.arange(40) % 3).astype(float)), "1-D integer class ids"),
        (dict(test_idx=np.arange(0)), "empty split"),
        (dict(num_classes=1), "num_classes"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(labels=np.arange(40), num_classes=40), "validation split is empty"),
    ],
)
def test_bad_inputs_name_the_problem(change, match):
    rng = np.random.default_rng(0)
    args = dict(x=rng.normal(size=(40, 4)), labels=np.arange(40) % 3, train_idx=np.arange(30),
                test_idx=np.arange(30, 40), multilabel=False, num_classes=3) | change  # fmt: skip
    with pytest.raises(ValueError, match=match):
        probe_split(args.pop("x"), args.pop("labels"), args.pop("train_idx"), args.pop("test_idx"), **args)


def test_average_precision_is_scikit_learns_with_ties():
    """The published evaluations compute AP with scikit-learn (AST src/utilities/stats.py:32-33): scores rounded to a
    few levels (many ties) give scikit-learn's value, in any clip order."""
    from sklearn import metrics as sklearn_metrics

    rng = np.random.default_rng(4)
    for _ in range(20):
        scores = np.round(rng.random(60), 1)
        targets = (rng.random(60) < 0.3).astype(np.float32)
        targets[0] = 1.0
        want = sklearn_metrics.average_precision_score(targets, scores)
        assert average_precision(scores, targets) == pytest.approx(want, rel=1e-12)
        perm = rng.permutation(60)
        assert average_precision(scores[perm], targets[perm]) == pytest.approx(want, rel=1e-12)
