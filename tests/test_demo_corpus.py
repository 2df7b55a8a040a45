"""Tests for the built-in synthetic demo corpus (matpac_jax.data.demo)."""

from __future__ import annotations

import numpy as np
import pytest

from matpac_jax.data.demo import CLASS_NAMES, demo_splits, make_demo_corpus
from matpac_jax.evaluate import probe_split

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


def _bag_of_frames(lp: np.ndarray) -> np.ndarray:
    """Mean and std over time of the log band power: blind to the order of events."""
    return np.concatenate([lp.mean(1), lp.std(1)], axis=-1)


def _order_features(lp: np.ndarray) -> np.ndarray:
    """Bag of frames plus the time slopes (over loud frames) of spectral centroid and spectral flatness."""
    power = np.exp(lp)
    energy = np.log(power.sum(-1) + 1e-10)
    loud = (energy > energy.max(axis=1, keepdims=True) - 3.0).astype(np.float64)  # within ~13 dB of the peak
    centroid = (power * np.arange(lp.shape[-1])).sum(-1) / (power.sum(-1) + 1e-10)
    flatness = lp.mean(-1) - np.log(power.mean(-1) + 1e-10)
    t = np.arange(lp.shape[1], dtype=np.float64)

    def slope(y):
        w = loud / loud.sum(1, keepdims=True)
        tm = (w * t).sum(1, keepdims=True)
        ym = (w * y).sum(1, keepdims=True)
        return (w * (t - tm) * (y - ym)).sum(1) / ((w * (t - tm) ** 2).sum(1) + 1e-10)

    return np.concatenate([_bag_of_frames(lp), np.stack([slope(centroid), slope(flatness)], -1)], axis=-1)


MIRRORED = (("rise2", "fall2"), ("rise3", "fall3"), ("tone_noise", "noise_tone"))


@pytest.fixture(scope="module")
def pair_accuracies() -> dict:
    """Binary probe accuracy on each pair of classes that hold the same events in opposite orders."""
    train, test = demo_splits(960, 480, seconds=2.0, seed=0)
    lp_train, lp_test = _band_log_power(train["waves"]), _band_log_power(test["waves"])
    accs = {}
    for a, b in MIRRORED:
        ia, ib = CLASS_NAMES.index(a), CLASS_NAMES.index(b)
        tr = np.isin(train["labels"], (ia, ib))
        te = np.isin(test["labels"], (ia, ib))
        for name, fn in (("bag", _bag_of_frames), ("order", _order_features)):
            x = np.concatenate([fn(lp_train[tr]), fn(lp_test[te])])
            y = np.concatenate([train["labels"][tr] == ib, test["labels"][te] == ib]).astype(np.int64)
            n = int(tr.sum())
            runs = probe_split(x, y, np.arange(n), np.arange(n, len(y)), multilabel=False, num_classes=2, seeds=(0,),
                               val_fraction=0.2, lr=1e-2, eval_every=20)  # fmt: skip
            accs[(a, name)] = runs[0]["test"]
    return accs


def test_order_blind_features_cannot_tell_mirrored_patterns_apart(pair_accuracies):
    for a, _ in MIRRORED:
        assert pair_accuracies[(a, "bag")] < 0.7, pair_accuracies


def test_the_order_of_events_identifies_mirrored_patterns(pair_accuracies):
    for a, _ in MIRRORED:
        assert pair_accuracies[(a, "order")] > 0.8, pair_accuracies
