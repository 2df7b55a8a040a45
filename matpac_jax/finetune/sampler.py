"""Label-frequency weighted sampling for AudioSet-2M fine-tuning: rare classes are drawn as often as common ones.

The published recipe (AST's ``gen_weight_file.py``, copied by AudioMAE's ``gen_weight.py`` and by EVAR's
``make_as_metadata.py``, which M2D's ``util/ft-as2m.sh`` runs)::

    class weight   w_c = 1000 / (count_c + 0.01)          count_c: training clips labelled c
    clip weight    w_i = (sum of w_c over the labels of clip i) ** power

with ``power`` 1 in AST and AudioMAE and 1 / 1.5 in EVAR ("making the weights softer"). EVAR's is our default: M2D
fine-tunes AS-2M through it, and MATPAC's AudioSet checkpoint carries EVAR's head (``TaskHead``: BatchNorm1d without
affine, then a linear layer; SPEC §5). Clip i is drawn with probability w_i / Σ w, with replacement, as AST and
AudioMAE draw. (EVAR draws 200k distinct clips per epoch, ``WeightedRandomSampler(..., replacement=False)``: a clip
then comes at most once per epoch, which matters only for the few clips whose weight exceeds Σ w / 200k.)

``LabelWeightedIndices(labels, seed)`` is an infinite grain ``MapDataset`` of record indices, a ``SeededIndices``
like S-SONDO's ``BalancedIndices``: element ``j`` inverts the cumulative weights at one uniform number from a generator
keyed by ``(seed, j)`` (``np.searchsorted``, O(log N)), so the sequence is deterministic, any slice is cheap and
grain's iterator position is all a checkpoint needs. ``labels`` is a multi-hot [N, C] array or one list of class
indices per clip (the compact form for 2 M clips). A clip without labels gets weight 0 and is never drawn (the
references cannot hold one: its empty label string fails their class lookup).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from matpac_jax.data.sampling import SeededIndices

CLASS_WEIGHT_SCALE = 1000.0  # the references' numerator; it cancels in the probabilities unless power != 1
COUNT_OFFSET = 0.01  # "to avoid underflow" (AST); keeps w_c finite, far below any real count
EVAR_POWER = 1 / 1.5


def _label_pairs(labels) -> tuple[np.ndarray, np.ndarray, int]:
    """(clip index, class index) of every positive label, and the number of clips."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 2 or labels.shape[0] == 0:
            raise ValueError(f"labels: expected a non-empty multi-hot array [N, C], got shape {labels.shape}")
        if not ((labels == 0) | (labels == 1)).all():
            raise ValueError("labels: a multi-hot array holds only 0 and 1; give soft labels as lists of class indices")
        clips, classes = np.nonzero(labels)
        return clips, classes, labels.shape[0]
    if not isinstance(labels, Sequence) or len(labels) == 0:
        raise ValueError("labels: expected a non-empty multi-hot array [N, C] or a list of class-index lists per clip")
    lengths = np.fromiter((len(row) for row in labels), np.int64, len(labels))
    classes = np.fromiter((c for row in labels for c in row), np.int64, int(lengths.sum()))
    if classes.size and classes.min() < 0:
        raise ValueError(f"labels: class indices must be >= 0, got {classes.min()}")
    clips = np.repeat(np.arange(len(labels)), lengths)
    if len(np.unique(clips * (int(classes.max(initial=0)) + 1) + classes)) != len(classes):
        raise ValueError("labels: a clip lists the same class twice; give each clip's classes once")
    return clips, classes, len(labels)


def label_weights(labels, power: float = EVAR_POWER) -> np.ndarray:
    """Sampling weight of every clip [N] (float64): (Σ_{c ∈ labels(i)} 1000 / (count_c + 0.01)) ** power."""
    clips, classes, n = _label_pairs(labels)
    counts = np.bincount(classes)
    class_weight = CLASS_WEIGHT_SCALE / (counts + COUNT_OFFSET)
    return np.bincount(clips, weights=class_weight[classes], minlength=n) ** power


class LabelWeightedIndices(SeededIndices):
    """Record indices drawn with replacement, P(i) ∝ ``label_weights(labels, power)[i]``."""

    def __init__(self, labels, seed: int, power: float = EVAR_POWER):
        super().__init__(seed)
        self.weights = label_weights(labels, power)
        positive = np.flatnonzero(self.weights > 0)
        if positive.size == 0:
            raise ValueError("labels: no clip has a label, so no clip can be drawn")
        self._cumulative = np.cumsum(self.weights)
        self._last = int(positive[-1])  # u · total can round up to total: the last drawable clip then
        self._power = power

    def __str__(self) -> str:
        return f"LabelWeightedIndices({len(self.weights)} clips, power={self._power:.4g}, seed={self._seed})"

    def draw(self, rng: np.random.Generator) -> int:
        # first i with cumulative[i] > u · total: clip i with probability weights[i] / total; a zero weight never wins
        i = int(np.searchsorted(self._cumulative, rng.random() * self._cumulative[-1], side="right"))
        return min(i, self._last)

    def probabilities(self) -> np.ndarray:
        """P(clip i) for every clip: its weight over the sum of all weights."""
        return self.weights / self.weights.sum()
