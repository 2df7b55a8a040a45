"""On-device batch augmentations of m2d's AudioSet fine-tuning, as pure jittable functions of a ``jax.random`` key.

m2d fine-tunes through EVAR (nttcslab/m2d util/ft-as2m.sh:25, util/ft-as20k.sh:19 run nttcslab/eval-audio-repr
``finetune.py``). Per training step (eval-audio-repr finetune.py:250-258):

1. ``mixup`` on the batch as the loader gives it (finetune.py:144-163, 254): one λ_i ~ Beta(α, α) *per example*
   and one permutation π of the batch; x_i ← λ_i x_i + (1 − λ_i) x_π(i), and the multi-hot targets the same way.
   Linear in the loader's domain, no exp: for AS2M that is the log-mel (evar/data.py:95-139, 165 ``lms_mode``), for
   AS20K the waveform. Mixing the normalised log-mel, as here, is the same as mixing it before the normalisation
   (evar/ar_m2d.py:74-76 normalises afterwards): the normalisation is affine and λ + (1 − λ) = 1.
   With α = 0 nothing is mixed (finetune.py:155-156).
2. ``spec_augment`` on the normalised log-mel (evar/ar_m2d.py:76 → finetune.py:112-115, 95-100): torchaudio's
   ``FrequencyMasking(30)`` then ``TimeMasking(192)``: one stripe each, fill 0.0 (torchaudio's default mask_value,
   i.e. the normalised mean), ``iid_masks=False`` so **one stripe position for the whole batch**
   (torchaudio ``mask_along_axis``: width = ⌊u₁·W⌋, start = ⌊u₂·(size − u₁·W)⌋, u ~ U[0, 1), stripe
   [start, start + width), width ≤ W − 1). ``per_example=True`` draws one stripe per example instead (torchaudio's
   ``iid_masks=True``, what AST/AudioMAE loaders effectively do per item).
3. (AS20K only) random resize crop (finetune.py:24-79, ``--rrc True``) — not implemented here.

m2d's fine-tuning has **no time roll**; ``random_time_roll`` is AudioMAE's fbank roll (facebookresearch/AudioMAE
dataset.py:301-303, with its ``noise`` option, for speech commands: ``torch.roll(fbank, np.random.randint(-10, 10),
0)`` over time, per example, shift in [−10, 9]), off (``max_shift=0``) in the m2d presets. (AudioMAE's AudioSet
recipe instead rolls the *waveform* by a uniform [0, length) and scales it by Beta(10, 10) + 0.5, dataset.py:169-174,
ft_as.sh:47.) m2d's ``--training_mask 0.5`` (random structured token masking inside the
encoder, nttcslab/m2d patch_m2d.diff:2245-2265, m2d/runtime_audio.py:248-249) is an encoder option, not a batch
augmentation, and is not here either.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What ``augment_batch`` applies; the presets below are m2d's published AudioSet fine-tuning values."""

    mixup_alpha: float = 0.0  # Beta(α, α) per example; 0 = no mixup
    freq_mask: int = 0  # torchaudio FrequencyMasking(freq_mask): stripe width in [0, freq_mask - 1] bins; 0 = off
    time_mask: int = 0  # torchaudio TimeMasking(time_mask): stripe width in [0, time_mask - 1] frames; 0 = off
    per_example_masks: bool = False  # False: one stripe for the whole batch (torchaudio iid_masks=False, m2d)
    mask_value: float = 0.0  # fill of the masked stripes, in the normalised log-mel domain
    max_time_shift: int = 0  # random cyclic time shift in [-max, max - 1] frames per example (AudioMAE); 0 = off


# nttcslab/m2d util/ft-as2m.sh:25: --freq_mask 30 --time_mask 192 --mixup 0.5 --rrc False
AS2M = AugmentConfig(mixup_alpha=0.5, freq_mask=30, time_mask=192)
# nttcslab/m2d util/ft-as20k.sh:19: --freq_mask 30 --time_mask 192 --mixup 0.3 --rrc True (rrc not implemented)
AS20K = AugmentConfig(mixup_alpha=0.3, freq_mask=30, time_mask=192)


def mixup_params(key: jax.Array, batch: int, alpha: float) -> tuple[jax.Array, jax.Array]:
    """(λ [B] ~ Beta(α, α) i.i.d., permutation π [B]) as EVAR's ``Mixup.get_lambda`` (finetune.py:149-152)."""
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha, (batch,), jnp.float32)
    return lam, jax.random.permutation(k_perm, batch)


def mixup(key: jax.Array, x: jax.Array, targets: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
    """x [B, ...] and targets [B, C] -> λ_i x_i + (1 − λ_i) x_π(i) and the same mix of the targets
    (finetune.py:157-162). ``alpha`` is static; 0 returns the inputs unchanged."""
    if alpha == 0.0:
        return x, targets
    lam, perm = mixup_params(key, x.shape[0], alpha)

    def mix(z):
        w = lam.reshape((-1,) + (1,) * (z.ndim - 1)).astype(z.dtype)
        return z * w + z[perm] * (1.0 - w)

    return mix(x), mix(targets)


def stripe_bounds(key: jax.Array, shape: tuple[int, ...], size: int, max_width: int) -> tuple[jax.Array, jax.Array]:
    """torchaudio ``mask_along_axis`` draws, in float32 and truncated toward zero as torch's ``.long()``: width =
    trunc(u₁ W), start = trunc(u₂ (size − u₁ W)), one pair per entry of ``shape`` (() = one stripe for everything)
    -> (start, end) int32, the stripe [start, end). (start < 0 only when W > size: the stripe is then clipped.)"""
    k_width, k_start = jax.random.split(key)
    value = jax.random.uniform(k_width, shape, jnp.float32) * max_width
    min_value = jax.random.uniform(k_start, shape, jnp.float32) * (size - value)
    start = min_value.astype(jnp.int32)  # float -> int conversion truncates toward zero, as torch's .long()
    return start, start + value.astype(jnp.int32)


def mask_along_axis(
    key: jax.Array, x: jax.Array, max_width: int, axis: int, per_example: bool = False, value: float = 0.0
) -> jax.Array:
    """x [B, F, T]: one stripe [start, start + width) along ``axis`` (1: frequency, 2: time) set to ``value``; the
    same stripe for the whole batch unless ``per_example``. ``max_width`` < 1 leaves x unchanged (torchaudio)."""
    if x.ndim != 3 or axis not in (1, 2):
        raise ValueError(f"mask_along_axis expects x [B, F, T] and axis 1 or 2, got shape {x.shape}, axis {axis}")
    if max_width < 1:
        return x
    size = x.shape[axis]
    start, end = stripe_bounds(key, (x.shape[0],) if per_example else (), size, max_width)
    start, end = jnp.reshape(start, (-1, 1)), jnp.reshape(end, (-1, 1))  # [B or 1, 1]
    idx = jnp.arange(size)
    hit = (idx >= start) & (idx < end)  # [B or 1, size]
    hit = hit[:, :, None] if axis == 1 else hit[:, None, :]
    return jnp.where(hit, jnp.asarray(value, x.dtype), x)


def spec_augment(
    key: jax.Array, mel: jax.Array, freq_mask: int, time_mask: int, per_example: bool = False, value: float = 0.0
) -> jax.Array:
    """mel [B, F, T] -> one frequency stripe, then one time stripe (finetune.py:95-100)."""
    k_freq, k_time = jax.random.split(key)
    mel = mask_along_axis(k_freq, mel, freq_mask, 1, per_example, value)
    return mask_along_axis(k_time, mel, time_mask, 2, per_example, value)


def random_time_roll(key: jax.Array, mel: jax.Array, max_shift: int) -> jax.Array:
    """mel [B, F, T] -> each example cyclically shifted along time by its own s ∈ [−max_shift, max_shift − 1]
    (``np.random.randint(-max_shift, max_shift)``, AudioMAE dataset.py:303): out[b, :, t] = mel[b, :, (t − s_b) mod T].
    ``max_shift`` 0 leaves mel unchanged."""
    if max_shift <= 0:
        return mel
    b, _, t = mel.shape
    shift = jax.random.randint(key, (b,), -max_shift, max_shift)
    src = jnp.mod(jnp.arange(t)[None, :] - shift[:, None], t)  # [B, T]
    return jnp.take_along_axis(mel, src[:, None, :], axis=2)


def augment_batch(
    key: jax.Array, mel: jax.Array, targets: jax.Array, cfg: AugmentConfig
) -> tuple[jax.Array, jax.Array]:
    """Normalised log-mel [B, F, T] and targets [B, C] -> augmented, in m2d's order: mixup, frequency then time
    stripe, then (if enabled) the time roll. ``cfg`` is static (jit it with the config closed over)."""
    k_mix, k_mask, k_roll = jax.random.split(key, 3)
    mel, targets = mixup(k_mix, mel, targets, cfg.mixup_alpha)
    mel = spec_augment(k_mask, mel, cfg.freq_mask, cfg.time_mask, cfg.per_example_masks, cfg.mask_value)
    return random_time_roll(k_roll, mel, cfg.max_time_shift), targets
