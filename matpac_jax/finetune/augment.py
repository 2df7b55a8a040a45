"""On-device batch augmentations of m2d's AudioSet fine-tuning, as pure jittable functions of a ``jax.random`` key.

m2d fine-tunes through EVAR (nttcslab/m2d util/ft-as2m.sh:25, util/ft-as20k.sh:19 run nttcslab/eval-audio-repr
``finetune.py``). Per training step (eval-audio-repr finetune.py:250-258):

1. ``mixup`` on the batch as the loader gives it (finetune.py:144-163, 254): one λ_i ~ Beta(α, α) *per example*
   and one permutation π of the batch; x_i ← λ_i x_i + (1 − λ_i) x_π(i), and the multi-hot targets the same way.
   Linear in the loader's domain, no exp: for AS2M that is the log-mel (evar/data.py:146-165, the ``as`` task's
   loader of stored log-mels, ``lms_mode``), for AS20K the waveform (evar/data.py:170-188, ``WavDataset``; the
   log-mel is computed from the mixed waveform, evar/ar_m2d.py:53-59). ``AugmentConfig.mixup_on`` says which:
   ``'log_mel'`` mixes here in ``augment_batch``; ``'waveform'`` mixes in ``mix_waveform``, before the front-end.
   Mixing the normalised log-mel is the same as mixing it before the normalisation (evar/ar_m2d.py:74-76 normalises
   afterwards): the normalisation is affine and λ + (1 − λ) = 1. With α = 0 nothing is mixed (finetune.py:155-156).
2. ``spec_augment`` on the normalised log-mel (evar/ar_m2d.py:76 → finetune.py:112-115, 95-100): torchaudio's
   ``FrequencyMasking(30)`` then ``TimeMasking(192)``: one stripe each, fill 0.0 (torchaudio's default mask_value,
   i.e. the normalised mean), ``iid_masks=False`` so **one stripe position for the whole batch**
   (torchaudio ``mask_along_axis``: width = ⌊u₁·W⌋, start = ⌊u₂·(size − u₁·W)⌋, u ~ U[0, 1), stripe
   [start, start + width), width ≤ W − 1). ``per_example=True`` draws one stripe per example instead (torchaudio's
   ``iid_masks=True``, what AST/AudioMAE loaders effectively do per item).
3. (AS20K only) ``random_resize_crop`` after the stripes (finetune.py:112-115, ``--rrc True``), each example its
   own crop (finetune.py:68-73), as EVAR's ``RandomResizeCrop`` (finetune.py:24-66) with its defaults: the log-mel
   [F, T] pasted in the middle of a zero canvas [int(1.0 F), int(1.5 T)] (virtual crop ×(1.0, 1.5), :53-59; zero is
   the normalised mean), a crop of h = clip(int(U(0.6, 1.5) F), 1, F) bins and w = clip(int(U(0.6, 1.5) T), 1,
   int(1.5 T)) frames at a uniform offset (:42-49, ``random.randint`` inclusive), resized back to [F, T] by torch's
   bicubic (A = −0.75) with ``align_corners=True`` (:64-65). Jittable: the crop's size and place are traced
   scalars, the resize a 4-tap gather per axis (``resize_crop``). (EVAR crops the 1,001-frame log-mel that its
   encoder then cuts to 992; here the 992 frames the encoder sees are cropped.)

m2d's fine-tuning has **no time roll**; ``random_time_roll`` is AudioMAE's fbank roll (facebookresearch/AudioMAE
dataset.py:301-303, with its ``noise`` option, for speech commands: ``torch.roll(fbank, np.random.randint(-10, 10),
0)`` over time, per example, shift in [−10, 9]), off (``max_shift=0``) in the m2d presets. (AudioMAE's AudioSet
recipe instead rolls the *waveform* by a uniform [0, length) and scales it by Beta(10, 10) + 0.5, dataset.py:169-174,
ft_as.sh:47.) m2d's ``--training_mask 0.5`` (random structured token masking inside the
encoder, nttcslab/m2d patch_m2d.diff:2245-2266, m2d/runtime_audio.py:248-249) is an encoder option, not a batch
augmentation: ``finetune.token_mask``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from matpac_jax.audio.io import INT16_SCALE


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What ``augment_batch`` applies; the presets below are m2d's published AudioSet fine-tuning values."""

    mixup_alpha: float = 0.0  # Beta(α, α) per example; 0 = no mixup
    freq_mask: int = 0  # torchaudio FrequencyMasking(freq_mask): stripe width in [0, freq_mask - 1] bins; 0 = off
    time_mask: int = 0  # torchaudio TimeMasking(time_mask): stripe width in [0, time_mask - 1] frames; 0 = off
    per_example_masks: bool = False  # False: one stripe for the whole batch (torchaudio iid_masks=False, m2d)
    mask_value: float = 0.0  # fill of the masked stripes, in the normalised log-mel domain
    max_time_shift: int = 0  # random cyclic time shift in [-max, max - 1] frames per example (AudioMAE); 0 = off
    mixup_on: str = "log_mel"  # what mixup mixes: 'log_mel' (EVAR's AS2M) or 'waveform' (EVAR's AS20K)
    rrc: bool = False  # EVAR's RandomResizeCrop with its defaults (RRC_* below), after the stripes


MIXUP_DOMAINS = ("log_mel", "waveform")
# nttcslab/m2d util/ft-as2m.sh:25: --freq_mask 30 --time_mask 192 --mixup 0.5 --rrc False; log-mel loader
AS2M = AugmentConfig(mixup_alpha=0.5, freq_mask=30, time_mask=192)
# nttcslab/m2d util/ft-as20k.sh:19: --freq_mask 30 --time_mask 192 --mixup 0.3 --rrc True; waveform loader
AS20K = AugmentConfig(mixup_alpha=0.3, freq_mask=30, time_mask=192, mixup_on="waveform", rrc=True)

# eval-audio-repr finetune.py:33 RandomResizeCrop's defaults, and torch's bicubic constant (aten UpSample.h
# ``upsample_bicubic2d``: cubic convolution with A = -0.75)
RRC_VIRTUAL_CROP = (1.0, 1.5)  # canvas (frequency, time) relative to the input
RRC_FREQ_SCALE = (0.6, 1.5)
RRC_TIME_SCALE = (0.6, 1.5)
BICUBIC_A = -0.75


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


def rrc_params(key: jax.Array, freq: int, time: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One crop (i, j, h, w) int32 of the canvas, as ``RandomResizeCrop.get_params`` (finetune.py:42-49):
    h = clip(int(U(0.6, 1.5) F), 1, canvas_h), w likewise over time, i ~ U{0..canvas_h − h}, j ~ U{0..canvas_w − w}.
    (EVAR draws the scales in float64, here in float32.)"""
    canvas_h, canvas_w = int(freq * RRC_VIRTUAL_CROP[0]), int(time * RRC_VIRTUAL_CROP[1])
    k_h, k_w, k_i, k_j = jax.random.split(key, 4)
    h = jnp.clip((jax.random.uniform(k_h, (), jnp.float32, *RRC_FREQ_SCALE) * freq).astype(jnp.int32), 1, canvas_h)
    w = jnp.clip((jax.random.uniform(k_w, (), jnp.float32, *RRC_TIME_SCALE) * time).astype(jnp.int32), 1, canvas_w)
    i = jax.random.randint(k_i, (), 0, canvas_h - h + 1)
    j = jax.random.randint(k_j, (), 0, canvas_w - w + 1)
    return i, j, h, w


def cubic_weights(t: jax.Array) -> jax.Array:
    """t [...] in [0, 1) -> the 4 tap weights [..., 4] of torch's ``get_cubic_upsample_coefficients`` (A = −0.75)."""
    a = BICUBIC_A

    def near(x):  # |x| <= 1: cubic_convolution1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2: cubic_convolution2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _taps(start: jax.Array, size: jax.Array, out: int) -> tuple[jax.Array, jax.Array]:
    """Source indices [out, 4] (crop coordinates + ``start``) and weights [out, 4] of resizing ``size`` samples to
    ``out`` with align_corners=True: source x = o·(size − 1)/(out − 1), taps floor(x) − 1 .. + 2 clamped to the crop
    (torch's ``upsample_get_value_bounded``). x is split exactly in integers (floor and remainder), so jit's
    rewrites cannot move a tap; torch rounds x to float32 first, which moves its weights by up to ≈ 2e-5 of the
    values' scale on a 1,488-frame canvas."""
    denom = max(out - 1, 1)
    num = jnp.arange(out, dtype=jnp.int32) * (jnp.asarray(size, jnp.int32) - 1)  # x = num / denom
    x0 = num // denom
    frac = (num - x0 * denom).astype(jnp.float32) / jnp.float32(denom)
    idx = jnp.clip(x0[:, None] + jnp.arange(-1, 3), 0, size - 1)
    return start + idx, cubic_weights(frac)


def resize_crop(lms: jax.Array, i: jax.Array, j: jax.Array, h: jax.Array, w: jax.Array) -> jax.Array:
    """lms [F, T] -> the crop [i:i+h, j:j+w] of its zero canvas (finetune.py:53-62) resized to [F, T] by torch's
    bicubic, align_corners=True (finetune.py:64-65): time taps first, then frequency, as torch's 2-D kernel."""
    freq, time = lms.shape
    canvas_h, canvas_w = int(freq * RRC_VIRTUAL_CROP[0]), int(time * RRC_VIRTUAL_CROP[1])
    y0, x0 = (canvas_h - freq) // 2, (canvas_w - time) // 2  # where the input sits on the canvas

    cols, wx = _taps(j - x0, w, time)  # [T, 4] input columns (outside the input: the canvas's zeros)
    inside = (cols >= 0) & (cols < time)
    picked = jnp.where(inside, lms[:, jnp.clip(cols, 0, time - 1)], 0.0)  # [F, T, 4]
    along_time = jnp.einsum("ftk,tk->ft", picked, wx.astype(lms.dtype))
    rows, wy = _taps(i - y0, h, freq)  # [F, 4]
    inside = (rows >= 0) & (rows < freq)
    picked = jnp.where(inside[:, :, None], along_time[jnp.clip(rows, 0, freq - 1)], 0.0)  # [F, 4, T]
    return jnp.einsum("fkt,fk->ft", picked, wy.astype(lms.dtype))


def random_resize_crop(key: jax.Array, mel: jax.Array) -> jax.Array:
    """mel [B, F, T] -> each example its own random resize crop (finetune.py:68-73)."""
    _, freq, time = mel.shape

    def one(k, x):
        return resize_crop(x, *rrc_params(k, freq, time))

    return jax.vmap(one)(jax.random.split(key, mel.shape[0]), mel)


def mix_waveform(
    key: jax.Array, audio: jax.Array, targets: jax.Array, cfg: AugmentConfig
) -> tuple[jax.Array, jax.Array]:
    """Mixup of the waveforms [B, N] (float, or int16 PCM scaled as the front-end scales it) and targets when
    ``cfg.mixup_on == 'waveform'`` (EVAR's AS20K, finetune.py:254 on ``WavDataset`` batches); else unchanged."""
    if cfg.mixup_on not in MIXUP_DOMAINS:
        raise ValueError(f"config.finetune.mixup_on={cfg.mixup_on!r}: expected one of {MIXUP_DOMAINS}")
    if cfg.mixup_on != "waveform" or cfg.mixup_alpha == 0.0:
        return audio, targets
    if audio.dtype == jnp.int16:
        audio = audio.astype(jnp.float32) / jnp.float32(INT16_SCALE)
    return mixup(key, audio, targets, cfg.mixup_alpha)


def augment_batch(
    key: jax.Array, mel: jax.Array, targets: jax.Array, cfg: AugmentConfig
) -> tuple[jax.Array, jax.Array]:
    """Normalised log-mel [B, F, T] and targets [B, C] -> augmented, in EVAR's order: mixup (when it mixes the
    log-mel), frequency then time stripe, the random resize crop (if enabled), then the time roll (if enabled).
    ``cfg`` is static (jit it with the config closed over)."""
    k_mix, k_mask, k_roll = jax.random.split(key, 3)
    if cfg.mixup_on == "log_mel":
        mel, targets = mixup(k_mix, mel, targets, cfg.mixup_alpha)
    mel = spec_augment(k_mask, mel, cfg.freq_mask, cfg.time_mask, cfg.per_example_masks, cfg.mask_value)
    if cfg.rrc:
        mel = random_resize_crop(jax.random.fold_in(key, 3), mel)
    return random_time_roll(k_roll, mel, cfg.max_time_shift), targets
