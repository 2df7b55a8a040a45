"""Deterministic built-in synthetic audio corpus for demos, smoke tests and examples.

The corpus is made of eight classes of synthetic sound events. It is designed so that the classes are
*not* trivially separable from their time-averaged spectrum: every class draws its pitch / centre
frequency / noise colour from the same overlapping ranges, and every event uses the same random
amplitude envelope, so what distinguishes the classes is mostly temporal structure (direction of a
sweep, periodic amplitude or frequency modulation, regular clicks vs. irregular bursts) and harmonic
pattern (all harmonics vs. odd harmonics only). Loudness carries no class information: each clip is
peak-normalised to a random level between -30 and -6 dBFS, and a little coloured background noise is
added to every clip.

Everything is generated with numpy from a seed, so the same arguments always give bit-identical
output (on a given numpy version).
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLASS_NAMES", "make_demo_corpus", "demo_splits"]

CLASS_NAMES: tuple[str, ...] = (
    "harmonic_tone",  # steady tone with all harmonics (sawtooth-like, random spectral tilt)
    "odd_harmonic_tone",  # steady tone with odd harmonics only (clarinet-like), same pitch range
    "chirp_up",  # harmonic tone whose pitch glides exponentially upward over the event
    "chirp_down",  # the same glide, downward: same average spectrum as chirp_up
    "am_tone",  # harmonic tone with periodic tremolo (amplitude modulation, 3-12 Hz)
    "fm_tone",  # harmonic tone with periodic vibrato (frequency modulation, 3-9 Hz)
    "noise_burst",  # coloured (white..brown) noise shaped only by the event envelope
    "click_train",  # the same coloured noise gated into regular short clicks (3-25 clicks per second)
)

# Shared parameter ranges (all classes draw from the same ranges so their average spectra overlap).
_F0_RANGE = (110.0, 880.0)  # Hz, log-uniform; centre pitch of tonal events
_EVENT_SECONDS = (0.3, 1.4)  # event duration
_MAX_EVENTS = 3  # 1..3 events per clip
_WAVETABLE_SIZE = 2048
_NOISE_BANK_SECONDS = 60.0


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _time(n: int, sample_rate: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32) * np.float32(1.0 / sample_rate)


def _envelope(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """Random attack / decay / release envelope of length ``n`` (shared by all classes)."""
    t = _time(n, sample_rate)
    dur = n / sample_rate
    attack = rng.uniform(0.005, 0.08)
    release = rng.uniform(0.02, 0.3)
    decay_rate = rng.uniform(0.0, 2.0)  # 1/s; 0 = flat sustain
    env = np.minimum(np.float32(1.0 / attack) * t, np.float32(1.0))
    env *= np.clip(np.float32(1.0 / release) * (np.float32(dur) - t), 0.0, 1.0)
    env *= np.exp(np.float32(-decay_rate) * t)
    return env


class _NoiseBank:
    """White, pink and brown noise (unit RMS, one long seeded draw each) to slice coloured noise from.

    Drawing noise by FFT-shaping for every event would dominate the generation time, so a corpus draws
    one long stretch of each colour once and every noise segment is a random slice of a random mixture
    of the three, which gives a continuum of spectral slopes between white (1/f^0) and brown (1/f^2).
    """

    def __init__(self, rng: np.random.Generator, length: int, sample_rate: int) -> None:
        f = np.fft.rfftfreq(length, 1.0 / sample_rate)
        spec = np.fft.rfft(rng.standard_normal(length))
        bank = []
        for alpha in (0.0, 1.0, 2.0):
            x = np.fft.irfft(spec * np.maximum(f, 30.0) ** (-alpha / 2.0), length)
            bank.append(x / np.sqrt(np.mean(x**2)))
        self.bank = np.stack(bank).astype(np.float32)  # [3, length]
        self.length = length

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Unit-RMS noise of length ``n`` with a random colour between white and brown."""
        weights = rng.dirichlet(np.full(3, 0.7)).astype(np.float32)
        start = int(rng.integers(0, self.length - n + 1))
        seg = self.bank[:, start : start + n]
        # Explicit products (not a BLAS matmul) keep the result bit-identical regardless of BLAS threads.
        x = weights[0] * seg[0] + weights[1] * seg[1] + weights[2] * seg[2]
        if rng.uniform() < 0.5:
            x = x[::-1]
        return x * np.float32(1.0 / (np.sqrt(np.mean(x**2)) + 1e-12))


def _wavetable(rng: np.random.Generator, odd_only: bool, max_harmonics: int) -> np.ndarray:
    """One period of a band-limited harmonic waveform with random tilt and per-harmonic jitter."""
    n_harm = int(rng.integers(4, 17))
    n_harm = max(1, min(n_harm, max_harmonics))
    k = np.arange(1, n_harm + 1)
    tilt = rng.uniform(0.5, 1.8)
    amps = k ** (-tilt) * rng.uniform(0.5, 1.0, size=n_harm)
    if odd_only:
        amps = np.where(k % 2 == 1, amps, 0.0)
    spec = np.zeros(_WAVETABLE_SIZE // 2 + 1, dtype=np.complex128)
    spec[1 : n_harm + 1] = amps * np.exp(1j * rng.uniform(0.0, 2.0 * np.pi, size=n_harm))
    table = np.fft.irfft(spec, _WAVETABLE_SIZE)
    return table / (np.max(np.abs(table)) + 1e-12)


def _lookup(table: np.ndarray, phase_cycles: np.ndarray) -> np.ndarray:
    """Linear-interpolated wavetable lookup at (non-negative) phases given in cycles."""
    pos = phase_cycles * _WAVETABLE_SIZE
    i0 = pos.astype(np.int64)
    frac = (pos - i0).astype(np.float32)
    i0 &= _WAVETABLE_SIZE - 1  # the table size is a power of two
    slope = (np.roll(table, -1) - table).astype(np.float32)
    return table.astype(np.float32)[i0] + slope[i0] * frac


def _tonal_event(rng: np.random.Generator, label: int, n: int, sample_rate: int) -> np.ndarray:
    """Tonal events (classes 0-5): an instantaneous-frequency track read through a harmonic wavetable."""
    t = _time(n, sample_rate)
    f0 = _log_uniform(rng, *_F0_RANGE)
    amp = None
    name = CLASS_NAMES[label]
    if name in ("chirp_up", "chirp_down"):
        octaves = rng.uniform(0.8, 2.0)
        direction = 1.0 if name == "chirp_up" else -1.0
        # f0 is the geometric centre of the sweep, so up and down cover the same frequency range.
        k = np.float32(direction * octaves * np.log(2.0) / max(float(t[-1]), 1e-9))
        freq = np.float32(f0 * 2.0 ** (-0.5 * direction * octaves)) * np.exp(k * t)
    elif name == "fm_tone":
        rate = rng.uniform(3.0, 9.0)
        depth = rng.uniform(0.7, 2.5)  # semitones
        lfo = np.sin(np.float32(2.0 * np.pi * rate) * t + np.float32(rng.uniform(0, 2 * np.pi)))
        freq = np.float32(f0) * np.exp(np.float32(depth / 12.0 * np.log(2.0)) * lfo)
    else:
        freq = np.full(n, f0, dtype=np.float32)
        if name == "am_tone":
            rate = rng.uniform(3.0, 12.0)
            depth = rng.uniform(0.7, 1.0)
            lfo = np.cos(np.float32(2.0 * np.pi * rate) * t + np.float32(rng.uniform(0, 2 * np.pi)))
            amp = np.float32(1.0 - 0.5 * depth) + np.float32(0.5 * depth) * lfo
    max_harm = int(0.45 * sample_rate / np.max(freq))
    table = _wavetable(rng, odd_only=(name == "odd_harmonic_tone"), max_harmonics=max_harm)
    phase = np.cumsum(freq, dtype=np.float64) * (1.0 / sample_rate) + rng.uniform()
    out = _lookup(table, phase)
    return out if amp is None else out * amp


def _noise_event(rng: np.random.Generator, label: int, n: int, sample_rate: int, noise: _NoiseBank) -> np.ndarray:
    """Noise events (classes 6-7): coloured noise, optionally gated into a regular click train."""
    x = noise.draw(rng, n)
    if CLASS_NAMES[label] == "click_train":
        rate = _log_uniform(rng, 3.0, 25.0)
        tau = rng.uniform(0.002, 0.012)  # click decay time (s)
        period = 1.0 / rate
        t = _time(n, sample_rate) + np.float32(rng.uniform(0.0, period))
        gate = np.exp(np.float32(-1.0 / tau) * np.mod(t, np.float32(period)))
        x = x * gate * np.float32(1.0 / (np.sqrt(np.mean(gate**2)) + 1e-12))
    return x


def _make_clip(rng: np.random.Generator, label: int, clip: np.ndarray, sample_rate: int, noise: _NoiseBank) -> None:
    """Synthesise one clip of class ``label`` in place into the float32 buffer ``clip``."""
    num_samples = clip.shape[0]
    clip[:] = 0.0
    n_events = int(rng.integers(1, _MAX_EVENTS + 1))
    for _ in range(n_events):
        dur = rng.uniform(*_EVENT_SECONDS)
        n = max(16, min(num_samples, int(dur * sample_rate)))
        start = int(rng.integers(0, num_samples - n + 1))
        if label < 6:
            ev = _tonal_event(rng, label, n, sample_rate)
        else:
            ev = _noise_event(rng, label, n, sample_rate, noise)
        ev *= np.float32(rng.uniform(0.5, 1.0) / (np.max(np.abs(ev)) + 1e-12))
        ev *= _envelope(rng, n, sample_rate)
        clip[start : start + n] += ev
    peak = np.max(np.abs(clip)) + 1e-12
    bg_db = rng.uniform(-45.0, -25.0)  # background noise RMS relative to the event peak
    clip += noise.draw(rng, num_samples) * np.float32(peak * 10.0 ** (bg_db / 20.0))
    gain_db = rng.uniform(-30.0, -6.0)  # peak level in dBFS
    clip *= np.float32(10.0 ** (gain_db / 20.0) / np.max(np.abs(clip)))


def make_demo_corpus(num_clips: int, seconds: float = 3.0, sample_rate: int = 16000, seed: int = 0) -> dict:
    """Generate a deterministic synthetic audio corpus with ``len(CLASS_NAMES)`` balanced classes.

    Args:
        num_clips: number of clips (>= 1). Labels are balanced: each class gets
            ``num_clips // num_classes`` or one more clip, in a seeded random order.
        seconds: clip duration in seconds (> 0).
        sample_rate: sampling rate in Hz (>= 4000).
        seed: non-negative integer seed; the same arguments always produce bit-identical output.

    Returns:
        ``{'waves': float32 [num_clips, samples], 'labels': int32 [num_clips], 'class_names': tuple}``
        where ``samples = round(seconds * sample_rate)`` and every wave has its peak in [-30, -6] dBFS.
    """
    if int(num_clips) != num_clips or num_clips < 1:
        raise ValueError(f"num_clips must be a positive integer, got {num_clips!r}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    if int(sample_rate) != sample_rate or sample_rate < 4000:
        raise ValueError(f"sample_rate must be an integer >= 4000, got {sample_rate!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    num_clips, sample_rate = int(num_clips), int(sample_rate)
    num_samples = int(round(seconds * sample_rate))
    if num_samples < 64:
        raise ValueError(f"seconds * sample_rate must give at least 64 samples, got {num_samples}")

    num_classes = len(CLASS_NAMES)
    root = np.random.SeedSequence([int(seed), 0x6D617470])  # mixes in a fixed tag ("matp")
    label_seq, noise_seq, clips_seq = root.spawn(3)
    labels = np.random.default_rng(label_seq).permutation(np.arange(num_clips) % num_classes)
    bank_len = 1 << int(np.ceil(np.log2(max(_NOISE_BANK_SECONDS * sample_rate, 4 * num_samples))))
    noise = _NoiseBank(np.random.default_rng(noise_seq), bank_len, sample_rate)
    waves = np.empty((num_clips, num_samples), dtype=np.float32)
    for i, clip_seq in enumerate(clips_seq.spawn(num_clips)):
        _make_clip(np.random.default_rng(clip_seq), int(labels[i]), waves[i], sample_rate, noise)
    return {"waves": waves, "labels": labels.astype(np.int32), "class_names": CLASS_NAMES}


def demo_splits(
    num_train: int, num_test: int, seconds: float = 3.0, seed: int = 0, sample_rate: int = 16000
) -> tuple[dict, dict]:
    """Return ``(train, test)`` corpora generated from two different seeds derived from ``seed``.

    The two splits are independent draws (no clip is shared); each is a dict as returned by
    :func:`make_demo_corpus`.
    """
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    train_seed, test_seed = (
        int(s) for s in np.random.SeedSequence([int(seed), 0x73706C74]).generate_state(2, dtype=np.uint32)
    )
    train = make_demo_corpus(num_train, seconds=seconds, sample_rate=sample_rate, seed=train_seed)
    test = make_demo_corpus(num_test, seconds=seconds, sample_rate=sample_rate, seed=test_seed)
    return train, test
