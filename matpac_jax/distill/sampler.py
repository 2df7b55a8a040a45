"""Cluster-balanced sampling for S-SONDO (SPEC §6): clip i is drawn with probability ∝ 1 / |cluster(i)|, with
replacement.

``BalancedIndices(assignments, seed)`` is an infinite grain ``MapDataset`` of record indices: element ``j`` picks a
non-empty cluster uniformly, then a clip of it uniformly, from a generator keyed by ``(seed, j)``. That is the same
distribution (P(i) = 1 / (K · |cluster(i)|)) at O(1) per draw, and element ``j`` depends on nothing but the seed and
``j``: the sequence is deterministic, any slice of it (per process, per worker) is cheap, and grain's iterator state
(a position) is all a checkpoint needs to resume it exactly.
"""

from __future__ import annotations

import sys

import grain
import numpy as np


class BalancedIndices(grain.MapDataset):
    def __init__(self, assignments: np.ndarray, seed: int):
        super().__init__()
        assignments = np.asarray(assignments, np.int64)
        if assignments.ndim != 1 or len(assignments) == 0:
            raise ValueError(f"assignments must be a non-empty 1-D array of cluster ids, got shape {assignments.shape}")
        order = np.argsort(assignments, kind="stable")
        clusters, starts, sizes = np.unique(assignments[order], return_index=True, return_counts=True)
        self._members, self._starts, self._sizes = order, starts, sizes
        self.clusters = clusters
        self._seed = int(seed)

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"BalancedIndices({len(self.clusters)} clusters, seed={self._seed})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        rng = np.random.default_rng([self._seed, int(index)])
        c = int(rng.integers(len(self._sizes)))
        return int(self._members[self._starts[c] + rng.integers(self._sizes[c])])

    def probabilities(self) -> np.ndarray:
        """P(clip i) for every clip: 1 / (number of non-empty clusters × size of i's cluster)."""
        p = np.empty(len(self._members))
        for start, size in zip(self._starts, self._sizes, strict=True):
            p[self._members[start : start + size]] = 1.0 / (len(self._sizes) * size)
        return p
