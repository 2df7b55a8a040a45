r"""Time the linear-probe harness on a synthetic task the size of the published ones.

  python bench/probe.py                      # 2,000 clips x 3840-d, 50 classes, 3 seeds: one split and 5 folds
  python bench/probe.py --clips=8000 --classes=10 --folds=10

Embeddings are Gaussian class clusters (``--separation`` sets how hard: 0.3 is learned in a few hundred steps, 0.1
needs the whole ``max_steps`` budget); the figures are wall seconds for
``probe_split`` (one train / test split, every seed in one vmap) and ``evaluate_task`` over ``--folds`` folds,
first call (with compilation) and second call.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax.evaluate.harness import evaluate_task, probe_split  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=3840)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--separation", type=float, default=0.3, help="class-centre scale against unit noise")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, args.classes, args.clips)
    x = (
        rng.normal(size=(args.classes, args.dim))[y] * args.separation + rng.normal(size=(args.clips, args.dim))
    ).astype(np.float32)
    seeds = tuple(range(args.seeds))
    n_train = args.clips * 4 // 5
    print(f"task: {args.clips} clips x {args.dim}, {args.classes} classes, {args.seeds} seeds")
    for label in ("first (compiles)", "second"):
        t0 = time.perf_counter()
        runs = probe_split(x, y, np.arange(n_train), np.arange(n_train, args.clips), multilabel=False,
                           num_classes=args.classes, seeds=seeds)  # fmt: skip
        dt = time.perf_counter() - t0
        steps = [r["val_best_step"] for r in runs]
        print(
            f"one split, {label}: {dt:.2f} s  (accuracy {np.mean([r['test'] for r in runs]):.3f}, best steps {steps})"
        )

    @dataclasses.dataclass
    class Task:
        name = "synthetic"
        labels = y
        class_names = [str(c) for c in range(args.classes)]
        multilabel = False
        metric = "accuracy"
        folds = np.arange(args.clips) % args.folds + 1
        split = None
        mask = None

    t0 = time.perf_counter()
    r = evaluate_task(Task(), x, seeds=seeds)
    print(f"{args.folds} folds x {args.seeds} seeds: {time.perf_counter() - t0:.2f} s  "
          f"(accuracy {r['mean']:.3f} ± {r['ci95']:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
