"""Audio front end: log-mel spectrogram in ``jax.numpy`` (torchaudio parity)."""

from matpac_jax.audio.frontend import (
    LogMelConfig,
    hann_window,
    log_mel,
    mel_filterbank,
    num_frames,
    num_samples_for_frames,
)

__all__ = [
    "LogMelConfig",
    "hann_window",
    "log_mel",
    "mel_filterbank",
    "num_frames",
    "num_samples_for_frames",
]
