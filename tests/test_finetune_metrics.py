"""AudioSet evaluation: macro mAP / AUC against scikit-learn (the metric of the published code), classes without a
positive counted as EVAR counts them, d′ by hand, and the clip bootstrap (its resampled metrics against scikit-learn
on resampled arrays, seeded, containing the value, narrowing with more clips, covering at its stated rate).

References, read at these commits:
  AST   YuanGongND/ast@31088be8 src/utilities/stats.py:6-9 (d_prime = norm.ppf(auc) * sqrt(2)), :32-36 (per-class
        metrics.average_precision_score and metrics.roc_auc_score); src/traintest.py:178-179 (mAP, mAUC = means over
        classes), :194 (d_prime(mAUC))
  EVAR  nttcslab/eval-audio-repr@88ba7728 finetune.py:129-133 (eval_map: the same scikit-learn calls), the evaluation
        M2D's AS-2M fine-tuning runs (nttcslab/m2d@f0c4128d util/ft-as2m.sh:25)
"""

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from matpac_jax.finetune.metrics import (
    _blocks,
    _rank_blocks,
    bootstrap_ci,
    classes_without_positive,
    d_prime,
    evaluate_scores,
)


def _scores_and_targets(n=400, c=12, decimals=None, seed=0):
    """Scores [n, c] weakly tied to multi-hot targets with class prevalences from 1 % to 40 %; the last two classes
    have no positive; ``decimals`` rounds the scores (many ties, positives tied with negatives)."""
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.01, 0.4, c)
    targets = (rng.random((n, c)) < prevalence).astype(np.float32)
    targets[:, -2:] = 0
    scores = rng.normal(size=(n, c)) + 1.2 * targets
    return (scores if decimals is None else np.round(scores, decimals)), targets


def _sklearn_macro(scores, targets):
    """mAP as EVAR's eval_map (finetune.py:130-133): scikit-learn's per-class AP, 0 for a class without a positive
    ("No positive class found", warned), averaged over every class; AUC per class (AST stats.py:36) averaged over the
    classes where it is defined (the published code has no AUC for the others: nan, or ValueError before 2024)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m_ap = average_precision_score(targets, scores, average=None).mean()
    aucs = [roc_auc_score(y, x) for y, x in zip(targets.T, scores.T, strict=True) if 0 < y.sum() < len(y)]
    return m_ap, np.mean(aucs)


def test_map_and_auc_match_scikit_learn_on_distinct_scores():
    """AST stats.py:32-36 and traintest.py:178-179, EVAR finetune.py:130-133: mean over classes of scikit-learn's
    per-class AP and AUC; the two classes of twelve without a positive count AP 0 in the mAP (scikit-learn's AP of
    such a class, averaged in by EVAR's eval_map) and have no AUC."""
    scores, targets = _scores_and_targets()
    m_ap, auc = _sklearn_macro(scores, targets)
    out = evaluate_scores(scores, targets)
    assert out["mAP"] == pytest.approx(m_ap, rel=1e-9)
    assert out["AUC"] == pytest.approx(auc, rel=1e-9)
    assert classes_without_positive(targets) == 2
    with_positive = evaluate_scores(scores[:, :-2], targets[:, :-2])
    assert out["mAP"] == pytest.approx(with_positive["mAP"] * 10 / 12, rel=1e-12)
    assert out["AUC"] == with_positive["AUC"]


def test_auc_matches_scikit_learn_with_ties_and_one_sided_classes():
    """Ties count one half, as scikit-learn's trapezoid (roc_auc_score, AST stats.py:36); a class that is positive on
    every clip has no AUC and is left out, like the classes without a positive."""
    scores, targets = _scores_and_targets(decimals=1)
    targets[:, 0] = 1
    assert len(np.unique(scores[:, 3])) < len(scores) / 4  # heavily tied
    _, auc = _sklearn_macro(scores, targets)
    assert evaluate_scores(scores, targets)["AUC"] == pytest.approx(auc, rel=1e-9)


def test_map_scores_tied_clips_at_one_threshold():
    """mAP is the linear probe's mean_average_precision (matpac_jax/evaluate/harness.py), which scores a run of tied
    clips at one threshold as scikit-learn does (AST stats.py:32-33). Here a negative ties with the second positive:
    both count at once (precisions 1, 2/3), whichever comes first in clip order."""
    scores = np.array([[0.9], [0.5], [0.5], [0.1]])
    targets = np.array([[1], [1], [0], [0]])
    assert evaluate_scores(scores, targets)["mAP"] == pytest.approx((1 + 2 / 3) / 2)
    assert evaluate_scores(scores[[0, 2, 1, 3]], targets[[0, 2, 1, 3]])["mAP"] == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision_score(targets[:, 0], scores[:, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # AUC: the tied pair counts one half, 3.5 of the 4 positive-negative pairs
    assert evaluate_scores(scores, targets)["AUC"] == pytest.approx(3.5 / 4)


def test_d_prime_by_hand():
    """AST stats.py:6-9: d′ = sqrt(2) · Φ⁻¹(AUC), of the macro AUC (traintest.py:194). Φ(1) = (1 + erf(1/√2)) / 2
    gives d′ = √2; Φ⁻¹(0.975) = 1.959963984540054 (standard normal table)."""
    assert d_prime(0.5) == 0.0
    assert d_prime(0.5 * (1 + math.erf(1 / math.sqrt(2)))) == pytest.approx(math.sqrt(2), rel=1e-9)
    assert d_prime(0.975) == pytest.approx(1.959963984540054 * math.sqrt(2), rel=1e-9)
    assert d_prime(0.025) == pytest.approx(-1.959963984540054 * math.sqrt(2), rel=1e-9)
    assert d_prime(1.0) == math.inf and d_prime(0.0) == -math.inf and math.isnan(d_prime(float("nan")))
    scores, targets = _scores_and_targets()
    out = evaluate_scores(scores, targets)
    assert out["d_prime"] == d_prime(out["AUC"])


def test_resampled_metrics_equal_scikit_learn_on_the_resampled_clips():
    """A bootstrap resample is scored with clip i weighing the number of times it was drawn; that equals scikit-learn
    (AST stats.py:32-36) on the resampled arrays themselves, ties included (a clip's copies tie)."""
    scores, targets = _scores_and_targets(decimals=1, seed=3)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, len(scores), len(scores))
    ap, auc = _blocks(_rank_blocks(scores, targets.astype(bool)), np.bincount(idx, minlength=len(scores)))
    m_ap, m_auc = _sklearn_macro(scores[idx], targets[idx])
    assert np.nan_to_num(ap).mean() == pytest.approx(m_ap, rel=1e-9)
    assert np.nanmean(auc) == pytest.approx(m_auc, rel=1e-9)
    # and unit weights: scikit-learn on the clips as they are
    ap, auc = _blocks(_rank_blocks(scores, targets.astype(bool)), np.ones(len(scores), np.int64))
    assert (np.nan_to_num(ap).mean(), np.nanmean(auc)) == pytest.approx(_sklearn_macro(scores, targets), rel=1e-9)


def test_bootstrap_interval_holds_the_value_and_is_fixed_by_the_seed():
    """(value, low, high) per metric: the value is evaluate_scores', the interval around it (AUC and d′: percentile;
    mAP: percentile re-centred on the value); one seed, one interval; another seed, another."""
    scores, targets = _scores_and_targets(n=1000)
    point = evaluate_scores(scores, targets)
    ci = bootstrap_ci(scores, targets, n_resamples=200, seed=0)
    assert set(ci) == {"mAP", "AUC", "d_prime"}
    for name, (value, low, high) in ci.items():
        assert value == point[name]
        assert low < value < high, name
    assert ci["d_prime"][1:] == pytest.approx((d_prime(ci["AUC"][1]), d_prime(ci["AUC"][2])), rel=1e-3)
    assert bootstrap_ci(scores, targets, n_resamples=200, seed=0) == ci
    assert bootstrap_ci(scores, targets, n_resamples=200, seed=1) != ci


def test_bootstrap_interval_narrows_with_more_clips():
    """The interval's width shrinks about as 1 / sqrt(clips): 16 times the clips, about a quarter of the width."""
    small, large = _scores_and_targets(n=500, seed=2), _scores_and_targets(n=8000, seed=2)
    ci_small = bootstrap_ci(*small, n_resamples=100)
    ci_large = bootstrap_ci(*large, n_resamples=100)
    for name in ("mAP", "AUC"):
        width_small, width_large = ci_small[name][2] - ci_small[name][1], ci_large[name][2] - ci_large[name][1]
        assert width_large < width_small / 2.5, name


def test_bad_inputs_are_named():
    scores, targets = _scores_and_targets(n=20)
    with pytest.raises(ValueError, match="one shape"):
        evaluate_scores(scores, targets[:, :3])
    with pytest.raises(ValueError, match="one shape"):
        evaluate_scores(scores[:0], targets[:0])
    with pytest.raises(ValueError, match="multi-hot"):
        evaluate_scores(scores, targets * 0.5)
    with pytest.raises(ValueError, match="nan or inf"):
        evaluate_scores(np.where(scores > 2, np.nan, scores), targets)
    with pytest.raises(ValueError, match="n_resamples >= 2"):
        bootstrap_ci(scores, targets, n_resamples=1)
    with pytest.raises(ValueError, match="0 < level < 1"):
        bootstrap_ci(scores, targets, level=95)


_PREVALENCE = np.geomspace(0.005, 0.1, 32)


def _weak_model_set(rng, n=1000, shift=0.5):
    """A fresh evaluation set of a weak model: n clips, 32 classes with 0.5 % to 10 % positives (5 to 100 of 1000),
    a positive's score shifted by half a standard deviation."""
    targets = (rng.random((n, len(_PREVALENCE))) < _PREVALENCE).astype(np.float32)
    return rng.normal(size=targets.shape) + shift * targets, targets


def test_map_interval_holds_its_value_and_covers_the_expected_map_at_its_rate():
    """The 95 % mAP interval contains its value and covers, at about its rate, the expected mAP (the mean mAP of
    evaluation sets of this size drawn afresh: what another such set gives on average), here over 100 sets of a weak
    model with 100 resamples each, and it is not wider than 1.5 × the spread of the mAP over fresh sets.

    How it was checked: this simulation run with 1000 sets of 100 resamples (the expected mAP from 4000 fresh sets):
    the re-centred mAP interval covered 96.4 % and held its value every time; the plain percentile mAP interval (the
    former one, same resamples) covered 70.9 %; AUC's percentile interval 92.2 %. In a second one (2000 clips, 40
    classes, 400 sets of 200 resamples) the re-centred interval covered 96.0 % (weak model, shift 0.5) and 94.0 %
    (shift 2), the plain percentile 64.2 % and 86.8 %."""
    rng = np.random.default_rng(0)
    fresh = np.array([[evaluate_scores(*_weak_model_set(rng))[k] for k in ("mAP", "AUC")] for _ in range(500)])
    expected, spread = fresh.mean(axis=0), fresh.std(axis=0)
    covered, widths = np.zeros(2), []
    for r in range(100):
        ci = bootstrap_ci(*_weak_model_set(rng), n_resamples=100, seed=r)
        value, low, high = ci["mAP"]
        assert low <= value <= high
        covered += [ci[k][1] <= expected[i] <= ci[k][2] for i, k in enumerate(("mAP", "AUC"))]
        widths.append(high - low)
    assert covered[0] / 100 >= 0.9, covered
    assert covered[1] / 100 >= 0.85, covered  # AUC: the percentile interval, unchanged
    assert np.mean(widths) <= 1.5 * 2 * 1.96 * spread[0]  # covering by being wide would fail here
