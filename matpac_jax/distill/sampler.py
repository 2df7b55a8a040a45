"""Cluster-balanced sampling for S-SONDO (SPEC §6): clip i is drawn with probability ∝ 1 / |cluster(i)|, with
replacement.

Built on ``data.sampling.SeededIndices`` (element ``j`` drawn from a generator keyed by ``(seed, j)``: deterministic,
cheaply sliced per process and worker, resumed exactly from grain's iterator position).

``BalancedIndices(assignments, seed)``: element ``j`` picks a non-empty cluster uniformly, then a clip of it uniformly.
That is the same distribution (P(i) = 1 / (K · |cluster(i)|)) at O(1) per draw.
"""

from __future__ import annotations

import numpy as np

from matpac_jax.data.sampling import SeededIndices


class BalancedIndices(SeededIndices):
    def __init__(self, assignments: np.ndarray, seed: int):
        super().__init__(seed)
        assignments = np.asarray(assignments, np.int64)
        if assignments.ndim != 1 or len(assignments) == 0:
            raise ValueError(f"assignments must be a non-empty 1-D array of cluster ids, got shape {assignments.shape}")
        order = np.argsort(assignments, kind="stable")
        clusters, starts, sizes = np.unique(assignments[order], return_index=True, return_counts=True)
        self._members, self._starts, self._sizes = order, starts, sizes
        self.clusters = clusters

    def __str__(self) -> str:
        return f"BalancedIndices({len(self.clusters)} clusters, seed={self._seed})"

    def draw(self, rng: np.random.Generator) -> int:
        c = int(rng.integers(len(self._sizes)))
        return int(self._members[self._starts[c] + rng.integers(self._sizes[c])])

    def probabilities(self) -> np.ndarray:
        """P(clip i) for every clip: 1 / (number of non-empty clusters × size of i's cluster)."""
        p = np.empty(len(self._members))
        for start, size in zip(self._starts, self._sizes, strict=True):
            p[self._members[start : start + size]] = 1.0 / (len(self._sizes) * size)
        return p
