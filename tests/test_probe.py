"""Tests for the JAX linear probe (matpac_jax.evaluate.probe)."""

from __future__ import annotations

import numpy as np
import pytest

from matpac_jax.evaluate import linear_probe, stratified_split


def _blobs(n_train: int, n_test: int, dim: int, num_classes: int, sep: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim)) * sep
    y = rng.integers(0, num_classes, size=n_train + n_test)
    x = (centers[y] + rng.normal(size=(len(y), dim))).astype(np.float32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def test_separable_blobs_reach_high_accuracy():
    tr_x, tr_y, te_x, te_y = _blobs(300, 200, dim=16, num_classes=4, sep=3.0)
    result = linear_probe(tr_x, tr_y, te_x, te_y, num_classes=4, lr=1e-2)
    assert result["test_accuracy"] >= 0.95
    assert result["val_accuracy"] >= 0.95
    assert set(result) >= {"test_accuracy", "val_accuracy", "best_step"}
    assert isinstance(result["best_step"], int) and 0 < result["best_step"] <= result["steps_run"]


def test_random_labels_give_chance_accuracy():
    rng = np.random.default_rng(1)
    tr_x, te_x = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    tr_y, te_y = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    result = linear_probe(tr_x, tr_y, te_x, te_y, num_classes=4, lr=1e-2)
    assert result["test_accuracy"] <= 0.25 + 0.15


def test_accuracy_is_invariant_to_feature_scaling_and_shift():
    tr_x, tr_y, te_x, te_y = _blobs(300, 200, dim=16, num_classes=4, sep=0.4, seed=2)
    rng = np.random.default_rng(3)
    scale = 10.0 ** rng.uniform(-3, 3, size=16)
    shift = rng.normal(size=16) * 100.0
    base = linear_probe(tr_x, tr_y, te_x, te_y, num_classes=4)
    moved = linear_probe(tr_x * scale + shift, tr_y, te_x * scale + shift, te_y, num_classes=4)
    assert 0.4 < base["test_accuracy"] < 1.0  # a task where the probe is not saturated
    assert abs(base["test_accuracy"] - moved["test_accuracy"]) <= 0.02


def test_constant_feature_does_not_break_standardisation():
    tr_x, tr_y, te_x, te_y = _blobs(200, 100, dim=8, num_classes=3, sep=3.0, seed=4)
    tr_x[:, 0] = 5.0
    te_x[:, 0] = 7.0  # constant in train, different constant at test: std clamp keeps it finite
    result = linear_probe(tr_x, tr_y, te_x, te_y, num_classes=3, lr=1e-2)
    assert np.isfinite(result["test_loss"]) and result["test_accuracy"] >= 0.9


def test_same_seed_is_deterministic_and_seed_changes_split():
    tr_x, tr_y, te_x, te_y = _blobs(200, 100, dim=8, num_classes=3, sep=0.5, seed=5)
    a = linear_probe(tr_x, tr_y, te_x, te_y, num_classes=3, seed=7)
    b = linear_probe(tr_x, tr_y, te_x, te_y, num_classes=3, seed=7)
    assert a == b
    fit7, val7 = stratified_split(tr_y, 0.2, seed=7)
    fit8, val8 = stratified_split(tr_y, 0.2, seed=8)
    assert not np.array_equal(val7, val8)


def test_stratified_split_keeps_class_proportions_and_is_a_partition():
    labels = np.repeat(np.arange(4), [50, 20, 10, 2])
    fit, val = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(labels)))
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=4), [10, 4, 2, 1])


def test_early_stopping_stops_before_max_steps():
    rng = np.random.default_rng(6)
    tr_x, te_x = rng.normal(size=(200, 16)), rng.normal(size=(50, 16))
    tr_y, te_y = rng.integers(0, 3, 200), rng.integers(0, 3, 50)
    result = linear_probe(tr_x, tr_y, te_x, te_y, num_classes=3, max_steps=2000, eval_every=10, patience=3)
    assert result["steps_run"] < 2000
    assert result["steps_run"] - result["best_step"] == 3 * 10


def _good():
    rng = np.random.default_rng(0)
    return {
        "train_x": rng.normal(size=(40, 4)),
        "train_y": np.arange(40) % 3,
        "test_x": rng.normal(size=(10, 4)),
        "test_y": np.arange(10) % 3,
    }


@pytest.mark.parametrize(
    "change, match",
    [
        ({"train_y": np.arange(39) % 3}, "shape mismatch: train_y has 39 labels"),
        ({"test_y": np.arange(11) % 3}, "shape mismatch: test_y has 11 labels"),
        ({"test_x": np.zeros((10, 5))}, "shape mismatch: train_x has feature dimension 4"),
        ({"train_x": np.zeros(40)}, "train_x must be a 2-D array"),
        ({"train_y": (np.arange(40) % 3).reshape(40, 1)}, "train_y must be a 1-D array"),
        ({"train_y": np.arange(40) % 4}, r"train_y has labels out of range \[0, 3\)"),
        ({"test_y": -(np.arange(10) % 3)}, r"test_y has labels out of range"),
        ({"train_y": (np.arange(40) % 3).astype(float)}, "train_y must contain integer class labels"),
        ({"train_x": np.zeros((0, 4)), "train_y": np.zeros(0, int)}, "train_x is empty"),
        ({"test_x": np.zeros((0, 4)), "test_y": np.zeros(0, int)}, "test_x is empty"),
        ({"train_x": np.full((40, 4), np.nan)}, "train_x contains non-finite"),
        ({"train_x": np.zeros((3, 4)), "train_y": np.arange(3)}, "validation split is empty"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_problem(change, match):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=match):
        linear_probe(args["train_x"], args["train_y"], args["test_x"], args["test_y"], num_classes=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 3, "val_fraction": 1.0}, "val_fraction"),
        ({"num_classes": 3, "lr": 0.0}, "lr"),
        ({"num_classes": 3, "max_steps": 0}, "max_steps"),
        ({"num_classes": 3, "eval_every": 0}, "eval_every"),
        ({"num_classes": 3, "patience": 0}, "patience"),
        ({"num_classes": 3, "weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, match):
    g = _good()
    with pytest.raises(ValueError, match=match):
        linear_probe(g["train_x"], g["train_y"], g["test_x"], g["test_y"], **kwargs)
