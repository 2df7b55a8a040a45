"""Host-side audio I/O: decode a file to a mono float32 waveform at a fixed rate, and int16 PCM conversion.

Decoding uses soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3 and more) and falls back to
``librosa.load(sr=None, mono=False)`` for what soundfile cannot open. Any channel count is mixed down to the mean
of the channels, any rate is resampled with soxr at 'HQ' quality. A file that cannot be used raises ``AudioError``
(never another exception type): missing, undecodable, truncated, empty, non-finite samples, a native sample rate
outside ``[MIN_RATE, MAX_RATE]``, longer than a given maximum, or shorter than asked for (and never 0 samples).
All-zero audio is valid and returned as is. Samples are not clipped: a float file may hold values beyond [-1, 1].

Hostile files: libsndfile decodes block by block, each block mixed down and resampled before the next is read, so
memory stays about the size of the output; the declared length is checked against ``max_seconds`` before decoding,
and the rate bounds stop a tiny file declaring 1 Hz from resampling to gigabytes.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import soundfile as sf
import soxr

INT16_SCALE = 32767.0
MIN_RATE, MAX_RATE = 1000, 768000  # native sample rates a file may declare (Hz); others are refused
_BLOCK_VALUES = 1 << 20  # float32 values (frames x channels) decoded per block: 4 MB


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


def _check_rate(path: str, sr: int) -> None:
    """AudioError for a native rate outside ``[MIN_RATE, MAX_RATE]``: a 1-Hz header would resample 40 kB of samples
    to gigabytes, a rate of 0 is meaningless."""
    if not MIN_RATE <= sr <= MAX_RATE:
        raise AudioError(path, f"unusable sample rate {sr} Hz: expected {MIN_RATE} to {MAX_RATE} Hz (corrupt header?)")


def _check_length(path: str, frames: int, sr: int, max_seconds: float | None, what: str) -> None:
    """AudioError when ``frames`` at ``sr`` last longer than ``max_seconds`` (None: no bound)."""
    if max_seconds is not None and frames > max_seconds * sr:
        raise AudioError(
            path, f"too long: {what} {frames / sr:.1f} s, more than the maximum of {max_seconds:g} s (max_seconds)"
        )


def _mono(data: np.ndarray) -> np.ndarray:
    """[samples, channels] -> [samples]: the mean of the channels (float32), row by row."""
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]


def _finish(path: str, wave: np.ndarray, sr: int, sample_rate: int, min_samples: int) -> np.ndarray:
    """Refuse a clip with fewer than ``max(min_samples, 1)`` samples at ``sample_rate`` (a 1-sample 44.1-kHz file
    resamples to 0 samples at 16 kHz: never returned as an empty clip)."""
    need = max(int(min_samples), 1)
    if wave.shape[0] < need:
        raise AudioError(
            path,
            f"too short: {wave.shape[0]} samples at {sample_rate} Hz (from {sr} Hz), need at least {need}",
        )
    return wave


def _stream_soundfile(path: str, sample_rate: int, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(mono float32 wave at ``sample_rate``, native rate) decoded by libsndfile block by block.

    Memory stays about the size of the output: each block of ``_BLOCK_VALUES`` values is mixed down and resampled
    (soxr's streaming resampler gives exactly the samples of a one-shot ``resample``) before the next is read, and
    the declared length is bounded by ``max_seconds`` before anything is read. AudioError for a checked problem
    (rate, length, truncation, empty, non-finite samples); any other exception means libsndfile cannot read it.
    """
    with sf.SoundFile(os.fsencode(path)) as f:  # bytes: a file name that is not valid UTF-8 still opens
        sr, channels = int(f.samplerate), int(f.channels)
        _check_rate(path, sr)
        if f.frames < 1 << 62:  # not libsndfile's "unknown length" (SF_COUNT_MAX): then checked while decoding
            _check_length(path, f.frames, sr, max_seconds, "the header declares")
        stream = None if sr == sample_rate else soxr.ResampleStream(sr, sample_rate, 1, dtype="float32", quality="HQ")
        block = max(4096, _BLOCK_VALUES // max(channels, 1))
        parts, decoded, nonfinite = [], 0, 0
        while (data := f.read(block, dtype="float32", always_2d=True)).shape[0]:
            decoded += data.shape[0]
            _check_length(path, decoded, sr, max_seconds, "it holds at least")
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            nonfinite += bad
            if not nonfinite:
                mono = _mono(data)
                parts.append(stream.resample_chunk(mono, last=False) if stream else mono.copy())
        problem = _truncation(f, decoded)
    if problem:
        raise AudioError(path, problem)
    if decoded == 0 or channels == 0:
        raise AudioError(path, "empty: 0 samples")
    if nonfinite:
        raise AudioError(path, f"non-finite samples: {nonfinite} NaN/Inf values")
    if stream is not None:
        parts.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    return (np.concatenate(parts) if len(parts) != 1 else parts[0]).astype(np.float32, copy=False), sr


def _load_librosa(path: str, sample_rate: int, max_seconds: float | None, reason: str) -> tuple[np.ndarray, int]:
    """(mono float32 wave at ``sample_rate``, native rate) for what libsndfile cannot open; AudioError when librosa
    cannot either (``reason``: why libsndfile failed). The whole file is decoded first (no streaming here)."""
    try:
        import librosa  # slow to import: only for files soundfile cannot read

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "PySoundFile failed. Trying audioread instead." + deprecations
            data, sr = librosa.load(path, sr=None, mono=False)
    except Exception as lr_error:  # audioread.NoBackendError (empty str()), DecodeError, soundfile errors, ...
        detail = f"{type(lr_error).__name__}: {lr_error}" if str(lr_error) else type(lr_error).__name__
        raise AudioError(path, f"{reason} (librosa fallback: {detail})") from None
    sr = int(sr)
    data = np.asarray(data, dtype=np.float32)
    data = data[:, None] if data.ndim == 1 else data.T  # librosa: [samples] or [channels, samples]
    _check_rate(path, sr)
    _check_length(path, data.shape[0], sr, max_seconds, "it holds")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError(path, "empty: 0 samples")
    if not np.isfinite(data).all():
        raise AudioError(path, f"non-finite samples: {int(np.size(data) - np.isfinite(data).sum())} NaN/Inf values")
    return resample(_mono(data), sr, sample_rate), sr


def load_audio(
    path: str | bytes | os.PathLike,
    sample_rate: int = 16000,
    min_samples: int = 0,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode wav / flac / ogg / mp3 (and whatever else libsndfile or librosa read) to float32 mono [samples].

    Channels are averaged, the rate is converted to ``sample_rate`` (soxr 'HQ'). Raises ``AudioError`` for a
    missing, undecodable, truncated, empty or non-finite file, a native rate outside ``[MIN_RATE, MAX_RATE]``, a
    file longer than ``max_seconds`` (None: no bound; refused from the header before decoding where the header says),
    or one with fewer than ``max(min_samples, 1)`` samples after resampling: the result is never empty. A file name
    that is not valid UTF-8 (a str holding surrogate escapes, or bytes) is opened as the bytes it names.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds}")
    path = os.fsdecode(path)
    if not os.path.exists(path):
        raise AudioError(path, "file not found")
    if not os.path.isfile(path):
        raise AudioError(path, "not a regular file")
    try:
        wave, sr = _stream_soundfile(path, sample_rate, max_seconds)
    except AudioError:
        raise
    except Exception as sf_error:  # soundfile.LibsndfileError, RuntimeError, MemoryError...: fall back to librosa
        wave, sr = _load_librosa(path, sample_rate, max_seconds, f"cannot decode: {sf_error}")
    return _finish(path, wave, sr, sample_rate, min_samples)
