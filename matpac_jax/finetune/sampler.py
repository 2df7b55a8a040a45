"""Label-frequency weighted sampling for AudioSet-2M fine-tuning: rare classes are drawn as often as common ones.

The published recipe (AST's ``gen_weight_file.py``, copied by AudioMAE's ``gen_weight.py`` and by EVAR's
``make_as_metadata.py``, which M2D's ``util/ft-as2m.sh`` runs)::

    class weight   w_c = 1000 / (count_c + 0.01)          count_c: training clips labelled c
    clip weight    w_i = (sum of w_c over the labels of clip i) ** power

with ``power`` 1 in AST and AudioMAE and 1 / 1.5 in EVAR ("making the weights softer"). EVAR's is our default: M2D
fine-tunes AS-2M through it, and MATPAC's AudioSet checkpoint carries EVAR's head (``TaskHead``: BatchNorm1d without
affine, then a linear layer; SPEC §5).

Two ways to draw, each an infinite grain ``MapDataset`` of record indices whose element ``j`` is a function of the
seed and ``j`` only, so the sequence is deterministic, any slice (per process, per worker) is cheap and grain's
iterator position, saved with every checkpoint, is all that resumes it exactly:

- ``LabelWeightedEpochs(labels, seed, draws)``, EVAR's (the recipe's default): epochs of ``draws`` *distinct* clips.
  EVAR samples AS-2M with ``WeightedRandomSampler(weights, num_samples=200000, replacement=False)``
  (eval-audio-repr evar/data.py:154-155), which the DataLoader iterates anew every epoch (finetune.py:250-251) and
  which calls ``torch.multinomial(weights, 200000, replacement=False)``: one fresh draw of 200,000 distinct clips
  per epoch, a clip at most once per epoch. torch draws it as weighted keys (pytorch aten/src/ATen/native/
  Distributions.cpp ``multinomial``, "Fast-path for no replacement", issue 11931): k_i = w_i / E_i, E_i ~ Exp(1),
  the clips of the ``draws`` largest keys in decreasing key order. That is Efraimidis & Spirakis's A-ES (k_i =
  u_i^(1/w_i), the same order: log k = log(u) / w = −E / w), whose order has the distribution of drawing one clip
  at a time with P ∝ w among those not yet drawn (Efraimidis & Spirakis, "Weighted random sampling with a
  reservoir", Information Processing Letters 97(5), 2006, Theorem 1). Here epoch ``e`` draws its keys from
  ``default_rng([seed, e])`` and element ``j`` is clip ``order_e[j mod draws]`` with ``e = j // draws``.
- ``LabelWeightedIndices(labels, seed)``, AST's and AudioMAE's: with replacement, P(clip i) = w_i / Σ w for every
  draw: element ``j`` inverts the cumulative weights at one uniform number from ``default_rng([seed, j])``
  (a ``SeededIndices`` like S-SONDO's ``BalancedIndices``). It differs from EVAR's only for clips whose weight
  exceeds Σ w / draws, which EVAR's cannot draw twice in an epoch.

``labels`` is a multi-hot [N, C] array or one list of class indices per clip (the compact form for 2 M clips). A clip
without labels gets weight 0 and is never drawn (the references cannot hold one: its empty label string fails their
class lookup).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grain
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


def weighted_order(weights: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws`` distinct indices [draws] (int64) in draw order, sampled without replacement with P ∝ ``weights``:
    the ``draws`` largest keys w_i / E_i, E_i ~ Exp(1), in decreasing order (torch's ``multinomial`` without
    replacement). Zero weights have key 0 and come after every positive one."""
    with np.errstate(divide="ignore"):  # E = 0 (probability 2^-53) gives key inf: drawn first, as in torch
        keys = weights / rng.standard_exponential(len(weights))
    top = np.argpartition(-keys, draws - 1)[:draws] if draws < len(keys) else np.arange(len(keys))
    return top[np.argsort(-keys[top], kind="stable")]


class LabelWeightedEpochs(grain.MapDataset):
    """Record indices in epochs of ``draws`` distinct clips, weighted by ``label_weights(labels, power)``: EVAR's
    ``WeightedRandomSampler(weights, draws, replacement=False)`` renewed every epoch (module docstring).

    The current epoch's order is cached (8 bytes per draw: 1.6 MB for AS-2M's 200,000); a new epoch costs one key per
    clip and a partial sort, ≈ 0.1 s for 2 M clips, in each worker process that reaches it."""

    def __init__(self, labels, seed: int, draws: int, power: float = EVAR_POWER):
        super().__init__()
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.weights = label_weights(labels, power)
        drawable = int(np.count_nonzero(self.weights > 0))
        if drawable == 0:
            raise ValueError("labels: no clip has a label, so no clip can be drawn")
        if not 0 < int(draws) <= drawable:
            what = f"an epoch draws distinct labelled clips, between 1 and the {drawable} there are"
            raise ValueError(f"config.finetune.draws_per_epoch={draws}: {what}; 0 draws with replacement")
        self._seed, self._draws, self._power = int(seed), int(draws), power
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        per_epoch = f"{self._draws} per epoch, power={self._power:.4g}, seed={self._seed}"
        return f"LabelWeightedEpochs({len(self.weights)} clips, {per_epoch})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, pos = divmod(int(index), self._draws)
        if epoch != self._epoch:
            self._order = weighted_order(self.weights, self._draws, np.random.default_rng([self._seed, epoch]))
            self._epoch = epoch
        return int(self._order[pos])

    def probabilities(self) -> np.ndarray:
        """P(clip i is an epoch's first draw): its weight over the sum of all weights."""
        return self.weights / self.weights.sum()
