"""Tests for the built-in synthetic demo corpus (matpac_jax.data.demo)."""

from __future__ import annotations

import numpy as np
import pytest

from matpac_jax.data import CLASS_NAMES, demo_splits, make_demo_corpus
from matpac_jax.evaluate import linear_probe

NUM_CLASSES = len(CLASS_NAMES)


def test_same_seed_gives_bit_identical_corpus():
    a = make_demo_corpus(24, seconds=1.0, seed=3)
    b = make_demo_corpus(24, seconds=1.0, seed=3)
    assert a["waves"].tobytes() == b["waves"].tobytes()
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_different_seed_gives_different_corpus():
    a = make_demo_corpus(24, seconds=1.0, seed=3)
    b = make_demo_corpus(24, seconds=1.0, seed=4)
    assert not np.array_equal(a["waves"], b["waves"])
    # No clip of one seed reappears in the other.
    assert not set(map(bytes, a["waves"])) & set(map(bytes, b["waves"]))


def test_shapes_dtypes_and_class_names():
    d = make_demo_corpus(10, seconds=0.5, sample_rate=8000, seed=0)
    assert d["waves"].shape == (10, 4000)
    assert d["waves"].dtype == np.float32
    assert d["labels"].shape == (10,)
    assert d["labels"].dtype == np.int32
    assert d["class_names"] == CLASS_NAMES
    assert len(CLASS_NAMES) == 8 and len(set(CLASS_NAMES)) == 8


def test_all_classes_present_and_balanced():
    counts = np.bincount(make_demo_corpus(83, seconds=0.5, seed=1)["labels"], minlength=NUM_CLASSES)
    assert counts.shape == (NUM_CLASSES,)
    assert counts.min() >= 10 and counts.max() - counts.min() <= 1


def test_waves_are_finite_bounded_and_not_silent():
    waves = make_demo_corpus(48, seconds=2.0, seed=2)["waves"]
    assert np.all(np.isfinite(waves))
    peaks = np.max(np.abs(waves), axis=1)
    # Every clip is peak-normalised to a random level in [-30, -6] dBFS.
    assert peaks.min() >= 10 ** (-30 / 20) * 0.999
    assert peaks.max() <= 10 ** (-6 / 20) * 1.001
    rms = np.sqrt(np.mean(waves.astype(np.float64) ** 2, axis=1))
    assert rms.min() > 1e-4
    # Clips are not all at the same level: loudness carries no class information.
    assert peaks.max() / peaks.min() > 4.0


def test_splits_are_disjoint_and_deterministic():
    train, test = demo_splits(32, 16, seconds=1.0, seed=0)
    assert train["waves"].shape == (32, 16000) and test["waves"].shape == (16, 16000)
    assert not set(map(bytes, train["waves"])) & set(map(bytes, test["waves"]))
    assert not np.array_equal(train["waves"][:16], test["waves"])
    train2, test2 = demo_splits(32, 16, seconds=1.0, seed=0)
    np.testing.assert_array_equal(train["waves"], train2["waves"])
    np.testing.assert_array_equal(test["waves"], test2["waves"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_clips": 0}, "num_clips"),
        ({"num_clips": 4, "seconds": 0.0}, "seconds"),
        ({"num_clips": 4, "sample_rate": 100}, "sample_rate"),
        ({"num_clips": 4, "seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_demo_corpus(**kwargs)


# --- learnability sanity check with hand-made features --------------------------------------------


def _band_log_power(waves: np.ndarray, sample_rate: int = 16000, n_fft: int = 512, hop: int = 256) -> np.ndarray:
    """[clips, frames, 24] log power in log-spaced frequency bands (numpy STFT, batched for memory)."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = np.geomspace(60.0, sample_rate / 2, 25)
    band_of_bin = np.digitize(freqs, edges) - 1
    pool = np.stack([(band_of_bin == k) for k in range(24)], axis=1).astype(np.float64)  # [bins, 24]
    n_frames = 1 + (waves.shape[1] - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    window = np.hanning(n_fft)
    out = []
    for chunk in np.array_split(waves.astype(np.float64), max(1, len(waves) // 64)):
        spec = np.fft.rfft(chunk[:, idx] * window, axis=-1)
        power = spec.real**2 + spec.imag**2  # [clips, frames, bins]
        bands = (power.reshape(-1, power.shape[-1]) @ pool).reshape(*power.shape[:2], -1)
        out.append(np.log(bands + 1e-10))
    return np.concatenate(out)


def _average_spectrum_features(lp: np.ndarray) -> np.ndarray:
    """Time-averaged log band power only (what a bag-of-spectra model sees)."""
    return np.log(np.exp(lp).mean(axis=1) + 1e-10)


def _rich_features(lp: np.ndarray) -> np.ndarray:
    """Average spectrum plus temporal statistics: band variability, energy modulation, centroid drift."""
    power = np.exp(lp)
    energy = np.log(power.sum(-1) + 1e-10)  # frame log energy [clips, frames]
    d_energy = np.diff(energy, axis=1)
    centroid = (power * np.arange(lp.shape[-1])).sum(-1) / (power.sum(-1) + 1e-10)
    d_centroid = np.diff(centroid, axis=1)
    loud = np.exp(energy - energy.max(axis=1, keepdims=True))[:, 1:]  # weight drift by loudness
    scalars = np.stack(
        [
            energy.std(1),
            np.abs(d_energy).mean(1),
            d_energy.std(1),
            np.percentile(energy, 90, axis=1) - np.percentile(energy, 10, axis=1),
            (d_centroid * loud).sum(1) / loud.sum(1),
            np.abs(d_centroid).mean(1),
        ],
        axis=-1,
    )
    return np.concatenate(
        [_average_spectrum_features(lp), lp.std(1), np.abs(np.diff(lp, axis=1)).mean(1), scalars], axis=-1
    )


@pytest.fixture(scope="module")
def hand_feature_accuracies() -> dict:
    train, test = demo_splits(480, 240, seconds=3.0, seed=0)
    lp_train, lp_test = _band_log_power(train["waves"]), _band_log_power(test["waves"])
    accs = {}
    for name, fn in (("average", _average_spectrum_features), ("rich", _rich_features)):
        result = linear_probe(
            fn(lp_train), train["labels"], fn(lp_test), test["labels"], num_classes=NUM_CLASSES, lr=1e-2
        )
        accs[name] = result["test_accuracy"]
    return accs


def test_corpus_is_learnable_from_hand_features_but_not_trivially(hand_feature_accuracies):
    chance = 1.0 / NUM_CLASSES
    rich = hand_feature_accuracies["rich"]
    assert rich > 3 * chance, hand_feature_accuracies
    assert rich < 0.97, hand_feature_accuracies  # not trivially separable


def test_average_spectrum_alone_is_far_from_enough(hand_feature_accuracies):
    # Design goal: classes differ mostly in temporal / harmonic structure, so their time-averaged
    # spectra overlap. The average spectrum is informative (> 2x chance) but clearly worse than features
    # that also look at temporal structure.
    chance = 1.0 / NUM_CLASSES
    average, rich = hand_feature_accuracies["average"], hand_feature_accuracies["rich"]
    assert average > 2 * chance, hand_feature_accuracies
    assert average < 0.65, hand_feature_accuracies
    assert rich > average + 0.15, hand_feature_accuracies
