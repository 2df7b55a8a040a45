"""S-SONDO balanced sampling: mini-batch k-means (k-means++ init) on device against a float64 numpy reference, and
the 1/|cluster| sampler: uniform cluster frequencies over a long draw, determinism, slices, exact resume."""

import numpy as np
import pytest
from helpers import assert_resumes_from_iterator_state

from matpac_jax.distill.kmeans import fit_kmeans, kmeans_pp
from matpac_jax.distill.sampler import BalancedIndices


def _blobs(n=6000, d=16, k=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 6
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(size=(n, d))).astype(np.float16), truth, centres


def test_kmeans_recovers_separated_clusters_from_a_memmap(tmp_path):
    x, truth, centres = _blobs()
    np.save(tmp_path / "emb.npy", x)
    mm = np.load(tmp_path / "emb.npy", mmap_mode="r")  # streamed in batches, as at corpus scale
    out = fit_kmeans(mm, k=5, seed=1, steps=60, batch=1024, init_sample=2000)
    assert out["centroids"].shape == (5, 16) and out["sizes"].sum() == len(x)
    # one found cluster per true cluster (purity 1), centroids at the true centres
    for c in range(5):
        assert len(np.unique(out["assignments"][truth == c])) == 1
    match = np.argmin(((out["centroids"][:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert sorted(match) == list(range(5))
    assert np.abs(out["centroids"] - centres[match]).max() < 0.2
    # assignments = nearest centroid, checked in float64 numpy
    x64 = x.astype(np.float64)
    d2 = ((x64[:, None] - out["centroids"].astype(np.float64)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(out["assignments"], d2.argmin(1))
    assert out["inertia"] == pytest.approx(d2.min(1).mean(), rel=1e-4)


def test_kmeans_best_of_several_inits_and_epochs():
    """``inits``: the best k-means++ start by inertia on a validation sample is kept, so more inits never end worse
    on data with a bad local optimum for a single start; ``epochs`` sets ceil(epochs · N / batch) steps (as
    scikit-learn's MiniBatchKMeans n_init and max_iter, which S-SONDO's clustering uses: 10 and 100)."""
    x, truth, _ = _blobs(n=3000)
    one = fit_kmeans(x, k=5, seed=3, steps=0, batch=500, init_sample=300, inits=1)
    many = fit_kmeans(x, k=5, seed=3, steps=0, batch=500, init_sample=300, inits=8)
    assert many["inertia"] <= one["inertia"] * 1.01
    out = fit_kmeans(x, k=5, seed=3, batch=500, init_sample=300, inits=2, epochs=2.5)
    assert out["steps"] == 15  # ceil(2.5 * 3000 / 500)
    for c in range(5):
        assert len(np.unique(out["assignments"][truth == c])) == 1
    with pytest.raises(ValueError, match="inits >= 1"):
        fit_kmeans(x, k=5, inits=0)


def test_kmeans_pp_spreads_initial_centres():
    x, truth, _ = _blobs(n=2000)
    init = kmeans_pp(x, 5, np.random.default_rng(0))
    nearest = ((x.astype(np.float32)[:, None] - init[None]) ** 2).sum(-1).argmin(0)  # the data point of each centre
    assert len(set(truth[nearest])) == 5  # D² sampling lands one centre in every blob


def test_balanced_draws_make_clusters_uniform():
    sizes = [3000, 600, 90, 9, 1]
    assignments = np.repeat(np.arange(5), sizes)[np.random.default_rng(0).permutation(sum(sizes))]
    ds = BalancedIndices(assignments, seed=3)
    n = 50_000
    draws = np.array([ds[j] for j in range(n)])
    freq = np.bincount(assignments[draws], minlength=5) / n
    sigma = np.sqrt(0.2 * 0.8 / n)
    assert np.abs(freq - 0.2).max() < 5 * sigma, freq  # ∝ 1/|cluster|: every cluster 1/5 of the draws
    singleton = np.flatnonzero(assignments == 4)[0]
    assert abs(np.mean(draws == singleton) - 0.2) < 5 * sigma
    p = ds.probabilities()
    assert p.sum() == pytest.approx(1.0) and p[singleton] == pytest.approx(0.2)


def test_sampler_is_deterministic_sliceable_and_resumes_exactly():
    assignments = np.arange(100) % 7
    ds = BalancedIndices(assignments, seed=11)
    first = [ds[j] for j in range(40)]
    assert first == [BalancedIndices(assignments, seed=11)[j] for j in range(40)]
    assert first != [BalancedIndices(assignments, seed=12)[j] for j in range(40)]
    halves = [list(ds[p::2][:20]) for p in (0, 1)]  # per-process slices interleave to the whole sequence
    assert [x for pair in zip(*halves, strict=True) for x in pair] == first
    assert_resumes_from_iterator_state(ds, first)
