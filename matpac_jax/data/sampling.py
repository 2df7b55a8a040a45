"""Samplers that draw record indices with replacement (S-SONDO's cluster-balanced one, the AudioSet fine-tuning's
label-weighted one) share one shape, ``SeededIndices``: an infinite grain ``MapDataset`` of record indices whose
element ``j`` is drawn from a generator keyed by ``(seed, j)``. Element ``j`` depends on nothing but the seed and
``j``: the sequence is deterministic, any slice of it (per process, per worker) is cheap, and grain's iterator state
(a position) is all a checkpoint needs to resume it exactly.
"""

from __future__ import annotations

import sys

import grain
import numpy as np


class SeededIndices(grain.MapDataset):
    """Infinite sequence of record indices; element ``j`` is ``self.draw(np.random.default_rng([seed, j]))``.

    Subclasses define ``draw`` (one index from a fresh generator) and ``probabilities`` (P(record i) per record).
    """

    def __init__(self, seed: int):
        super().__init__()
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self._seed = int(seed)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self.draw(np.random.default_rng([self._seed, int(index)]))

    def draw(self, rng: np.random.Generator) -> int:
        raise NotImplementedError

    def probabilities(self) -> np.ndarray:
        raise NotImplementedError
