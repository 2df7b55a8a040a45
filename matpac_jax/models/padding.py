"""A clip's padding frames, kept out of the students' computation (MobileNetV3, DyMN, ERes2Net).

``Student.embed`` (models.student) zero-pads clips of many lengths to a few length buckets, so that a few compiled
programs serve every length; each backbone then takes ``frames`` [B], the true frame count of each log-mel row, and
follows it through its strided layers: a stride-``s`` convolution with padding ``(k - 1) // 2`` maps ``n`` frames to
``ceil(n / s)``, the count the unpadded clip gives, whatever the bucket. Two things keep the padding out:

* ``mean`` / ``mean_and_std``: every mean or standard deviation over time (global pooling, squeeze-excitation,
  DyMN's context, ERes2Net's TSTP) is taken over the real time steps only;
* ``zero_padding``: the input of every layer that mixes neighbouring time steps (a k×k convolution, DyMN's window-3
  pooling) is set to zero past the real steps, which is what that layer's own zero padding shows it at the end of
  the unpadded clip. Masking only the pooling would leave the padding (the log-mel of silence) to reach the last
  real steps of every feature map through the receptive field: an error that grows with the padded share of the
  bucket (all of it for a 1-frame clip in a 64-frame bucket).

By induction over the layers, every real time step of every feature map then equals the unpadded computation's
(per-position layers, BatchNorm at inference, 1×1 convolutions and gates never mix time steps), so a padded clip's
embedding is the unpadded one up to float rounding (other shapes, other summation orders).

``frames=None`` (training: fixed-length crops, no padding) runs the very operations the backbones ran before the
mask existed, so the distillation step is numerically unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def strided(frames: jax.Array | None, stride: int) -> jax.Array | None:
    """The true frame count after a stride-``stride`` layer with "same" padding: ``ceil(frames / stride)``."""
    return frames if frames is None or stride == 1 else -(-frames // stride)


def time_mask(frames: jax.Array, steps: int, ndim: int, time_axis: int) -> jax.Array:
    """[B, 1.., steps, 1..] booleans (rank ``ndim``, ``steps`` along ``time_axis``): True on each row's real steps."""
    shape = [1] * ndim
    shape[0], shape[time_axis] = frames.shape[0], steps
    return (jnp.arange(steps)[None, :] < frames[:, None]).reshape(shape)


def zero_padding(x: jax.Array, frames: jax.Array | None, time_axis: int = 2) -> jax.Array:
    """``x`` with the steps past each row's ``frames`` along ``time_axis`` set to zero (``x`` itself for None)."""
    if frames is None:
        return x
    return jnp.where(time_mask(frames, x.shape[time_axis], x.ndim, time_axis), x, jnp.zeros((), x.dtype))


def mean(x: jax.Array, axis: tuple[int, ...], frames: jax.Array | None, time_axis: int, keepdims=False) -> jax.Array:
    """``jnp.mean(x, axis)`` over the real steps of each row only (``time_axis`` is in ``axis``); with ``frames``
    None, ``jnp.mean`` itself."""
    if frames is None:
        return jnp.mean(x, axis=axis, keepdims=keepdims)
    mask = time_mask(frames, x.shape[time_axis], x.ndim, time_axis)
    count = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=axis, keepdims=keepdims).astype(x.dtype)
    return jnp.sum(jnp.where(mask, x, 0), axis=axis, keepdims=keepdims) / count


def mean_and_std(x: jax.Array, frames: jax.Array | None, ddof: int = 1, eps: float = 0.0) -> tuple[jax.Array, ...]:
    """[B, R, T] -> (mean, sqrt(var + eps)) over T, each [B, R], the variance with ``ddof`` (TSTP's statistics), over
    each row's real steps; with ``frames`` None, ``jnp.mean`` and ``jnp.var`` themselves."""
    if frames is None:
        return jnp.mean(x, axis=-1), jnp.sqrt(jnp.var(x, axis=-1, ddof=ddof) + eps)
    mask = time_mask(frames, x.shape[-1], 3, 2)
    count = frames.astype(x.dtype)[:, None]
    mu = jnp.sum(jnp.where(mask, x, 0), axis=-1) / count
    centred = jnp.where(mask, x - mu[..., None], 0)
    return mu, jnp.sqrt(jnp.sum(centred * centred, axis=-1) / (count - ddof) + eps)
