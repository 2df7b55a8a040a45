"""Tests for the jnp log-mel front end against float64 numpy / librosa references."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import scipy.signal

from matpac_jax.audio import (
    LogMelConfig,
    hann_window,
    log_mel,
    mel_filterbank,
    num_frames,
    num_samples_for_frames,
)

TOL = 1e-4  # max abs error of the normalised log-mel vs a float64 reference
CFG16 = LogMelConfig()
CFG32 = LogMelConfig(
    sample_rate=32000,
    n_fft=1024,
    win_length=800,
    hop_length=320,
    n_mels=128,
    f_min=50.0,
    f_max=16000.0,
    log_offset=1e-3,
    norm_mean=None,
    norm_std=None,
)


# --- signals and references ---------------------------------------------------------------------------


def realistic_signal(rng: np.random.Generator, n: int, sr: int, peak: float) -> np.ndarray:
    """Mixture of a vibrato harmonic tone, a log chirp, coloured noise and a click train, with a fully
    silent stretch and a decaying (very quiet) tail; scaled to ``peak``; returned as float32."""
    t = np.arange(n) / sr
    # Harmonic tone with 5-6 Hz vibrato.
    f0 = rng.uniform(120.0, 320.0)
    inst_f0 = f0 * (1.0 + 0.03 * np.sin(2 * np.pi * rng.uniform(4.5, 6.5) * t))
    phase = 2 * np.pi * np.cumsum(inst_f0) / sr
    n_harm = int((sr / 2 - 200) // (1.03 * f0))
    tone = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, min(n_harm, 12) + 1))
    # Logarithmic chirp over most of the band.
    chirp = scipy.signal.chirp(t, f0=80.0, t1=t[-1], f1=0.45 * sr, method="logarithmic")
    # Coloured (1/f^alpha) noise.
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec /= np.maximum(freqs, 20.0) ** (rng.uniform(0.5, 1.5) / 2)
    noise = np.fft.irfft(spec, n)
    noise /= np.abs(noise).max()
    # Click train: short decaying bursts at a fixed rate.
    clicks = np.zeros(n)
    burst = np.exp(-np.arange(32) / 4.0) * rng.choice([-1.0, 1.0], 32)
    for start in range(int(0.05 * sr), n - 32, int(rng.uniform(0.08, 0.2) * sr)):
        clicks[start : start + 32] += burst
    x = 0.5 * tone / np.abs(tone).max() + 0.3 * chirp + 0.2 * noise + 0.4 * clicks
    # Fully silent stretch (exact zeros) and an exponentially decaying tail down to about -100 dB.
    s0 = int(rng.uniform(0.3, 0.5) * n)
    x[s0 : s0 + int(0.3 * sr)] = 0.0
    tail = int(0.6 * sr)
    x[-tail:] *= np.exp(-np.arange(tail) / tail * np.log(1e5))
    return (peak * x / np.abs(x).max()).astype(np.float32)


def reference_log_mel(
    wave: np.ndarray,
    cfg: LogMelConfig,
    *,
    symmetric_window: bool = False,
    center: bool = False,
    htk: bool = False,
    log10: bool = False,
) -> np.ndarray:
    """Independent float64 numpy reference ``[..., n_mels, T]``; the flags switch to wrong conventions."""
    x = np.asarray(wave, np.float64)
    t_frames = 1 + (x.shape[-1] - cfg.n_fft) // cfg.hop_length
    if center:  # librosa/torch center=True: reflect-pad n_fft // 2 on both sides
        pad = [(0, 0)] * (x.ndim - 1) + [(cfg.n_fft // 2, cfg.n_fft // 2)]
        x = np.pad(x, pad, mode="reflect")
    win = scipy.signal.get_window("hann", cfg.win_length, fftbins=not symmetric_window).astype(np.float64)
    left = (cfg.n_fft - cfg.win_length) // 2
    win = np.pad(win, (left, cfg.n_fft - cfg.win_length - left))
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.n_fft, axis=-1)[..., :: cfg.hop_length, :]
    frames = frames[..., :t_frames, :]
    power = np.abs(np.fft.rfft(frames * win, axis=-1)) ** 2  # [..., T, F]
    fb = librosa.filters.mel(
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
        htk=htk,
        norm="slaney",
        dtype=np.float64,
    )  # [M, F]
    mel = np.einsum("mf,...tf->...mt", fb, power)
    out = (np.log10 if log10 else np.log)(mel + cfg.log_offset)
    if cfg.norm_mean is not None:
        out = (out - cfg.norm_mean) / cfg.norm_std
    return out


@pytest.fixture(scope="module")
def batch16() -> np.ndarray:
    rng = np.random.default_rng(20240611)
    n = 16000 * 5 // 2 + 37  # 2.5 s plus a remainder that does not fill a hop
    return np.stack([realistic_signal(rng, n, 16000, peak) for peak in (0.5, 0.08, 0.01)])


@pytest.fixture(scope="module")
def ref16(batch16: np.ndarray) -> np.ndarray:
    return reference_log_mel(batch16, CFG16)


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- filterbank and window ------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [CFG16, CFG32], ids=["16k_80mel", "32k_128mel"])
def test_mel_filterbank_equals_librosa_slaney_transposed(cfg: LogMelConfig) -> None:
    fb = mel_filterbank(cfg)
    ref = librosa.filters.mel(
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
        htk=False,
        norm="slaney",
        dtype=np.float64,
    )
    assert fb.shape == (cfg.n_fft // 2 + 1, cfg.n_mels)
    assert fb.dtype == np.float64
    np.testing.assert_allclose(fb, ref.T, rtol=0, atol=1e-12)
    assert np.all(fb.max(axis=0) > 0), "every mel filter must be non-empty"


def test_mel_filterbank_returns_a_fresh_copy() -> None:
    fb = mel_filterbank()
    fb[:] = 0.0
    assert mel_filterbank().max() > 0


def _torchaudio_fbanks_float32(cfg: LogMelConfig) -> np.ndarray:
    """An element-by-element float32 transcription of torchaudio ``functional.melscale_fbanks(...,
    norm='slaney', mel_scale='slaney')``: ``torch.linspace`` as pytorch's CPU kernel (RangeFactoriesKernel.cpp:52-66:
    float32 step, first half from the start, second half from the end), ``_hz_to_mel`` in Python floats, ``_mel_to_hz``
    / ``_create_triangular_filterbank`` / ``enorm`` one float32 scalar operation at a time."""
    f = np.float32

    def linspace(start: float, end: float, steps: int) -> list:
        a, b = f(start), f(end)
        step = (b - a) / f(steps - 1)
        return [a + step * f(i) if i < steps // 2 else b - step * f(steps - 1 - i) for i in range(steps)]

    def hz_to_mel(hz: float) -> float:  # torchaudio _hz_to_mel, slaney, in Python floats
        return 15.0 + math.log(hz / 1000.0) / (math.log(6.4) / 27.0) if hz >= 1000.0 else hz / (200.0 / 3)

    freqs = linspace(0, cfg.sample_rate // 2, cfg.n_fft // 2 + 1)
    mels = linspace(hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max), cfg.n_mels + 2)
    pts = [
        f(1000.0) * np.exp(f(math.log(6.4) / 27.0) * (m - f(15.0))) if m >= f(15.0) else f(200.0 / 3) * m for m in mels
    ]
    fb = np.zeros((len(freqs), cfg.n_mels), np.float32)
    for j in range(cfg.n_mels):
        enorm = f(2.0) / (pts[j + 2] - pts[j])
        for i, hz in enumerate(freqs):
            down = (f(-1.0) * (pts[j] - hz)) / (pts[j + 1] - pts[j])
            up = (pts[j + 2] - hz) / (pts[j + 2] - pts[j + 1])
            fb[i, j] = max(f(0.0), min(down, up)) * enorm
    return fb


@pytest.mark.parametrize("cfg", [CFG16, CFG32], ids=["16k_80mel", "32k_128mel"])
def test_float32_filterbank_is_torchaudio_float32_arithmetic(cfg: LogMelConfig) -> None:
    """filterbank_dtype='float32' is torchaudio's bank as it computes it (bit for bit against an independent float32
    transcription); it differs from the exact float64 bank by float32 rounding only: measured 4.2e-6 (16 kHz, 80 mels)
    and 5.3e-6 (32 kHz, 128 mels) of the peak, the same nonzero pattern."""
    cfg32 = dataclasses.replace(cfg, filterbank_dtype="float32")
    fb32, fb64 = mel_filterbank(cfg32), mel_filterbank(cfg)
    assert fb32.dtype == np.float32 and fb32.shape == fb64.shape
    np.testing.assert_array_equal(fb32, _torchaudio_fbanks_float32(cfg))
    rel = np.max(np.abs(fb32 - fb64)) / np.max(fb64)
    assert 1e-6 < rel < 6e-6
    np.testing.assert_array_equal(fb32 > 0, fb64 > 0)


def test_filterbank_dtype_defaults_to_float64_and_is_validated() -> None:
    audio = {f.name: getattr(CFG16, f.name) for f in dataclasses.fields(LogMelConfig) if f.name != "filterbank_dtype"}
    assert LogMelConfig.from_audio_config(audio).filterbank_dtype == "float64"  # a section saved before the key
    cfg = LogMelConfig.from_audio_config({**audio, "filterbank_dtype": "float32"})
    assert hash(cfg) != hash(CFG16) and cfg != CFG16  # a different static jit argument, a different program
    with pytest.raises(ValueError, match="filterbank_dtype"):
        LogMelConfig(filterbank_dtype="bfloat16")


def test_log_mel_uses_the_float32_filterbank_when_asked() -> None:
    """On 3 s of realistic audio at 32 kHz, log(x + 1e-3): log_mel is within 2e-6 of a float64 computation with the
    bank it was given, and the two banks give log-mels up to 1.0e-4 apart (the input difference S-SONDO's ERes2Net
    amplifies)."""
    wave = realistic_signal(np.random.default_rng(0), 3 * 32000, 32000, 0.3)[None]
    cfg64 = CFG32
    cfg32 = dataclasses.replace(cfg64, filterbank_dtype="float32")
    frames = np.lib.stride_tricks.sliding_window_view(wave.astype(np.float64), 1024, axis=-1)[:, ::320]
    power = np.abs(np.fft.rfft(frames * hann_window(cfg64), axis=-1)) ** 2  # [B, T, F] float64

    def ref(cfg: LogMelConfig) -> np.ndarray:
        return np.log(np.einsum("btf,fm->bmt", power, mel_filterbank(cfg).astype(np.float64)) + cfg.log_offset)

    out32, out64 = log_mel(jnp.asarray(wave), cfg32), log_mel(jnp.asarray(wave), cfg64)
    assert max_err(out32, ref(cfg32)) <= 1e-5 and max_err(out64, ref(cfg64)) <= 1e-5
    assert 5e-5 < max_err(out32, out64) < 2e-4


def test_hann_window_is_periodic_and_matches_scipy() -> None:
    win = hann_window(CFG16)
    assert win.shape == (400,) and win.dtype == np.float64
    np.testing.assert_allclose(win, scipy.signal.get_window("hann", 400, fftbins=True), rtol=0, atol=1e-15)
    assert win[0] == 0.0 and win[-1] > 0.0  # periodic, not symmetric
    assert abs(win[200] - 1.0) < 1e-15


def test_hann_window_shorter_than_n_fft_is_zero_padded_centred() -> None:
    win = hann_window(CFG32)  # win_length 800 inside n_fft 1024: 112 zeros each side (torch.stft)
    assert win.shape == (1024,)
    np.testing.assert_array_equal(win[:112], 0.0)
    np.testing.assert_array_equal(win[912:], 0.0)
    np.testing.assert_allclose(win[112:912], scipy.signal.get_window("hann", 800, fftbins=True), atol=1e-15)


def test_config_rejects_half_specified_normalisation_and_long_window() -> None:
    with pytest.raises(ValueError, match="norm_mean and norm_std"):
        LogMelConfig(norm_mean=0.0, norm_std=None)
    with pytest.raises(ValueError, match="win_length"):
        LogMelConfig(n_fft=400, win_length=512)


# --- frame counting ---------------------------------------------------------------------------------------


def test_num_frames_ten_seconds_at_16k_is_998() -> None:
    assert num_frames(160_000) == 998
    assert num_frames(400) == 1
    assert num_frames(559) == 1 and num_frames(560) == 2


def test_num_samples_for_frames_inverts_num_frames() -> None:
    assert num_samples_for_frames(608) == 97_520
    assert num_frames(97_520) == 608
    assert num_frames(97_519) == 607
    assert num_frames(97_520 + 159) == 608
    for frames in (1, 2, 97, 998):
        assert num_frames(num_samples_for_frames(frames)) == frames


def test_num_frames_too_short_raises_value_error_naming_lengths() -> None:
    with pytest.raises(ValueError, match=r"399 samples < n_fft=400"):
        num_frames(399)
    with pytest.raises(ValueError, match=r"399 samples < n_fft=400"):
        log_mel(jnp.zeros((2, 399)))


# --- log-mel numerics --------------------------------------------------------------------------------------


def test_log_mel_batch_matches_float64_reference(batch16: np.ndarray, ref16: np.ndarray) -> None:
    out = log_mel(jnp.asarray(batch16))
    assert out.shape == (3, 80, num_frames(batch16.shape[-1])) == ref16.shape
    assert out.dtype == jnp.float32
    assert max_err(out, ref16) <= TOL


def test_log_mel_under_jit_matches_reference_and_eager(batch16: np.ndarray, ref16: np.ndarray) -> None:
    jitted = jax.jit(log_mel, static_argnames="cfg")
    out = jitted(jnp.asarray(batch16), cfg=CFG16)
    assert max_err(out, ref16) <= TOL
    assert max_err(out, log_mel(jnp.asarray(batch16))) <= 1e-5


def test_log_mel_unbatched_input_returns_unbatched_output() -> None:
    wave = realistic_signal(np.random.default_rng(7), 2 * 16000 + 123, 16000, 0.3)
    out = log_mel(jnp.asarray(wave))
    ref = reference_log_mel(wave, CFG16)
    assert out.shape == (80, num_frames(wave.shape[0])) == ref.shape
    assert max_err(out, ref) <= TOL


def test_log_mel_silence_is_normalised_log_offset() -> None:
    out = np.asarray(log_mel(jnp.zeros((1, 16000))))
    expected = (np.log(np.float32(1.1920929e-07)) + 7.056) / 4.193
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_log_mel_32k_padded_window_config_matches_reference() -> None:
    rng = np.random.default_rng(3)
    wave = np.stack([realistic_signal(rng, 3 * 32000 + 5, 32000, p) for p in (0.4, 0.02)])
    out = jax.jit(log_mel, static_argnames="cfg")(jnp.asarray(wave), cfg=CFG32)
    ref = reference_log_mel(wave, CFG32)
    assert out.shape == (2, 128, num_frames(wave.shape[-1], CFG32)) == ref.shape
    assert max_err(out, ref) <= TOL


def test_log_mel_matches_librosa_melspectrogram(batch16: np.ndarray) -> None:
    mel = librosa.feature.melspectrogram(
        y=batch16.astype(np.float64),
        sr=16000,
        n_fft=400,
        hop_length=160,
        win_length=400,
        window="hann",
        center=False,
        power=2.0,
        n_mels=80,
        fmin=50.0,
        fmax=8000.0,
        htk=False,
        norm="slaney",
        dtype=np.float64,
    )
    ref = (np.log(mel + 1.1920929e-07) + 7.056) / 4.193
    assert max_err(log_mel(jnp.asarray(batch16)), ref) <= TOL


def test_ssondo_recipe_front_end_is_the_published_student_transform() -> None:
    """configs/ssondo.py's front-end is S-SONDO's (MedAliAdlouni/ssondo training_ssondo/utils/preprocess.py
    ``LogMelSpectrogram``: torchaudio MelSpectrogram at 32 kHz, n_fft = win = 1024 (32 ms), hop 512 (16 ms), 128
    Slaney mels 50-16,000 Hz with Slaney norm, periodic Hann, center=False, then log(x + 1e-3), no normalisation):
    624 frames per 10 s; on 10 s of realistic audio, equal within 1e-4 to librosa's float64 STFT with torchaudio's
    float32 filterbank (filterbank_dtype='float32', the bank the published students saw) and, with the float64 bank,
    to librosa's melspectrogram (the two banks' log-mels differ by up to 5.2e-4 on this clip); the ONNX export's
    constant is the same transform."""
    from helpers import load_config

    from matpac_jax.distill.export import STUDENT_FRONTEND

    cfg = LogMelConfig.from_audio_config(load_config("ssondo.py", None).audio)
    assert cfg == STUDENT_FRONTEND
    assert num_frames(10 * 32000, cfg) == 624
    rng = np.random.default_rng(5)
    wave = realistic_signal(rng, 10 * 32000, 32000, 0.3)[None]
    mel = librosa.feature.melspectrogram(y=wave.astype(np.float64), sr=32000, n_fft=1024, hop_length=512,
                                         win_length=1024, window="hann", center=False, power=2.0, n_mels=128,
                                         fmin=50.0, fmax=16000.0, htk=False, norm="slaney",
                                         dtype=np.float64)  # fmt: skip
    ref64 = np.log(mel + 1e-3)
    assert cfg.filterbank_dtype == "float32"
    cfg64 = dataclasses.replace(cfg, filterbank_dtype="float64")
    out, out64 = log_mel(jnp.asarray(wave), cfg), log_mel(jnp.asarray(wave), cfg64)
    assert out.shape == ref64.shape == (1, 128, 624)
    assert max_err(out64, ref64) <= TOL
    stft = librosa.stft(wave.astype(np.float64), n_fft=1024, hop_length=512, window="hann", center=False)
    ref32 = np.log(np.einsum("bft,fm->bmt", np.abs(stft) ** 2, mel_filterbank(cfg).astype(np.float64)) + 1e-3)
    assert max_err(out, ref32) <= TOL
    assert 4e-4 < max_err(out, out64) < 6e-4


@pytest.mark.parametrize(
    "wrong",
    [{"symmetric_window": True}, {"center": True}, {"htk": True}, {"log10": True}],
    ids=["symmetric_window", "center_true", "htk_mel", "log10"],
)
def test_wrong_conventions_are_caught_by_the_tolerance(
    batch16: np.ndarray, ref16: np.ndarray, wrong: dict[str, bool]
) -> None:
    """Each plausible convention slip moves the output by far more than TOL, so the parity tests above
    really pin the convention down."""
    assert max_err(reference_log_mel(batch16, CFG16, **wrong), ref16) > 100 * TOL


def test_log_mel_normalisation_can_be_disabled(batch16: np.ndarray) -> None:
    cfg = dataclasses.replace(CFG16, norm_mean=None, norm_std=None)
    raw = log_mel(jnp.asarray(batch16[:1]), cfg)
    normed = log_mel(jnp.asarray(batch16[:1]))
    assert max_err((raw + 7.056) / 4.193, normed) <= 1e-5
    assert max_err(raw, reference_log_mel(batch16[:1], cfg)) <= 4.193 * TOL


def test_log_mel_of_int16_pcm_equals_log_mel_of_from_int16() -> None:
    from matpac_jax.audio.io import from_int16

    pcm = np.random.default_rng(3).integers(-32768, 32767, size=(2, 4000), dtype=np.int16)
    got = jax.jit(log_mel)(jnp.asarray(pcm))
    want = jax.jit(log_mel)(jnp.asarray(from_int16(pcm)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)  # XLA may fold the division
