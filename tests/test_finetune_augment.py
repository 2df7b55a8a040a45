"""Fine-tuning batch augmentations as m2d applies them (via eval-audio-repr finetune.py): each output is the stated
function of its input for a fixed key, under jit, with batch shapes kept."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from helpers import assert_close_to_scale

from matpac_jax.finetune import augment
from matpac_jax.finetune.augment import AS2M, AS20K, AugmentConfig

B, F, T, C = 6, 80, 200, 5


def _mel(seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(1.0, 2.0, (B, F, T)), jnp.float32)  # no zeros


def _targets(seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 2, (B, C)), jnp.float32)


def _stripe(zero: np.ndarray) -> tuple[int, int]:
    """(start, end) of the single contiguous run of True in a 1-D mask ((0, 0) when empty)."""
    idx = np.flatnonzero(zero)
    if idx.size == 0:
        return 0, 0
    assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), f"not one contiguous stripe: {idx}"
    return int(idx[0]), int(idx[-1]) + 1


def test_presets_are_m2d_published_values():
    """nttcslab/m2d util/ft-as2m.sh:25 (--freq_mask 30 --time_mask 192 --mixup 0.5) and util/ft-as20k.sh:19
    (--freq_mask 30 --time_mask 192 --mixup 0.3); one batch-shared stripe, fill 0, no roll (nttcslab/eval-audio-repr
    finetune.py:91-115 has no roll)."""
    assert (AS2M.mixup_alpha, AS2M.freq_mask, AS2M.time_mask) == (0.5, 30, 192)
    assert (AS20K.mixup_alpha, AS20K.freq_mask, AS20K.time_mask) == (0.3, 30, 192)
    for cfg in (AS2M, AS20K):
        assert (cfg.per_example_masks, cfg.mask_value, cfg.max_time_shift) == (False, 0.0, 0)


def test_mixup_is_per_example_lambda_with_one_permutation_on_inputs_and_targets():
    """nttcslab/eval-audio-repr finetune.py:149-162: lambdas = Beta(α, α) of size batch, one permutation;
    out_i = λ_i x_i + (1 − λ_i) x_perm(i), the targets mixed the same way, linearly (no exp)."""
    key, x, y = jax.random.key(3), _mel(), _targets()
    got_x, got_y = augment.mixup(key, x, y, 0.5)
    lam, perm = (np.asarray(a) for a in augment.mixup_params(key, B, 0.5))
    assert sorted(perm.tolist()) == list(range(B)) and len(set(lam.tolist())) == B and np.all((lam > 0) & (lam < 1))
    x64, y64, l3 = np.asarray(x, np.float64), np.asarray(y, np.float64), lam[:, None, None]
    assert_close_to_scale(np.asarray(got_x), l3 * x64 + (1 - l3) * x64[perm], rtol=1e-6)
    assert_close_to_scale(np.asarray(got_y), lam[:, None] * y64 + (1 - lam[:, None]) * y64[perm], rtol=1e-6)


def test_mixup_lambda_follows_beta_alpha_alpha_and_alpha_zero_is_identity():
    """finetune.py:150 np.random.beta(α, α): mean 1/2, variance 1/(4(2α + 1)); finetune.py:155-156: α = 0 is off."""
    lam, _ = augment.mixup_params(jax.random.key(0), 40_000, 0.3)
    lam = np.asarray(lam, np.float64)
    assert abs(lam.mean() - 0.5) < 0.01 and abs(lam.var() - 1 / (4 * 1.6)) < 0.005
    x, y = _mel(), _targets()
    out_x, out_y = augment.mixup(jax.random.key(1), x, y, 0.0)
    assert out_x is x and out_y is y


def test_spec_augment_fills_exactly_one_batch_shared_stripe_per_axis():
    """nttcslab/eval-audio-repr finetune.py:91-100: torchaudio FrequencyMasking(30) then TimeMasking(192),
    iid_masks=False (one stripe for the whole batch), mask_value 0.0; every other value unchanged."""
    x = _mel()
    out = np.asarray(augment.spec_augment(jax.random.key(7), x, 30, 192))
    zero = out == 0.0
    f0, f1 = _stripe(zero.all(axis=(0, 2)))
    t0, t1 = _stripe(zero.all(axis=(0, 1)))
    assert 0 < f1 - f0 <= 29 and 0 < t1 - t0 <= 191  # this key draws non-empty stripes
    want = np.asarray(x).copy()
    want[:, f0:f1, :] = 0.0
    want[:, :, t0:t1] = 0.0
    np.testing.assert_array_equal(out, want)


def test_stripe_draws_follow_torchaudio_mask_along_axis():
    """pytorch/audio src/torchaudio/functional/functional.py ``mask_along_axis``: value = rand * W, min_value = rand *
    (size − value), stripe [long(min_value), long(min_value) + long(value)): widths in [0, W − 1], end <= size."""
    keys = jax.random.split(jax.random.key(0), 4000)
    start, end = jax.vmap(lambda k: augment.stripe_bounds(k, (), T, 192))(keys)
    start, width = np.asarray(start), np.asarray(end - start)
    assert width.min() == 0 and width.max() == 191 and start.min() == 0 and np.all(start + width <= T)
    k_width, k_start = jax.random.split(keys[0])
    value = float(jax.random.uniform(k_width, (), jnp.float32)) * 192
    min_value = float(jax.random.uniform(k_start, (), jnp.float32)) * (T - value)
    assert (start[0], width[0]) == (int(min_value), int(value))


def test_per_example_masks_draw_one_stripe_per_example():
    """torchaudio iid_masks=True (the alternative to m2d's batch-shared stripe): each example its own stripe."""
    x = _mel()
    out = np.asarray(augment.mask_along_axis(jax.random.key(5), x, 60, 2, per_example=True, value=-1.0))
    stripes = [_stripe((out[b] == -1.0).all(axis=0)) for b in range(B)]
    assert len(set(stripes)) > 1 and all(t1 > t0 for t0, t1 in stripes)
    for b, (t0, t1) in enumerate(stripes):
        assert t1 - t0 <= 59
        want = np.asarray(x[b]).copy()
        want[:, t0:t1] = -1.0
        np.testing.assert_array_equal(out[b], want)


def test_time_roll_is_a_cyclic_shift_within_bounds_per_example():
    """facebookresearch/AudioMAE dataset.py:303 torch.roll(fbank, np.random.randint(-10, 10), 0): a per-example
    cyclic time shift s in [-10, 9]; m2d itself does not roll (presets max_time_shift 0)."""
    x = np.asarray(_mel())
    shifts = set()
    for seed in range(30):
        out = np.asarray(augment.random_time_roll(jax.random.key(seed), jnp.asarray(x), 10))
        for b in range(B):
            found = [s for s in range(-10, 10) if np.array_equal(out[b], np.roll(x[b], s, axis=-1))]
            assert len(found) == 1, (seed, b, found)
            shifts.add(found[0])
    assert shifts == set(range(-10, 10))
    np.testing.assert_array_equal(np.asarray(augment.random_time_roll(jax.random.key(0), jnp.asarray(x), 0)), x)


def test_augment_batch_jits_and_keeps_shapes_and_dtypes():
    """The whole step (mixup → frequency stripe → time stripe → roll, the order of finetune.py:254 and
    evar/ar_m2d.py:74-76) under jit equals the eager call; shapes and dtypes are kept."""
    cfg = AugmentConfig(mixup_alpha=0.5, freq_mask=30, time_mask=192, max_time_shift=10)
    x, y, key = _mel(), _targets(), jax.random.key(11)
    jitted = jax.jit(functools.partial(augment.augment_batch, cfg=cfg))
    got_x, got_y = jitted(key, x, y)
    want_x, want_y = augment.augment_batch(key, x, y, cfg)
    assert got_x.shape == x.shape and got_x.dtype == x.dtype and got_y.shape == y.shape and got_y.dtype == y.dtype
    assert_close_to_scale(np.asarray(got_x), np.asarray(want_x), rtol=1e-6)
    assert_close_to_scale(np.asarray(got_y), np.asarray(want_y), rtol=1e-6)
    out = np.asarray(jax.jit(functools.partial(augment.augment_batch, cfg=AS2M))(key, x, y)[0])
    assert out.shape == (B, F, T) and (out == 0.0).any()
