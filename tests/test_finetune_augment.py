"""Fine-tuning batch augmentations as m2d applies them (via eval-audio-repr finetune.py): each output is the stated
function of its input for a fixed key, under jit, with batch shapes kept."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


# --- AS20K's random resize crop (nttcslab/eval-audio-repr finetune.py:24-79) and waveform mixup.


def _cubic64(x: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel, as torch's cubic_convolution1 (|x| <= 1) / cubic_convolution2 (1 < |x| < 2)."""
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _bicubic_align_corners64(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode='bicubic', align_corners=True) in float64, from its definition (aten
    UpSampleBicubic2d.cpp): source coordinate o·(in − 1)/(out − 1), taps floor − 1 .. floor + 2 clamped to the
    input, weights of the cubic kernel at the tap distances. (torch rounds the coordinate to float32 first.)"""
    in_h, in_w = img.shape

    def taps(o, n_in, n_out):
        x = o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        x0 = int(np.floor(x))
        return [(min(max(x0 - 1 + m, 0), n_in - 1), _cubic64(x - (x0 - 1 + m))) for m in range(4)]

    out = np.zeros((out_h, out_w))
    for p in range(out_h):
        for q in range(out_w):
            out[p, q] = sum(wy * wx * img[r, c] for r, wy in taps(p, in_h, out_h) for c, wx in taps(q, in_w, out_w))
    return out


def _evar_crop64(lms: np.ndarray, i: int, j: int, h: int, w: int) -> np.ndarray:
    """RandomResizeCrop.forward_one (finetune.py:51-66) with its draws given, in float64."""
    f, t = lms.shape
    canvas = np.zeros((int(f * 1.0), int(t * 1.5)))
    x, y = (canvas.shape[1] - t) // 2, (canvas.shape[0] - f) // 2
    canvas[y : y + f, x : x + t] = lms
    return _bicubic_align_corners64(canvas[i : i + h, j : j + w], f, t)


RRC_F, RRC_T = 16, 40  # a small log-mel: canvas 16 x 60


@pytest.mark.parametrize(
    "i, j, h, w",
    [
        (0, 10, 16, 40),  # the input itself: identity
        (0, 0, 16, 60),  # the whole canvas: zero margins squeezed in (downsampling in time)
        (3, 17, 10, 24),  # upsampling both axes, inside the input
        (0, 41, 13, 19),  # reaching into the right margin
        (6, 0, 10, 55),  # from the left margin across the input
        (15, 59, 1, 1),  # one canvas sample (a margin zero) everywhere
    ],
)
def test_resize_crop_is_torch_bicubic_of_evar_canvas_crop(i, j, h, w):
    """The jitted crop + resize against EVAR's canvas and crop computed in NumPy float64 and torch's bicubic
    (A = −0.75, align_corners=True as finetune.py:64-65 calls it) from its definition: within float32 rounding."""
    lms = np.random.default_rng(i + j).normal(size=(RRC_F, RRC_T))
    got = jax.jit(augment.resize_crop)(jnp.asarray(lms, jnp.float32), i, j, h, w)
    want = _evar_crop64(lms, i, j, h, w)
    assert_close_to_scale(np.asarray(got, np.float64), want, rtol=2e-6)
    if (i, j, h, w) == (0, 10, 16, 40):
        np.testing.assert_allclose(np.asarray(got), lms, rtol=0, atol=1e-5 * np.abs(lms).max())


def test_cubic_weights_are_torch_coefficients():
    """get_cubic_upsample_coefficients: [k(t + 1), k(t), k(1 − t), k(2 − t)] of the A = −0.75 kernel; they sum to 1."""
    t = np.linspace(0, 0.999, 37).astype(np.float32)
    got = np.asarray(augment.cubic_weights(jnp.asarray(t)), np.float64)
    want = np.array([[_cubic64(x + 1), _cubic64(x), _cubic64(1 - x), _cubic64(2 - x)] for x in t.astype(np.float64)])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)  # float32's cancellation near |x| = 2, as torch's
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_crop_draws_follow_evar_get_params():
    """finetune.py:42-49 over 40,000 draws on an 80 x 992 log-mel (canvas 80 x 1488): h = clip(int(U(0.6, 1.5)·80),
    1, 80) is 80 with probability 0.5/0.9 and uniform on 48..79 otherwise; w = int(U(0.6, 1.5)·992) uniform on
    [595, 1488) (never clipped: 1.5·992 fits the canvas); i uniform on 0..80 − h, j on 0..1488 − w (inclusive)."""
    n = 40_000
    i, j, h, w = (
        np.asarray(a)
        for a in jax.vmap(lambda k: augment.rrc_params(k, 80, 992))(jax.random.split(jax.random.key(0), n))
    )
    p_full = 0.5 / 0.9
    assert abs((h == 80).mean() - p_full) < 5 * np.sqrt(p_full * (1 - p_full) / n)
    assert h.min() == 48 and set(np.unique(h)) == set(range(48, 81))
    rest = np.bincount(h[h < 80] - 48, minlength=32) / n  # each of 48..79: (1/80)/0.9
    assert np.all(np.abs(rest - 1 / 72) < 5 * np.sqrt((1 / 72) / n)), rest
    assert w.min() >= 595 and w.max() <= 1487 and abs(w.mean() - (595 + 1487) / 2) < 3
    assert np.all((i >= 0) & (i <= 80 - h)) and np.all((j >= 0) & (j <= 1488 - w))
    u_i = i[h < 80] / (80 - h[h < 80])  # i / (canvas − h): uniform-ish on [0, 1], mean 1/2
    u_j = j / (1488 - w)
    assert abs(u_i.mean() - 0.5) < 0.01 and abs(u_j.mean() - 0.5) < 0.01
    assert np.all(i[h == 80] == 0)  # canvas_h == h: offset 0
    assert (j == 1488 - w).any() and (j == 0).any()  # both ends of randint's inclusive range


def test_random_resize_crop_crops_each_example_on_its_own():
    """finetune.py:71-72: a loop over the batch, each example its own crop; under jit, shapes and dtype kept; the
    AS20K preset crops after the stripes (finetune.py:112-115)."""
    mel = _mel()
    out = np.asarray(jax.jit(augment.random_resize_crop)(jax.random.key(2), mel))
    assert out.shape == (B, F, T) and out.dtype == np.float32
    keys = jax.random.split(jax.random.key(2), B)
    for b in range(B):
        want = _evar_crop64(np.asarray(mel[b], np.float64), *(int(v) for v in augment.rrc_params(keys[b], F, T)))
        assert_close_to_scale(out[b].astype(np.float64), want, rtol=2e-6)
    assert AS20K.rrc and not AS2M.rrc and AS20K.mixup_on == "waveform" and AS2M.mixup_on == "log_mel"
    key = jax.random.key(9)
    no_mix = AugmentConfig(freq_mask=30, time_mask=192, mixup_on="waveform", rrc=True)  # mixup done on the waveform
    got, _ = augment.augment_batch(key, mel, _targets(), no_mix)
    striped = augment.spec_augment(jax.random.split(key, 3)[1], mel, 30, 192)
    want = augment.random_resize_crop(jax.random.fold_in(key, 3), striped)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * np.abs(want).max())


def test_waveform_mixup_by_hand():
    """EVAR's AS20K mixes the loader's waveforms (finetune.py:254 on WavDataset batches, evar/data.py:170-188), by
    hand: out_i = λ_i x_i + (1 − λ_i) x_π(i) on the float waveform (int16 PCM / 32767, the front-end's scale), the
    targets the same way; the log-mel mixup then does nothing. 'log_mel' leaves the waveform alone."""
    pcm = np.random.default_rng(0).integers(-20_000, 20_000, (4, 1000)).astype(np.int16)
    y = np.eye(4, 5)
    cfg = AugmentConfig(mixup_alpha=0.3, mixup_on="waveform")
    key = jax.random.key(4)
    got_x, got_y = augment.mix_waveform(key, jnp.asarray(pcm), jnp.asarray(y, jnp.float32), cfg)
    lam, perm = (np.asarray(a, np.float64) for a in augment.mixup_params(key, 4, 0.3))
    perm = perm.astype(int)
    x = pcm / 32767.0
    want_x = np.stack([lam[b] * x[b] + (1 - lam[b]) * x[perm[b]] for b in range(4)])
    want_y = np.stack([lam[b] * y[b] + (1 - lam[b]) * y[perm[b]] for b in range(4)])
    assert_close_to_scale(np.asarray(got_x, np.float64), want_x, rtol=1e-6)
    assert_close_to_scale(np.asarray(got_y, np.float64), want_y, rtol=1e-6)
    mel, t = _mel(), _targets()
    out_mel, out_t = augment.augment_batch(key, mel, t, cfg)  # no stripes, no crop: nothing left to do
    np.testing.assert_array_equal(np.asarray(out_mel), np.asarray(mel))
    np.testing.assert_array_equal(np.asarray(out_t), np.asarray(t))
    same = augment.mix_waveform(key, jnp.asarray(pcm), jnp.asarray(y), AugmentConfig(mixup_alpha=0.3))
    assert same[0].dtype == jnp.int16 and np.array_equal(np.asarray(same[0]), pcm)
    with pytest.raises(ValueError, match="mixup_on='wave'"):
        augment.mix_waveform(key, jnp.asarray(pcm), jnp.asarray(y), AugmentConfig(mixup_alpha=0.3, mixup_on="wave"))
