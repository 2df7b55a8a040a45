"""Host-side audio I/O: decode a file to a mono float32 waveform at a fixed rate, and int16 PCM conversion.

Decoding uses soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3 and more) and falls back to
``librosa.load(sr=None, mono=False)`` for what soundfile cannot open. Any channel count is mixed down to the mean
of the channels, any rate is resampled with soxr at 'HQ' quality. A file that cannot be used raises ``AudioError``
(never another exception type): missing, undecodable, empty, non-finite samples, or shorter than asked for.
All-zero audio is valid and returned as is. Samples are not clipped: a float file may hold values beyond [-1, 1].
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import soundfile as sf
import soxr

INT16_SCALE = 32767.0


class AudioError(Exception):
    """A file that cannot be used as audio. ``str(error) == f"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample a 1-D (or [samples, channels]) waveform with soxr 'HQ'; float32 out, identity when the rates match.

    The output has ``round(n * target_sr / orig_sr)`` samples.
    """
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr or wave.shape[0] == 0:
        return wave
    return np.asarray(soxr.resample(wave, orig_sr, target_sr, quality="HQ"), dtype=np.float32)


def to_int16(wave: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 PCM: clip to [-1, 1], then ``round(x * 32767)``. Non-finite input is a ValueError."""
    wave = np.asarray(wave, dtype=np.float32)
    if not np.isfinite(wave).all():
        raise ValueError("cannot convert non-finite samples (NaN/Inf) to int16")
    return np.round(np.clip(wave, -1.0, 1.0) * INT16_SCALE).astype(np.int16)


def from_int16(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 ``pcm / 32767`` (the inverse of ``to_int16`` within 0.5 / 32767)."""
    return np.asarray(pcm, dtype=np.int16).astype(np.float32) / np.float32(INT16_SCALE)


_SHORT_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _truncation(f: sf.SoundFile, decoded: int) -> str | None:
    """Why an opened file looks truncated, or None: fewer frames decoded than its header announces (mp3, ...), or
    (WAV-family) a ``data`` chunk shorter than its declared size, which libsndfile reports as "should be"."""
    if decoded < f.frames:
        return f"truncated: the header announces {f.frames} frames, {decoded} could be decoded"
    match = _SHORT_CHUNK.search(f.extra_info)
    if match and int(match.group(2)) < int(match.group(1)) < 0xFFFFFFF0:  # not a streaming writer's "unknown" size
        return f"truncated: the data chunk declares {match.group(1)} bytes, the file holds {match.group(2)}"
    return None


def _decode(path: str) -> tuple[np.ndarray, int]:
    """Decode to ([samples, channels] float32, native rate); AudioError when neither soundfile nor librosa can, or
    when the file is truncated (its header announces more audio than it holds)."""
    try:
        with sf.SoundFile(path) as f:
            data = f.read(dtype="float32", always_2d=True)
            problem = _truncation(f, data.shape[0])
            sr = f.samplerate
    except Exception as sf_error:  # soundfile.LibsndfileError, RuntimeError, ...; fall back to librosa
        reason = f"cannot decode: {sf_error}"
    else:
        if problem:
            raise AudioError(path, problem)
        return data, int(sr)
    try:
        import librosa  # slow to import: only for files soundfile cannot read

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "PySoundFile failed. Trying audioread instead." + deprecations
            data, sr = librosa.load(path, sr=None, mono=False)
    except Exception as lr_error:  # audioread.NoBackendError (empty str()), DecodeError, soundfile errors, ...
        detail = f"{type(lr_error).__name__}: {lr_error}" if str(lr_error) else type(lr_error).__name__
        raise AudioError(path, f"{reason} (librosa fallback: {detail})") from None
    data = np.asarray(data, dtype=np.float32)
    data = data[:, None] if data.ndim == 1 else data.T  # librosa: [samples] or [channels, samples]
    return data, int(sr)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000, min_samples: int = 0) -> np.ndarray:
    """Decode wav / flac / ogg / mp3 (and whatever else libsndfile or librosa read) to float32 mono [samples].

    Channels are averaged, the rate is converted to ``sample_rate`` (soxr 'HQ'). Raises ``AudioError`` for a
    missing, undecodable, empty or non-finite file, or one with fewer than ``min_samples`` samples after resampling.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(path, "file not found")
    if not os.path.isfile(path):
        raise AudioError(path, "not a regular file")
    data, sr = _decode(path)
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError(path, "empty: 0 samples")
    if sr <= 0:
        raise AudioError(path, f"invalid sample rate {sr}")
    if not np.isfinite(data).all():
        raise AudioError(path, f"non-finite samples: {int(np.size(data) - np.isfinite(data).sum())} NaN/Inf values")
    wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    wave = resample(wave, sr, sample_rate)
    if wave.shape[0] < min_samples:
        raise AudioError(path, f"too short: {wave.shape[0]} samples at {sample_rate} Hz, need at least {min_samples}")
    return wave
