"""Linear probe on frozen embeddings (JAX + optax).

The probe standardises features with the statistics of its training part, fits one linear layer with
softmax cross-entropy by full-batch Adam(W), early-stops on the accuracy of a stratified validation
split carved from the training set, restores the best weights and reports test accuracy.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["linear_probe", "stratified_split"]

_STD_EPS = 1e-6


def _as_features(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [num_examples, dim], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 examples)")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def _as_labels(y: Any, name: str, num_examples: int, x_name: str, num_classes: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.shape[0] != num_examples:
        raise ValueError(f"shape mismatch: {name} has {arr.shape[0]} labels but {x_name} has {num_examples} examples")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must contain integer class labels, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"{name} has labels out of range [0, {num_classes}): e.g. {int(arr[np.argmax(bad)])} "
            f"({int(bad.sum())} bad labels)"
        )
    return arr


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into (fit, val), taking ``round(val_fraction * n_c)`` of each class to val.

    Every class with at least two examples contributes at least one validation and one fit example;
    classes with a single example stay in the fit part. Deterministic given ``seed``.
    """
    rng = np.random.default_rng(seed)
    fit_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = 0 if len(idx) < 2 else int(np.clip(round(val_fraction * len(idx)), 1, len(idx) - 1))
        val_idx.append(idx[:n_val])
        fit_idx.append(idx[n_val:])
    return np.sort(np.concatenate(fit_idx)), np.sort(np.concatenate(val_idx))


def _loss_and_acc(params: dict, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    # The weights are stored as [num_classes, dim]: with this layout both the forward product and the
    # weight gradient (d_logits^T @ x) are fast row-major matmuls on XLA:CPU (the [dim, C] layout makes
    # the gradient an x^T @ g product that is several times slower).
    logits = x @ params["w"].T + params["b"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    acc = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return loss, acc


@functools.partial(jax.jit, static_argnames=("optimizer", "num_steps"))
def _train_chunk(
    params: dict,
    opt_state: optax.OptState,
    fit_x: jax.Array,
    fit_y: jax.Array,
    val_x: jax.Array,
    val_y: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
) -> tuple[dict, optax.OptState, jax.Array, jax.Array]:
    """Run ``num_steps`` full-batch optimiser steps, then return the validation loss and accuracy."""

    def step(carry, _):
        p, s = carry
        grads = jax.grad(lambda q: _loss_and_acc(q, fit_x, fit_y)[0])(p)
        updates, s = optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), None, length=num_steps)
    val_loss, val_acc = _loss_and_acc(params, val_x, val_y)
    return params, opt_state, val_loss, val_acc


@functools.lru_cache(maxsize=32)
def _make_optimizer(lr: float, weight_decay: float) -> optax.GradientTransformation:
    # Cached so that the (static, hashed-by-identity) optimizer argument of ``_train_chunk`` hits the jit
    # cache across probe calls with the same hyper-parameters. Weight decay applies to the weights only.
    return optax.adamw(lr, weight_decay=weight_decay, mask={"w": True, "b": False})


def linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    num_classes: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_steps: int = 2000,
    eval_every: int = 20,
    patience: int = 10,
) -> dict:
    """Fit a linear softmax classifier on frozen features and report its accuracy.

    Features are standardised with the mean and standard deviation (clamped below at 1e-6) of the
    part of the training set that the probe is fitted on. A stratified validation split of
    ``val_fraction`` of each class is carved from the training set; training runs full-batch Adam(W)
    for up to ``max_steps`` steps, evaluating every ``eval_every`` steps, and stops once validation
    accuracy has not improved for ``patience`` evaluations. The weights of the best evaluation (highest
    validation accuracy, ties broken by lower validation loss) are restored and scored on the test set.

    Args:
        train_x: [n_train, dim] training features.
        train_y: [n_train] integer labels in ``[0, num_classes)``.
        test_x: [n_test, dim] test features.
        test_y: [n_test] integer labels in ``[0, num_classes)``.
        num_classes: number of classes (>= 2).
        seed: seed of the validation split; the result is deterministic given the inputs and seed.
        val_fraction: fraction of each training class held out for early stopping, in (0, 1).
        lr: Adam learning rate.
        weight_decay: decoupled weight decay on the weights (not the bias).
        max_steps: maximum number of full-batch optimiser steps.
        eval_every: evaluate on the validation split every this many steps.
        patience: number of evaluations without improvement before stopping.

    Returns:
        ``{'test_accuracy', 'val_accuracy', 'best_step', 'test_loss', 'val_loss', 'steps_run'}``:
        accuracies and losses are Python floats, steps are ints.

    Raises:
        ValueError: if shapes disagree, a split is empty, labels are out of range, features are not
            finite, or a hyper-parameter is out of range.
    """
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    num_classes = int(num_classes)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every), ("patience", patience)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    tr_x = _as_features(train_x, "train_x")
    te_x = _as_features(test_x, "test_x")
    if tr_x.shape[1] != te_x.shape[1]:
        raise ValueError(
            f"shape mismatch: train_x has feature dimension {tr_x.shape[1]} but test_x has {te_x.shape[1]}"
        )
    tr_y = _as_labels(train_y, "train_y", tr_x.shape[0], "train_x", num_classes)
    te_y = _as_labels(test_y, "test_y", te_x.shape[0], "test_x", num_classes)

    fit_idx, val_idx = stratified_split(tr_y, val_fraction, seed)
    if len(val_idx) == 0:
        raise ValueError(
            "validation split is empty: every class in train_y has a single example; "
            "provide at least two examples of some class"
        )
    mean = tr_x[fit_idx].mean(axis=0)
    std = np.maximum(tr_x[fit_idx].std(axis=0), _STD_EPS)

    def prep(x: np.ndarray) -> jax.Array:
        return jnp.asarray(((x - mean) / std).astype(np.float32))

    fit_x, val_x, test_xs = prep(tr_x[fit_idx]), prep(tr_x[val_idx]), prep(te_x)
    fit_y, val_y = jnp.asarray(tr_y[fit_idx], jnp.int32), jnp.asarray(tr_y[val_idx], jnp.int32)
    test_ys = jnp.asarray(te_y, jnp.int32)

    optimizer = _make_optimizer(float(lr), float(weight_decay))
    dim = tr_x.shape[1]
    params = {"w": jnp.zeros((num_classes, dim), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
    opt_state = optimizer.init(params)

    best: tuple[float, float] | None = None  # (val_acc, val_loss)
    best_params, best_step = params, 0
    step, since_best = 0, 0
    while step < max_steps and since_best < patience:
        n = min(int(eval_every), int(max_steps) - step)
        params, opt_state, v_loss, v_acc = _train_chunk(
            params, opt_state, fit_x, fit_y, val_x, val_y, optimizer=optimizer, num_steps=n
        )
        step += n
        v_acc, v_loss = float(v_acc), float(v_loss)
        if best is None or v_acc > best[0] or (v_acc == best[0] and v_loss < best[1]):
            best, best_params, best_step, since_best = (v_acc, v_loss), params, step, 0
        else:
            since_best += 1

    assert best is not None  # at least one chunk always runs
    test_loss, test_acc = _loss_and_acc(best_params, test_xs, test_ys)
    return {
        "test_accuracy": float(test_acc),
        "val_accuracy": best[0],
        "best_step": best_step,
        "test_loss": float(test_loss),
        "val_loss": best[1],
        "steps_run": step,
    }
