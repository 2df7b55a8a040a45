"""Deterministic built-in synthetic audio corpus for the demo, smoke tests and examples.

Eight classes of short *patterns* of notes and noise bursts. Every clip draws its own pitch (150–500 Hz), interval
(4–8 semitones), timbre (all or odd harmonics, random spectral tilt), note lengths, gaps, onset, level and background
noise, so no single note, pitch or spectrum identifies a class: what does is the **order** of the events. The pairs
rise2/fall2, rise3/fall3 and tone_noise/noise_tone contain the same events in opposite orders, so a representation
that pools local patch content over time (a random network, or time-averaged spectra) confuses them, while one that
has learned how sounds continue in time can tell them apart. That makes the corpus a small, honest test of whether
self-supervised pretraining learned something an untrained encoder does not have.

Everything is generated with numpy from a seed: the same arguments give bit-identical output (on a given numpy
version).

The training split as record shards (the input of the S-SONDO demo chain; keys ``demo-00000`` ...):

    python -m matpac_jax.data.demo --output=/tmp/demo_corpus [--num-train=800 --num-test=800 --seconds=2 --seed=0
        --sample-rate=32000 --num-shards=2]
"""

from __future__ import annotations

import argparse

import numpy as np

from matpac_jax.data.records import ClipRecord, encode_record, shard_name, write_shard

__all__ = ["CLASS_NAMES", "make_demo_corpus", "demo_splits"]

# Each pattern lists its events in time order: an integer k is a note at pitch f0 · r^k, "n" a noise burst.
PATTERNS: dict[str, tuple] = {
    "rise2": (0, 1),  # low note, then high note
    "fall2": (1, 0),  # the same two notes, high first
    "arch": (0, 1, 0),  # low, high, low
    "valley": (1, 0, 1),  # high, low, high
    "rise3": (0, 1, 2),  # three ascending notes
    "fall3": (2, 1, 0),  # the same three notes, descending
    "tone_noise": (0, "n"),  # a note, then a noise burst
    "noise_tone": ("n", 0),  # a noise burst, then a note
}
CLASS_NAMES: tuple[str, ...] = tuple(PATTERNS)

_F0_RANGE = (150.0, 500.0)  # Hz, log-uniform: the lowest note of a pattern
_INTERVAL_RANGE = (1.25, 1.6)  # frequency ratio between successive pitch steps (4-8 semitones)
_NOTE_SECONDS = (0.18, 0.3)
_GAP_SECONDS = (0.02, 0.08)
_WAVETABLE_SIZE = 2048
_NOISE_BANK_SECONDS = 60.0


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _time(n: int, sample_rate: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32) * np.float32(1.0 / sample_rate)


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


def _note(rng: np.random.Generator, freq: float, n: int, sample_rate: int, table: np.ndarray) -> np.ndarray:
    """A steady note of n samples read through the clip's wavetable, with 10 ms attack and 30 ms release."""
    t = _time(n, sample_rate)
    phase = np.arange(n, dtype=np.float64) * (freq / sample_rate) + rng.uniform()
    return _lookup(table, phase) * _attack_release(t, 0.01, 0.03)


def _attack_release(t: np.ndarray, attack: float, release: float) -> np.ndarray:
    return np.minimum(t * np.float32(1.0 / attack), 1.0) * np.clip((t[-1] - t) * np.float32(1.0 / release), 0.0, 1.0)


def _make_clip(rng: np.random.Generator, label: int, clip: np.ndarray, sample_rate: int, noise: _NoiseBank) -> None:
    """Synthesise one clip of class ``label`` in place into the float32 buffer ``clip``."""
    num_samples = clip.shape[0]
    clip[:] = 0.0
    f0 = _log_uniform(rng, *_F0_RANGE)
    ratio = rng.uniform(*_INTERVAL_RANGE)
    table = _wavetable(rng, odd_only=bool(rng.uniform() < 0.5), max_harmonics=int(0.45 * sample_rate / (f0 * ratio**2)))
    pieces = []
    for event in PATTERNS[CLASS_NAMES[label]]:
        n = int(rng.uniform(*_NOTE_SECONDS) * sample_rate)
        if event == "n":
            burst = noise.draw(rng, n) * _attack_release(_time(n, sample_rate), 0.01, 0.03)
            pieces.append(burst * np.float32(rng.uniform(0.2, 0.4)))
        else:
            pieces.append(_note(rng, f0 * ratio**event, n, sample_rate, table))
        pieces.append(np.zeros(int(rng.uniform(*_GAP_SECONDS) * sample_rate), np.float32))
    pattern = np.concatenate(pieces)[:num_samples]
    start = int(rng.integers(0, num_samples - len(pattern) + 1))
    clip[start : start + len(pattern)] = pattern
    peak = np.max(np.abs(clip)) + 1e-12
    bg_db = rng.uniform(-45.0, -25.0)  # background noise RMS relative to the pattern's peak
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


def demo_embeddings(model, splits, rate: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Clip embeddings by any loaded model of the demo's train + test clips (at ``rate`` Hz): (x [N, D], labels [N],
    number of train clips)."""
    train, test = splits
    x = np.concatenate([model.embed(train["waves"], rate)["clip"], model.embed(test["waves"], rate)["clip"]])
    return x, np.concatenate([train["labels"], test["labels"]]), len(train["labels"])


def write_records(
    output: str, num_train: int, num_test: int, seconds: float, seed: int, sample_rate: int, num_shards: int = 2
) -> list[str]:
    """The training split of ``demo_splits(num_train, num_test, seconds, seed, sample_rate)`` as pcm16 record shards
    (labels included); returns the shard paths."""
    train, _ = demo_splits(num_train, num_test, seconds, seed, sample_rate)
    records = [
        encode_record(ClipRecord(f"demo-{i:05d}", w, sample_rate, (int(y),)))
        for i, (w, y) in enumerate(zip(train["waves"], train["labels"], strict=True))
    ]
    paths = [shard_name(output, s, num_shards) for s in range(num_shards)]
    for s, path in enumerate(paths):
        write_shard(path, records[s::num_shards])
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m matpac_jax.data.demo", description="Write the demo corpus's training split as record shards."
    )
    ap.add_argument("--output", required=True)
    ap.add_argument("--num-train", type=int, default=800)
    ap.add_argument("--num-test", type=int, default=800)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-rate", type=int, default=32_000)
    ap.add_argument("--num-shards", type=int, default=2)
    a = ap.parse_args(argv)
    paths = write_records(a.output, a.num_train, a.num_test, a.seconds, a.seed, a.sample_rate, a.num_shards)
    print(f"{a.num_train} clips of {a.seconds} s at {a.sample_rate} Hz in {len(paths)} shards: {a.output}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
