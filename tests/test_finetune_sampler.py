"""Label-frequency weighted sampling for AudioSet fine-tuning: the published weights, draw frequencies within binomial
error of the weights, a sequence fixed by the seed and each element's position (slices, shards, exact resume)."""

import numpy as np
import pytest
from helpers import assert_resumes_from_iterator_state

from matpac_jax.finetune.sampler import (
    EVAR_POWER,
    LabelWeightedEpochs,
    LabelWeightedIndices,
    label_weights,
    weighted_order,
)

# Published weight code, read at these commits:
#   AST        YuanGongND/ast@31088be8 egs/audioset/gen_weight_file.py:40-56 (sampled in src/run.py:117-118,
#              WeightedRandomSampler(..., replacement=True))
#   AudioMAE   facebookresearch/AudioMAE@da0927c3 dataset/audioset/gen_weight.py:26-40
#   EVAR       nttcslab/eval-audio-repr@88ba7728 evar/utils/make_as_metadata.py:77-93 (sampled in evar/data.py:154-155),
#              run for AS-2M by nttcslab/m2d@f0c4128d util/ft-as2m.sh:25


def _reference_weights(labels: list[list[int]], num_classes: int, power: float) -> np.ndarray:
    """The references' two loops, transcribed: class counts, 1000 / (count + 0.01), summed per clip, ** power."""
    label_count = np.zeros(num_classes)
    for sample_labels in labels:
        for label_idx in sample_labels:
            label_count[label_idx] = label_count[label_idx] + 1
    label_weight = 1000.0 / (label_count + 0.01)
    sample_weight = np.zeros(len(labels))
    for i, sample_labels in enumerate(labels):
        for label_idx in sample_labels:
            sample_weight[i] += label_weight[label_idx]
    return np.power(sample_weight, power)


def _audioset_like(n=3000, num_classes=24, seed=0) -> list[list[int]]:
    """Zipf-like class frequencies, 1-3 labels per clip, and a few clips without a label."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_classes + 1) ** 1.2
    labels = [sorted(rng.choice(num_classes, size=rng.integers(1, 4), replace=False, p=p / p.sum())) for _ in range(n)]
    for i in rng.choice(n, 5, replace=False):
        labels[i] = []
    return labels


def _multi_hot(labels: list[list[int]], num_classes: int = 24) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), np.uint8)
    for i, row in enumerate(labels):
        out[i, row] = 1
    return out


def test_weights_by_hand():
    """1000 / (count + 0.01) per class, summed over a clip's labels (AST gen_weight_file.py:47,56), then ** (1 / 1.5)
    (EVAR make_as_metadata.py:93); power 1 is AST's and AudioMAE's weight."""
    labels = [[0, 1], [1], [1, 2], []]  # counts: class 0 once, class 1 three times, class 2 once
    w0, w1, w2 = 1000 / 1.01, 1000 / 3.01, 1000 / 1.01
    expected = np.array([w0 + w1, w1, w1 + w2, 0.0])
    np.testing.assert_allclose(label_weights(labels, power=1.0), expected, rtol=1e-12)
    np.testing.assert_allclose(label_weights(labels), expected ** (1 / 1.5), rtol=1e-12)
    assert EVAR_POWER == 1 / 1.5


@pytest.mark.parametrize("power", [1.0, EVAR_POWER])
def test_weights_match_the_reference_loops_for_lists_and_multi_hot(power):
    """The transcribed loops of AST gen_weight_file.py:40-56 / EVAR make_as_metadata.py:77-93 on a Zipf-like label
    set; the multi-hot form of the same labels gives the same weights."""
    labels = _audioset_like()
    expected = _reference_weights(labels, 24, power)
    np.testing.assert_allclose(label_weights(labels, power), expected, rtol=1e-12)
    multi_hot = _multi_hot(labels)
    np.testing.assert_allclose(label_weights(multi_hot, power), expected, rtol=1e-12)
    np.testing.assert_allclose(label_weights(multi_hot.astype(bool), power), expected, rtol=1e-12)


def test_class_frequencies_of_200k_draws_match_the_weights():
    """P(clip i) = w_i / Σ w with replacement, as AST's WeightedRandomSampler(weights, N, replacement=True)
    (src/run.py:118): every class's share of 200k draws is within 5 binomial standard errors of Σ_{i labelled c} P(i);
    an unlabelled clip is never drawn."""
    labels = _audioset_like()
    ds = LabelWeightedIndices(labels, seed=7)
    n = 200_000
    draws = np.fromiter((ds[j] for j in range(n)), np.int64, n)
    p = ds.probabilities()
    assert p.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(p, ds.weights / ds.weights.sum(), rtol=1e-12)
    multi_hot = _multi_hot(labels).astype(np.float64)
    expected = p @ multi_hot  # P(the drawn clip carries class c)
    observed = multi_hot[draws].mean(0)
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(observed - expected) < 5 * sigma), (observed - expected) / sigma
    unlabelled = [i for i, row in enumerate(labels) if not row]
    assert not np.isin(draws, unlabelled).any()
    # what the weighting is for: the rarest class is drawn over twice as often as its share of the clips, the most
    # common one less often
    share = multi_hot.mean(0)
    assert expected[-1] > 2 * share[-1] and expected[0] < share[0]


def test_sequence_is_fixed_by_seed_and_position():
    """Element j comes from default_rng([seed, j]): the same seed gives the same sequence, another seed another;
    per-process slices [p::k] interleave back to the whole sequence; grain's iterator state resumes it exactly."""
    labels = _audioset_like(n=500)
    ds = LabelWeightedIndices(labels, seed=11)
    first = [ds[j] for j in range(60)]
    assert first == [LabelWeightedIndices(labels, seed=11)[j] for j in range(60)]
    assert first != [LabelWeightedIndices(labels, seed=12)[j] for j in range(60)]
    shards = [list(ds[p::3][:20]) for p in range(3)]
    assert [x for triple in zip(*shards, strict=True) for x in triple] == first
    assert list(ds[25:40]) == first[25:40]
    assert_resumes_from_iterator_state(ds, first)


def test_unlabelled_clip_gets_weight_zero():
    """The references cannot hold a clip without labels (its empty label string fails their class lookup, AST
    gen_weight_file.py:41-43); here it weighs 0 and is never drawn."""
    labels = [[0], [], [1]]
    np.testing.assert_array_equal(label_weights(labels) == 0, [False, True, False])
    ds = LabelWeightedIndices(labels, seed=0)
    assert ds.probabilities()[1] == 0.0
    assert 1 not in {ds[j] for j in range(2000)}
    # a zero weight at either end of the cumulative weights is never drawn either
    ds = LabelWeightedIndices([[], [0], []], seed=0)
    assert {ds[j] for j in range(500)} == {1}


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match="non-empty"):
        label_weights([])
    with pytest.raises(ValueError, match=r"multi-hot array \[N, C\], got shape \(0, 5\)"):
        label_weights(np.zeros((0, 5)))
    with pytest.raises(ValueError, match="got shape"):
        label_weights(np.ones(5))
    with pytest.raises(ValueError, match="only 0 and 1"):
        label_weights(np.array([[0.0, 0.5]]))
    with pytest.raises(ValueError, match=">= 0"):
        label_weights([[0], [-1]])
    with pytest.raises(ValueError, match="same class twice"):
        label_weights([[0, 0]])
    with pytest.raises(ValueError, match="no clip has a label"):
        LabelWeightedIndices([[], []], seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        LabelWeightedIndices([[0]], seed=-1)


# --- EVAR's epochs of distinct clips: WeightedRandomSampler(weights, 200000, replacement=False) (evar/data.py:155)


def test_epoch_draws_are_distinct_and_never_unlabelled():
    """Within an epoch no clip repeats (torch.multinomial without replacement) and an unlabelled clip never comes;
    the next epoch is a fresh draw (the DataLoader iterates the sampler anew, finetune.py:250-251)."""
    labels = _audioset_like()
    draws = 2500  # of 2995 labelled clips: most of the weight is used up, so repeats would show
    ds = LabelWeightedEpochs(labels, seed=3, draws=draws)
    epochs = [np.fromiter((ds[e * draws + k] for k in range(draws)), np.int64, draws) for e in range(3)]
    unlabelled = [i for i, row in enumerate(labels) if not row]
    for order in epochs:
        assert len(np.unique(order)) == draws and not np.isin(order, unlabelled).any()
    assert not np.array_equal(epochs[0], epochs[1]) and set(epochs[0]) != set(epochs[1])


def test_ordered_pair_frequencies_are_sequential_weighted_sampling():
    """Efraimidis & Spirakis (2006) Theorem 1, as torch draws it (keys w / Exp(1), largest first): an epoch of 2
    draws from weights w is the ordered pair (a, b) with probability w_a / W · w_b / (W − w_a), computed by hand for
    w ∝ (1, 2, 3, 4) (label counts 4, 3, 2, 1 at power 1); 30,000 epochs, every pair within 5 binomial standard
    errors."""
    labels = [[0]] * 4 + [[1]] * 3 + [[2]] * 2 + [[3]]  # class weights 1000 / (count + 0.01)
    ds = LabelWeightedEpochs(labels, seed=5, draws=2, power=1.0)
    w, n = ds.weights, 30_000
    pairs = np.array([(ds[2 * e], ds[2 * e + 1]) for e in range(n)])
    assert np.all(pairs[:, 0] != pairs[:, 1])
    total = w.sum()
    for a in range(len(w)):
        for b in range(len(w)):
            p = 0.0 if a == b else w[a] / total * w[b] / (total - w[a])
            observed = np.mean((pairs[:, 0] == a) & (pairs[:, 1] == b))
            assert abs(observed - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12, (a, b, observed, p)
    first = np.bincount(pairs[:, 0], minlength=len(w)) / n  # an epoch's first draw: P = w / W
    p0 = ds.probabilities()
    assert np.all(np.abs(first - p0) <= 5 * np.sqrt(p0 * (1 - p0) / n))


def test_weighted_order_is_the_top_keys_in_decreasing_order():
    """torch.multinomial(w, k, replacement=False) (aten Distributions.cpp, the no-replacement fast path): q ~ Exp(1),
    the top-k of w / q, sorted decreasing; zero weights last."""
    w = np.array([0.0, 3.0, 1.0, 2.0, 0.5, 0.0, 4.0])
    order = weighted_order(w, 5, np.random.default_rng(0))
    keys = w / np.random.default_rng(0).standard_exponential(len(w))
    assert order.tolist() == np.argsort(-keys, kind="stable")[:5].tolist()
    assert 0 not in order and 5 not in order


def test_epoch_sequence_is_fixed_by_seed_and_position_and_resumes_across_epochs():
    """Element j is clip order_e[j mod draws] of epoch e = j // draws, drawn from default_rng([seed, e]): the same
    seed gives the same sequence, slices [p::k] interleave back to it, and grain's iterator state resumes it exactly,
    here across an epoch boundary (30 draws per epoch, positions 25 to 40)."""
    labels = _audioset_like(n=500)
    ds = LabelWeightedEpochs(labels, seed=11, draws=30)
    first = [ds[j] for j in range(60)]
    assert first == [LabelWeightedEpochs(labels, seed=11, draws=30)[j] for j in range(60)]
    assert first != [LabelWeightedEpochs(labels, seed=12, draws=30)[j] for j in range(60)]
    assert len(set(first[:30])) == 30 and len(set(first[30:])) == 30
    shards = [list(ds[p::3][:20]) for p in range(3)]
    assert [x for triple in zip(*shards, strict=True) for x in triple] == first
    assert_resumes_from_iterator_state(ds, first)


def test_epoch_draws_beyond_the_labelled_clips_are_refused():
    """torch refuses more draws than categories without replacement; here the limit is the labelled clips, named."""
    with pytest.raises(ValueError, match=r"draws_per_epoch=3: .* between 1 and the 2 there are"):
        LabelWeightedEpochs([[0], [], [1]], seed=0, draws=3)
    with pytest.raises(ValueError, match="non-negative"):
        LabelWeightedEpochs([[0]], seed=-1, draws=1)
