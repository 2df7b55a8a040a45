"""k-means of teacher clip embeddings at corpus scale (S-SONDO balanced sampling, SPEC §6: k = 50).

``fit_kmeans(x, k, seed)``: greedy k-means++ initialisation on a random sample (the best of ``inits``), then
mini-batch k-means (Sculley 2010: each centre moves towards the mean of the points assigned to it with step
1 / (its running count)) over random batches, then assignment of every embedding. ``x`` may be a memory-mapped ``.npy``
(``np.load(path, mmap_mode="r")``): only batches are read and sent to the device, so 2 M × 3840 float16 (15 GB)
needs one batch of device memory, not the corpus. Distances run on the device in float32 as
``|x|² − 2 x·c + |c|²``; every step and the assignment are jitted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _sq_distances(x: jax.Array, c: jax.Array) -> jax.Array:
    """[B, D], [K, D] -> [B, K] squared distances (up to the per-row constant |x|², plus it)."""
    x = x.astype(jnp.float32)
    return jnp.sum(x * x, 1, keepdims=True) - 2.0 * x @ c.T + jnp.sum(c * c, 1)[None]


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ centres [k, D] from the rows of ``x`` (a sample of the corpus): each new centre is the best,
    by total squared distance, of ``2 + log k`` candidates drawn with probability ∝ D² (as scikit-learn does)."""
    x = np.asarray(x, np.float32)
    if len(x) < k:
        raise ValueError(f"k-means++ needs at least k={k} points, got {len(x)}")
    xj = jnp.asarray(x)
    trials = 2 + int(np.log(k))
    centres = [x[rng.integers(len(x))]]
    d2 = np.maximum(np.asarray(_sq_distances(xj, jnp.asarray(centres[0][None])))[:, 0], 0.0)
    for _ in range(1, k):
        if d2.sum() > 0:
            candidates = rng.choice(len(x), size=trials, p=d2 / d2.sum())
        else:
            candidates = rng.integers(len(x), size=trials)
        new = np.maximum(np.asarray(_sq_distances(xj, jnp.asarray(x[candidates]))), 0.0)  # [N, trials]
        pot = np.minimum(d2[:, None], new).sum(0)
        best = int(np.argmin(pot))
        centres.append(x[candidates[best]])
        d2 = np.minimum(d2, new[:, best])
    return np.stack(centres)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _minibatch_step(centres: jax.Array, counts: jax.Array, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One mini-batch k-means update: per centre, count += n_assigned; centre += (sum − n·centre) / count."""
    batch = batch.astype(jnp.float32)
    nearest = jnp.argmin(_sq_distances(batch, centres), axis=1)
    onehot = jax.nn.one_hot(nearest, centres.shape[0], dtype=jnp.float32)  # [B, K]
    n = onehot.sum(0)
    sums = onehot.T @ batch
    counts = counts + n
    step = jnp.where(counts > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0)[:, None]
    return centres + step * (sums - n[:, None] * centres), counts


@jax.jit
def _nearest(x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    d2 = _sq_distances(x, c)
    return jnp.argmin(d2, axis=1).astype(jnp.int32), jnp.maximum(jnp.min(d2, axis=1), 0.0)


def assign_with_distances(x: np.ndarray, centres: np.ndarray, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of every row of ``x`` and its squared distance (one streamed pass): int32 [N], float32 [N]."""
    c = jnp.asarray(centres, jnp.float32)
    out = [jax.device_get(_nearest(jnp.asarray(x[i : i + batch]), c)) for i in range(0, len(x), batch)]
    return np.concatenate([a for a, _ in out]), np.concatenate([d for _, d in out])


def assign(x: np.ndarray, centres: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Nearest centre of every row of ``x`` (streamed in batches): int32 [N]."""
    return assign_with_distances(x, centres, batch)[0]


def fit_kmeans(
    x: np.ndarray,
    k: int = 50,
    seed: int = 0,
    steps: int = 200,
    batch: int = 4096,
    init_sample: int = 20_000,
    inits: int = 1,
    epochs: float = 0.0,
) -> dict:
    """{'centroids' [k, D] float32, 'assignments' [N] int32, 'sizes' [k] int64, 'inertia' (mean squared distance)}.

    ``inits`` k-means++ initialisations, each on its own random sample of ``init_sample`` rows, the best by inertia
    on a common validation sample is kept (scikit-learn's MiniBatchKMeans ``n_init``: only the best initialisation is
    then run); ``epochs`` > 0 sets the mini-batch steps to ``ceil(epochs · N / batch)`` passes over the corpus instead
    of ``steps`` (MiniBatchKMeans' ``max_iter``, without its early stop on no improvement). S-SONDO's clustering:
    inits 10, batch 10,000, up to 100 epochs."""
    if k < 1 or len(x) < k:
        raise ValueError(f"k={k} clusters need at least k embeddings, got {len(x)}")
    if inits < 1 or epochs < 0 or steps < 0 or batch < 1:
        raise ValueError(
            f"k-means needs inits >= 1, epochs >= 0, steps >= 0, batch >= 1; got {inits}, {epochs}, {steps}, {batch}"
        )
    rng = np.random.default_rng(seed)
    size = min(init_sample, len(x))
    best, best_inertia = None, np.inf
    if inits > 1:
        valid = np.asarray(x[np.sort(rng.choice(len(x), size=size, replace=False))], np.float32)
    for _ in range(inits):
        sample = np.sort(rng.choice(len(x), size=size, replace=False))
        centres = kmeans_pp(x[sample], k, rng)
        inertia = float(assign_with_distances(valid, centres)[1].mean(dtype=np.float64)) if inits > 1 else 0.0
        if best is None or inertia < best_inertia:
            best, best_inertia = centres, inertia
    centres = jnp.asarray(best)
    counts = jnp.zeros((k,), jnp.float32)
    n_steps = int(np.ceil(epochs * len(x) / batch)) if epochs > 0 else steps
    for _ in range(n_steps):
        idx = np.sort(rng.integers(0, len(x), size=min(batch, len(x))))  # sorted: sequential reads of a memmap
        centres, counts = _minibatch_step(centres, counts, jnp.asarray(np.asarray(x[idx], np.float32)))
    centroids = np.asarray(centres)
    assignments, d2 = assign_with_distances(x, centroids)
    sizes = np.bincount(assignments, minlength=k).astype(np.int64)
    return {
        "centroids": centroids,
        "assignments": assignments,
        "sizes": sizes,
        "inertia": float(d2.mean(dtype=np.float64)),
        "steps": n_steps,
    }
