r"""k-means of teacher embeddings at corpus scale (S-SONDO balanced sampling): time per phase, peak host memory, and
the extrapolation to AudioSet (2 M × 3840), in one run.

  python bench/kmeans.py                          # 200,000 × 3840 float16 on disk (1.5 GB), k = 50
  python bench/kmeans.py --rows=2000000           # the full corpus size (15.4 GB of disk)
  python bench/kmeans.py --compare --rows=100000  # inertia: the cheap default vs S-SONDO's clustering settings

The embeddings are a memory-mapped ``.npy`` of clustered random vectors, as the teacher pass writes them; the phases
are those of ``fit_kmeans``: k-means++ on a 20,000-row sample and 200 mini-batch steps of 4,096 rows (independent of
N), then one streamed assignment pass (linear in N). Peak RSS shows that memory does not grow with N (only batches
are read). Baseline in the same run: the assignment pass as a plain float32 numpy loop over the same batches.

``--compare`` fits the same embeddings twice, with the default (one k-means++ start, 200 steps of 4,096 rows) and with
the settings of S-SONDO's scikit-learn MiniBatchKMeans (10 starts, batches of 10,000, ``--epochs`` passes, 100 there),
on embeddings with more structure than k (``--components`` Gaussian components of Zipf-distributed sizes and
spreads), and prints both inertias, their ratio and the times.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax.distill import kmeans  # noqa: E402


def _synthetic(path: str, rows: int, dim: int, k: int, seed: int = 0) -> np.memmap:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    x = np.lib.format.open_memmap(path, "w+", np.float16, (rows, dim))
    for i in range(0, rows, 50_000):
        n = min(50_000, rows - i)
        x[i : i + n] = centres[rng.integers(k, size=n)] + 0.5 * rng.standard_normal((n, dim), np.float32)
    x.flush()
    return np.load(path, mmap_mode="r")


def _structured(path: str, rows: int, dim: int, components: int, seed: int = 0) -> np.memmap:
    """Embeddings with more structure than k: ``components`` Gaussian components with Zipf-distributed sizes and
    spreads, centres drawn around a few super-clusters (as classes of sounds group into families)."""
    rng = np.random.default_rng(seed)
    families = rng.standard_normal((max(components // 20, 2), dim)).astype(np.float32)
    centres = families[rng.integers(len(families), size=components)] + 0.6 * rng.standard_normal(
        (components, dim)).astype(np.float32)  # fmt: skip
    weights = 1.0 / np.arange(1, components + 1)
    weights /= weights.sum()
    spread = rng.uniform(0.2, 0.6, size=components).astype(np.float32)
    x = np.lib.format.open_memmap(path, "w+", np.float16, (rows, dim))
    for i in range(0, rows, 20_000):
        n = min(20_000, rows - i)
        comp = rng.choice(components, size=n, p=weights)
        x[i : i + n] = centres[comp] + spread[comp, None] * rng.standard_normal((n, dim), np.float32)
    x.flush()
    return np.load(path, mmap_mode="r")


def compare(args) -> None:
    import jax

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        x = _structured(os.path.join(tmp, "embeddings.npy"), args.rows, args.dim, args.components)
        print(f"{args.rows:,} x {args.dim} float16, {args.components} components, k = {args.k}; "
              f"device: {jax.devices()[0].device_kind}")  # fmt: skip
        runs = {
            "default (1 start, 200 steps x 4,096)": dict(),
            f"S-SONDO (10 starts, batch 10,000, {args.epochs:g} epochs)": dict(inits=10, batch=10_000,
                                                                              epochs=args.epochs),
        }  # fmt: skip
        out = {}
        for name, kw in runs.items():
            t0 = time.perf_counter()
            r = kmeans.fit_kmeans(x, args.k, seed=0, **kw)
            out[name] = (r["inertia"], time.perf_counter() - t0, r["steps"])
            print(f"{name}: inertia {r['inertia']:.2f}, {r['steps']} steps, {out[name][1]:.1f} s")
        (a, ta, _), (b, tb, _) = out.values()
        print(f"inertia default / S-SONDO settings: {a / b:.4f} ({100 * (a / b - 1):+.2f} %), time {ta / tb:.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=3840)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--dir", default=None, help="where to write the memory-mapped embeddings (default: a temp dir)")
    ap.add_argument("--compare", action="store_true", help="inertia of the default vs S-SONDO's k-means settings")
    ap.add_argument("--components", type=int, default=500, help="--compare: Gaussian components of the embeddings")
    ap.add_argument("--epochs", type=float, default=100.0, help="--compare: passes of the S-SONDO settings")
    args = ap.parse_args()
    if args.compare:
        return compare(args)
    import jax

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        x = _synthetic(os.path.join(tmp, "embeddings.npy"), args.rows, args.dim, args.k)
        print(f"wrote {args.rows:,} x {args.dim} float16 ({x.nbytes / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        sample = np.sort(rng.choice(len(x), size=min(20_000, len(x)), replace=False))
        centres = kmeans.kmeans_pp(x[sample], args.k, rng)
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = kmeans.fit_kmeans(x, args.k, seed=0)
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        kmeans.assign_with_distances(x, r["centroids"])
        t_assign = time.perf_counter() - t0
        t0 = time.perf_counter()
        c = r["centroids"].astype(np.float32)
        cc = (c * c).sum(1)
        for i in range(0, len(x), 8192):  # baseline: the same pass in numpy
            b = np.asarray(x[i : i + 8192], np.float32)
            np.argmin(cc[None] - 2.0 * b @ c.T, axis=1)
        t_numpy = time.perf_counter() - t0
        del centres
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    per_row = t_assign / args.rows
    fixed = t_fit - t_assign
    sizes = r["sizes"]
    print(f"device: {jax.devices()[0].device_kind} ({jax.device_count()} devices)")
    print(
        f"fit_kmeans total {t_fit:.1f} s: k-means++ on 20,000 rows {t_init:.1f} s, mini-batch steps + init "
        f"{fixed:.1f} s (independent of N), assignment pass {t_assign:.1f} s ({args.rows / t_assign:,.0f} rows/s)"
    )
    print(f"numpy float32 assignment pass (baseline) {t_numpy:.1f} s: ratio {t_numpy / t_assign:.2f}x")
    print(f"cluster sizes min {sizes.min()} median {int(np.median(sizes))} max {sizes.max()}; peak RSS {rss:.2f} GB")
    print(f"extrapolated to 2,000,000 x {args.dim}: {fixed + per_row * 2e6:.0f} s, memory independent of N")


if __name__ == "__main__":
    main()
