"""Embeddings for users (SPEC §5): audio -> log-mel -> chunks -> student encoder -> frame and clip features.

Each chunk holds at most `crop_frames` frames; the last one is padded with zeros to a multiple of the patch size
and sees the positional embedding truncated along time. Per time step, the F frequency tokens of the last layer
are concatenated (F·D = 3840 for ViT-B), chunks are concatenated in time, and the clip embedding is their mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from matpac_jax.audio.frontend import log_mel


def chunk_bounds(frames: int, crop_frames: int, patch: int) -> list[tuple[int, int, int]]:
    """[(start, stop, padded_length)] covering `frames` in chunks of ≤ crop_frames, padded to a patch multiple."""
    out = []
    for start in range(0, frames, crop_frames):
        stop = min(start + crop_frames, frames)
        out.append((start, stop, -(-(stop - start) // patch) * patch))
    return out


def frame_features(model, student: dict, mel: jax.Array) -> jax.Array:
    """mel [B, F, T] (T ≤ crop, a patch multiple) -> last-layer features [B, T/patch, Fp·D]."""
    x = model.encode(student, mel)[:, 1:]  # drop CLS: [B, Fp*Tp, D], freq-major
    b, _, d = x.shape
    fp = model.tokenizer.grid_freq
    x = x.reshape(b, fp, -1, d)  # [B, Fp, Tp, D]
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(b, -1, fp * d).astype(jnp.float32)


def clip_embeddings(model, student: dict, waves: np.ndarray, frontend_cfg, batch_size: int = 64) -> np.ndarray:
    """waves [N, samples] (16 kHz, equal lengths) -> clip embeddings [N, Fp·D] (time-mean of frame features)."""
    patch = model.tokenizer.patch

    @jax.jit
    def embed(params, w):
        mel = log_mel(w, frontend_cfg)
        feats = []
        for start, stop, padded in chunk_bounds(mel.shape[-1], model.crop_frames, patch):
            chunk = jnp.pad(mel[..., start:stop], ((0, 0), (0, 0), (0, padded - (stop - start))))
            feats.append(frame_features(model, params, chunk))
        return jnp.mean(jnp.concatenate(feats, axis=1), axis=1)

    out = []
    for i in range(0, len(waves), batch_size):
        w = np.asarray(waves[i : i + batch_size], np.float32)
        n = len(w)
        if n < batch_size and len(waves) > batch_size:  # keep one compiled shape
            w = np.concatenate([w, np.zeros((batch_size - n, w.shape[1]), np.float32)])
        out.append(np.asarray(embed(student, w))[:n])
    return np.concatenate(out)
