"""Log-mel spectrogram front end in ``jax.numpy``.

Parity: with the default :class:`LogMelConfig`, :func:`log_mel` equals

    torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=160, f_min=50, f_max=8000,
        n_mels=80, power=2, center=False, mel_scale="slaney", norm="slaney")

followed by ``log(x + 1.1920929e-07)`` and the normalisation ``(x - (-7.056)) / 4.193``.
The output layout is ``[B, n_mels, frames]`` (frequency, then time), float32.

Conventions (torch.stft / torchaudio):

* periodic Hann window ``0.5 - 0.5 * cos(2 * pi * n / win_length)``; if ``win_length < n_fft`` it is
  zero-padded, centred, to ``n_fft`` (left pad ``(n_fft - win_length) // 2``);
* ``center=False``: no padding, ``frames = 1 + (num_samples - n_fft) // hop_length``;
* power spectrogram ``|rfft(frame * window)|**2`` with ``n_fft // 2 + 1`` bins;
* Slaney mel scale and Slaney area normalisation, identical to
  ``librosa.filters.mel(sr, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=False, norm="slaney").T``.

The filterbank is computed in numpy float64 here (librosa is deliberately not imported: it is slow to
import) and cast to float32 only when it enters the jitted computation. ``filterbank_dtype='float32'`` builds it
instead as torchaudio does, in float32 with torchaudio's order of operations (``functional.melscale_fbanks``): less
exact (1.9e-7 from the float64 bank, 5.3e-6 of its peak, at S-SONDO's 32 kHz 128-mel front-end; 4.2e-6 of the peak
at the ViT's 16 kHz 80-mel one), but the bank a published student saw in training: the S-SONDO recipe and the
published-student conversion use it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from matpac_jax.audio.io import INT16_SCALE

__all__ = [
    "LogMelConfig",
    "hann_window",
    "log_mel",
    "mel_filterbank",
    "num_frames",
    "num_samples_for_frames",
]


@dataclasses.dataclass(frozen=True)
class LogMelConfig:
    """Static configuration of the log-mel front end (hashable, usable as a ``jax.jit`` static arg)."""

    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    f_min: float = 50.0
    f_max: float = 8000.0
    log_offset: float = 1.1920929e-07
    norm_mean: float | None = -7.056  # None = no normalisation
    norm_std: float | None = 4.193
    filterbank_dtype: str = "float64"  # 'float32': torchaudio's float32 arithmetic (mel_filterbank)

    @classmethod
    def from_audio_config(cls, audio) -> LogMelConfig:
        """From a config's ``audio`` section (extra keys such as ``crop_frames`` or ``seconds`` are ignored). A
        section without ``filterbank_dtype`` (the ViT configs, configs saved before it existed) means 'float64'."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "filterbank_dtype" or f.name in audio]
        return cls(**{name: audio[name] for name in names})

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.n_fft <= 0 or self.hop_length <= 0 or self.n_mels <= 0:
            raise ValueError(f"sample_rate, n_fft, hop_length and n_mels must be positive: {self}")
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"win_length must be in (0, n_fft={self.n_fft}], got {self.win_length}")
        if not 0.0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(
                f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={self.f_min}, f_max={self.f_max}, "
                f"sample_rate={self.sample_rate}"
            )
        if self.log_offset <= 0:
            raise ValueError(f"log_offset must be > 0, got {self.log_offset}")
        if (self.norm_mean is None) != (self.norm_std is None):
            raise ValueError("norm_mean and norm_std must both be set or both be None")
        if self.norm_std is not None and self.norm_std <= 0:
            raise ValueError(f"norm_std must be > 0, got {self.norm_std}")
        if self.filterbank_dtype not in ("float32", "float64"):
            raise ValueError(f"filterbank_dtype must be 'float32' or 'float64', got {self.filterbank_dtype!r}")

    @property
    def n_freqs(self) -> int:
        """Number of rfft bins, ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1


# --- Slaney mel scale (as librosa.hz_to_mel / mel_to_hz with htk=False) -------------------------------

_F_SP = 200.0 / 3.0  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15.0
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = _F_SP * mel
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, linear)


@functools.lru_cache(maxsize=16)
def _mel_filterbank_cached(cfg: LogMelConfig) -> np.ndarray:
    fb = _filterbank_float32(cfg) if cfg.filterbank_dtype == "float32" else _filterbank_float64(cfg)
    fb.setflags(write=False)
    return fb


def _filterbank_float64(cfg: LogMelConfig) -> np.ndarray:
    fft_freqs = np.fft.rfftfreq(cfg.n_fft, d=1.0 / cfg.sample_rate)  # [F]
    mel_pts = np.linspace(_hz_to_mel(cfg.f_min), _hz_to_mel(cfg.f_max), cfg.n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts)  # [M + 2]
    fdiff = np.diff(hz_pts)  # [M + 1]
    ramps = hz_pts[:, None] - fft_freqs[None, :]  # [M + 2, F]
    lower = -ramps[:-2] / fdiff[:-1, None]  # [M, F]
    upper = ramps[2:] / fdiff[1:, None]  # [M, F]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]  # Slaney area normalisation
    return np.ascontiguousarray(weights.T)  # [F, M]


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` (float32, CPU): ``step = (end - start) / (steps - 1)`` in float32, then
    ``start + step * i`` for the first half, ``end - step * (steps - 1 - i)`` for the rest (pytorch
    ``aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp:52-66``), each product and sum rounded to float32."""
    f32 = np.float32
    start32, end32 = f32(start), f32(end)
    step = f32(f32(end32 - start32) / f32(steps - 1))
    i = np.arange(steps)
    head = start32 + (step * i[: steps // 2].astype(f32)).astype(f32)
    tail = end32 - (step * (steps - 1 - i[steps // 2 :]).astype(f32)).astype(f32)
    return np.concatenate([head, tail]).astype(f32)


def _filterbank_float32(cfg: LogMelConfig) -> np.ndarray:
    """torchaudio's ``functional.melscale_fbanks(n_freqs, f_min, f_max, n_mels, sample_rate, norm='slaney',
    mel_scale='slaney')`` in its own float32 arithmetic: the mel end points in Python floats (``_hz_to_mel``),
    everything after in float32 (``_mel_to_hz``, ``_create_triangular_filterbank``, the Slaney ``enorm``), Python
    constants entering as float32 scalars as torch casts them. Not checked against torch itself (not installed here):
    numpy's float32 ``exp`` may round otherwise than torch's (1 ulp), and a torch build that fuses linspace's
    ``start + step * i`` into one FMA moves 10 of the recipe's 130 mel points by 1 ulp (2.5e-6 of the bank's peak)."""
    f32 = np.float32
    all_freqs = _torch_linspace_float32(0.0, cfg.sample_rate // 2, cfg.n_freqs)  # [F]
    m_pts = _torch_linspace_float32(float(_hz_to_mel(cfg.f_min)), float(_hz_to_mel(cfg.f_max)), cfg.n_mels + 2)
    f_pts = f32(_F_SP) * m_pts  # the linear part: f_min + f_sp * mels, f_min = 0
    log_t = m_pts >= f32(_MIN_LOG_MEL)
    f_pts[log_t] = f32(_MIN_LOG_HZ) * np.exp(f32(_LOGSTEP) * (m_pts[log_t] - f32(_MIN_LOG_MEL)))  # [M + 2]
    f_diff = f_pts[1:] - f_pts[:-1]  # [M + 1]
    slopes = f_pts[None, :] - all_freqs[:, None]  # [F, M + 2]
    down_slopes = (f32(-1.0) * slopes[:, :-2]) / f_diff[:-1]  # [F, M]
    up_slopes = slopes[:, 2:] / f_diff[1:]  # [F, M]
    fb = np.maximum(f32(0.0), np.minimum(down_slopes, up_slopes))
    fb *= (f32(2.0) / (f_pts[2:] - f_pts[:-2]))[None, :]  # Slaney area normalisation
    return np.ascontiguousarray(fb, dtype=f32)  # [F, M]


def mel_filterbank(cfg: LogMelConfig = LogMelConfig()) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filterbank, ``[n_fft // 2 + 1, n_mels]``, float64, or float32 as
    torchaudio computes it when ``cfg.filterbank_dtype`` is 'float32'."""
    return _mel_filterbank_cached(cfg).copy()


def hann_window(cfg: LogMelConfig = LogMelConfig()) -> np.ndarray:
    """Periodic Hann window of ``win_length``, zero-padded centred to ``[n_fft]`` (float64)."""
    n = np.arange(cfg.win_length, dtype=np.float64)
    win = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / cfg.win_length)
    left = (cfg.n_fft - cfg.win_length) // 2
    return np.pad(win, (left, cfg.n_fft - cfg.win_length - left))


def num_frames(num_samples: int, cfg: LogMelConfig = LogMelConfig()) -> int:
    """Number of STFT frames for ``num_samples`` samples (``center=False``)."""
    if num_samples < cfg.n_fft:
        raise ValueError(
            f"waveform too short: {num_samples} samples < n_fft={cfg.n_fft} (at least one full frame is "
            "needed; center=False does no padding)"
        )
    return 1 + (num_samples - cfg.n_fft) // cfg.hop_length


def num_samples_for_frames(frames: int, cfg: LogMelConfig = LogMelConfig()) -> int:
    """Smallest number of samples that yields exactly ``frames`` frames: ``n_fft + (frames - 1) * hop``."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    return cfg.n_fft + (frames - 1) * cfg.hop_length


def _frame(wave: jax.Array, cfg: LogMelConfig) -> jax.Array:
    """``[B, N] -> [B, T, n_fft]`` frames by a reshape trick (no gather, no loop over frames).

    The signal is cut into hop-sized chunks ``[B, C, hop]``; frame ``t`` is the concatenation of chunks
    ``t .. t + k - 1`` (``k = ceil(n_fft / hop)``), truncated to ``n_fft`` samples.
    """
    n = wave.shape[-1]
    t = num_frames(n, cfg)
    hop = cfg.hop_length
    k = -(-cfg.n_fft // hop)
    n_chunks = t + k - 1
    needed = n_chunks * hop
    if needed > n:  # only the tail of the last chunk, never read into a frame, is padded
        wave = jnp.pad(wave, ((0, 0), (0, needed - n)))
    chunks = wave[:, :needed].reshape(wave.shape[0], n_chunks, hop)
    frames = jnp.concatenate([chunks[:, i : i + t] for i in range(k)], axis=-1)
    return frames[..., : cfg.n_fft]


def log_mel(wave: jax.Array, cfg: LogMelConfig = LogMelConfig()) -> jax.Array:
    """Normalised log-mel spectrogram: ``[B, N] -> [B, n_mels, T]`` (or ``[N] -> [n_mels, T]``), float32.

    ``wave`` is float audio in [-1, 1], or int16 PCM, scaled here as ``pcm / 32767`` (``audio.io.from_int16``): the
    input pipeline ships int16 to the device, half the bytes of float32. Jit-compatible; ``cfg`` must be static
    (e.g. ``jax.jit(log_mel, static_argnames="cfg")``).
    """
    with jax.named_scope("log_mel_frontend"):  # a scope name bench/profile_step.py reads
        return _log_mel(jnp.asarray(wave), cfg)


def _log_mel(wave: jax.Array, cfg: LogMelConfig) -> jax.Array:
    if wave.ndim not in (1, 2):
        raise ValueError(f"expected a waveform of shape [B, N] or [N], got shape {wave.shape}")
    unbatched = wave.ndim == 1
    x = wave.astype(jnp.float32)
    if wave.dtype == jnp.int16:
        x = x / jnp.float32(INT16_SCALE)
    if unbatched:
        x = x[None]

    frames = _frame(x, cfg) * jnp.asarray(hann_window(cfg), jnp.float32)  # [B, T, n_fft]
    spec = jnp.fft.rfft(frames, n=cfg.n_fft, axis=-1)  # [B, T, F] complex64
    power = jnp.square(spec.real) + jnp.square(spec.imag)
    fb = jnp.asarray(_mel_filterbank_cached(cfg), jnp.float32)  # [F, M]
    mel = jnp.einsum("btf,fm->bmt", power, fb, precision=jax.lax.Precision.HIGHEST)
    out = jnp.log(mel + jnp.float32(cfg.log_offset))
    if cfg.norm_mean is not None and cfg.norm_std is not None:
        out = (out - jnp.float32(cfg.norm_mean)) / jnp.float32(cfg.norm_std)
    return out[0] if unbatched else out
