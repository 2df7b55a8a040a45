"""The linear-probe protocol of SPEC §7 on frozen clip embeddings, several seeds at once.

For one train / validation / test split (``probe_split``): features are standardised with the statistics of the
examples the probe is fitted on; one linear layer is trained by full-batch Adam; every ``eval_every`` steps the
validation score is computed (accuracy for single-label tasks, minus the loss for multi-label tasks) and the first
best weights are kept (ties broken by the lower validation loss); training stops after ``patience`` evaluations
without a score better by 1e-4. Softmax
cross-entropy and accuracy for single-label tasks, sigmoid binary cross-entropy and mAP (macro average precision over
the classes with a positive test example, optionally masked to known labels) for multi-label ones. The seeds are one
``vmap``: each seed draws its own initial weights and, when the dataset defines no validation split, its own
validation part of the training data (stratified for single-label tasks); the whole fit is one jitted ``scan``.

``evaluate_task`` runs that over a dataset's folds (each fold the test set once, the others train) or over its fixed
split, and reports mean ± 95 % confidence interval (Student t over all fold × seed runs).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

_STD_EPS = 1e-6


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class as scikit-learn's ``average_precision_score`` computes it (the published evaluations' AP:
    YuanGongND/ast src/utilities/stats.py:32-33, which nttcslab/m2d's and EVAR's AudioSet evaluations follow):
    each positive earns the precision at its score's threshold, a run of tied scores counted at once; nan without
    positives."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order] > 0.5
    if not t.any():
        return float("nan")
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # the last rank of each run of tied scores
    hits = np.cumsum(t)[ends]
    return float(np.sum(np.diff(hits, prepend=0) * hits / (ends + 1)) / hits[-1])


def mean_average_precision(scores: np.ndarray, targets: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Macro mAP over classes with at least one known positive; ``mask`` (1 = label known) drops unknown pairs."""
    aps = []
    for c in range(targets.shape[1]):
        keep = np.ones(len(targets), bool) if mask is None else mask[:, c] > 0
        ap = average_precision(scores[keep, c], targets[keep, c])
        if not math.isnan(ap):
            aps.append(ap)
    return float(np.mean(aps)) if aps else float("nan")


def confidence_interval(values, level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of a Student-t interval; half-width nan for a single value."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return float(v.mean()), float("nan")
    from scipy import stats

    half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def _losses(params, x, y, multilabel: bool):
    logits = x @ params["w"].T + params["b"]
    if multilabel:
        per = optax.sigmoid_binary_cross_entropy(logits, y).mean(axis=-1)
        correct = jnp.zeros(x.shape[0])
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return per, correct, logits


@functools.partial(jax.jit, static_argnames=("multilabel", "num_classes", "evals", "eval_every", "patience", "lr"))
def _fit(x, y, fit_w, val_w, keys, *, multilabel, num_classes, evals, eval_every, patience, lr):
    """x [N, D] raw features, fit_w / val_w [S, N] example weights per seed -> (best params [S], best step [S])."""
    tx = optax.adam(lr)

    def one_seed(fw, vw, key):
        n_fit = jnp.maximum(fw.sum(), 1.0)
        mean = (fw[:, None] * x).sum(0) / n_fit
        std = jnp.sqrt((fw[:, None] * (x - mean) ** 2).sum(0) / n_fit)
        std = jnp.where(std < _STD_EPS, jnp.inf, std)  # a feature constant in training carries nothing: it becomes 0
        xs = (x - mean) / std
        params = {"w": 0.01 * jax.random.normal(key, (num_classes, x.shape[1])), "b": jnp.zeros(num_classes)}
        state = tx.init(params)

        def val_score(p):
            per, correct, _ = _losses(p, xs, y, multilabel)
            n_val = jnp.maximum(vw.sum(), 1.0)
            loss = (vw * per).sum() / n_val
            acc = (vw * correct).sum() / n_val
            return (-loss, loss) if multilabel else (acc, loss)  # higher is better, then lower loss

        def step(c, _):
            p, s = c
            g = jax.grad(lambda q: (fw * _losses(q, xs, y, multilabel)[0]).sum() / n_fit)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        def chunk(carry):
            i, p, s, best_p, best, best_loss, best_step, since = carry
            (p, s), _ = jax.lax.scan(step, (p, s), None, length=eval_every)
            score, loss = val_score(p)
            # Weights: the best score, ties broken by the lower loss. Patience: only a score better by more than 1e-4
            # counts as progress, so a loss that keeps creeping down at a perfect validation score ends the run.
            progress = score > best + 1e-4
            keep = progress | ((score >= best - 1e-6) & (loss < best_loss))
            best_p = jax.tree.map(lambda a, b: jnp.where(keep, a, b), p, best_p)
            best = jnp.maximum(score, best)
            best_loss = jnp.where(keep, loss, best_loss)
            best_step = jnp.where(keep, (i + 1) * eval_every, best_step)
            since = jnp.where(progress, 0, since + 1)
            return i + 1, p, s, best_p, best, best_loss, best_step, since

        def running(carry):  # stops early: the loop ends once every seed has stopped improving
            i, *_, since = carry
            return (i < evals) & (since < patience)

        init = (0, params, state, params, -jnp.inf, jnp.inf, 0, 0)
        _, _, _, best_p, _, _, best_step, _ = jax.lax.while_loop(running, chunk, init)
        return best_p, best_step, mean, std

    return jax.vmap(one_seed)(fit_w, val_w, keys)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into (fit, val), ``round(val_fraction * n_c)`` of each class to val (at least one, and
    at least one left to fit, for every class with two or more examples). Deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) >= 2:
            val[idx[: int(np.clip(round(val_fraction * len(idx)), 1, len(idx) - 1))]] = True
    return np.flatnonzero(~val), np.flatnonzero(val)


def _validation_masks(train_idx, labels, multilabel, seeds, fraction):
    """Per seed, (fit, val) boolean masks over the training examples: a stratified / random ``fraction`` held out."""
    fits, vals = [], []
    n = len(train_idx)
    for seed in seeds:
        val = np.zeros(n, bool)
        if multilabel:
            val[np.random.default_rng(seed).permutation(n)[: max(1, round(fraction * n))]] = True
        else:
            val[stratified_split(labels[train_idx], fraction, seed)[1]] = True
        if not val.any():
            raise ValueError("validation split is empty: every class has a single training example")
        fits.append(~val)
        vals.append(val)
    return np.stack(fits), np.stack(vals)


def _check_inputs(x, labels, train_idx, test_idx, multilabel, num_classes, hyper) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"embeddings must be a non-empty 2-D array [clips, dim], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN/Inf or are not numbers")
    labels = np.asarray(labels)
    if len(labels) != len(x):
        raise ValueError(f"shape mismatch: {len(labels)} labels for {len(x)} embeddings")
    if int(num_classes) != num_classes or num_classes < (1 if multilabel else 2):
        raise ValueError(f"num_classes must be an integer >= 2 (>= 1 multi-label), got {num_classes!r}")
    if multilabel:
        if labels.shape != (len(x), num_classes):
            raise ValueError(f"multi-label targets must be [clips, {num_classes}], got {labels.shape}")
    else:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"single-label targets must be 1-D integer class ids, got {labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels out of range [0, {num_classes}): {labels.min()} .. {labels.max()}")
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise ValueError(f"empty split: {len(train_idx)} training and {len(test_idx)} test examples")
    for name, value in hyper.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    if not 0 < hyper["val_fraction"] < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {hyper['val_fraction']!r}")
    return x.astype(np.float32), labels


def probe_split(
    x: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    multilabel: bool,
    num_classes: int,
    valid_idx: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    seeds=(0, 1, 2),
    val_fraction: float = 0.1,
    lr: float = 1e-3,
    max_steps: int = 1000,
    eval_every: int = 10,
    patience: int = 10,
) -> list[dict]:
    """One split, every seed: [{'seed', 'test', 'val_best_step'}] with ``test`` = accuracy or mAP on ``test_idx``.

    ``x`` [N, D] embeddings, ``labels`` [N] class ids or [N, C] multi-hot targets; ``valid_idx`` None draws each seed's
    validation part from ``train_idx`` (``val_fraction``, stratified for single-label tasks). ValueError names any
    malformed input."""
    seeds = tuple(seeds)
    if not seeds or not all(isinstance(s, int | np.integer) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of integers (one probe run each), got {seeds!r}")
    hyper = dict(val_fraction=val_fraction, lr=lr, max_steps=max_steps, eval_every=eval_every, patience=patience)
    x, labels = _check_inputs(x, labels, train_idx, test_idx, multilabel, num_classes, hyper)
    if valid_idx is None:
        fit_m, val_m = _validation_masks(train_idx, labels, multilabel, seeds, val_fraction)
        rows = np.asarray(train_idx)
    else:
        rows = np.concatenate([train_idx, valid_idx])
        fit_m = np.tile(np.r_[np.ones(len(train_idx), bool), np.zeros(len(valid_idx), bool)], (len(seeds), 1))
        val_m = ~fit_m
    y = labels[rows]
    y = jnp.asarray(y, jnp.float32 if multilabel else jnp.int32)
    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
    params, best_step, mean, std = _fit(
        jnp.asarray(x[rows]),
        y,
        jnp.asarray(fit_m, jnp.float32),
        jnp.asarray(val_m, jnp.float32),
        jax.vmap(jax.random.wrap_key_data)(keys),
        multilabel=multilabel,
        num_classes=int(num_classes),
        evals=max(1, max_steps // eval_every),
        eval_every=int(eval_every),
        patience=int(patience),
        lr=float(lr),
    )
    params, best_step, mean, std = jax.device_get((params, best_step, mean, std))
    out = []
    for i, seed in enumerate(seeds):
        xs = (x[test_idx] - mean[i]) / std[i]  # std inf -> 0 for features constant in training
        logits = xs @ params["w"][i].T + params["b"][i]
        if multilabel:
            score = mean_average_precision(logits, labels[test_idx], None if mask is None else mask[test_idx])
        else:
            score = float(np.mean(np.argmax(logits, -1) == labels[test_idx]))
        out.append({"seed": int(seed), "test": score, "val_best_step": int(best_step[i])})
    return out


def evaluate_task(task, x: np.ndarray, seeds=(0, 1, 2), **kwargs) -> dict:
    """All folds (or the fixed split) of a ``datasets.Task`` with embeddings ``x`` [N, D] (rows = ``task.files``).

    Returns {'task', 'metric', 'mean', 'ci95', 'runs': [{'fold', 'seed', 'test', ...}], 'num_clips', 'seeds'}.
    """
    labels = np.asarray(task.labels)
    num_classes = len(task.class_names)
    common = dict(multilabel=task.multilabel, num_classes=num_classes, mask=task.mask, seeds=tuple(seeds), **kwargs)
    runs = []
    if task.folds is not None:
        for fold in np.unique(task.folds):
            test = np.flatnonzero(task.folds == fold)
            train = np.flatnonzero(task.folds != fold)
            runs += [r | {"fold": int(fold)} for r in probe_split(x, labels, train, test, **common)]
    else:
        split = np.asarray(task.split)
        train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
        valid = np.flatnonzero(split == "valid")
        if not len(train) or not len(test):
            raise ValueError(f"{task.name}: the split needs train and test examples ({len(train)}, {len(test)})")
        valid_idx = valid if len(valid) else None
        runs += [r | {"fold": 0} for r in probe_split(x, labels, train, test, valid_idx=valid_idx, **common)]
    mean, half = confidence_interval([r["test"] for r in runs])
    return {
        "task": task.name,
        "metric": task.metric,
        "mean": mean,
        "ci95": half,
        "runs": runs,
        "num_clips": int(len(labels)),
        "seeds": list(seeds),
    }


def probe_with_ci(
    x: np.ndarray, labels: np.ndarray, n_train: int, num_classes: int, seeds: tuple, max_steps: int
) -> dict:
    """Single-label probe with rows ``[:n_train]`` for training (20 % of them for validation) and the rest for test,
    one run per seed: {'mean', 'ci95' (Student-t half-width), 'runs'}."""
    train, test = np.arange(n_train), np.arange(n_train, len(labels))
    settings = {"seeds": seeds, "val_fraction": 0.2, "max_steps": max_steps, "eval_every": 20}
    runs = probe_split(x, labels, train, test, multilabel=False, num_classes=num_classes, **settings)
    mean, half = confidence_interval([r["test"] for r in runs])
    return {"mean": mean, "ci95": half, "runs": runs}
