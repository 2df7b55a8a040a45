"""Each formula of the MATPAC / MATPAC++ objective against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_scale

from matpac_jax.matpac import objective as obj

RNG = np.random.default_rng(0)


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_masking_counts_match_the_reference_for_vit_b_grid():
    ids_keep, ids_mask = obj.random_masking(jax.random.key(0), 4, 190, 0.7)
    assert ids_keep.shape == (4, 57) and ids_mask.shape == (4, 133)
    for keep, mask in zip(np.asarray(ids_keep), np.asarray(ids_mask), strict=True):
        assert sorted(np.concatenate([keep, mask]).tolist()) == list(range(190))  # disjoint and complete


def test_masking_is_per_sample_and_rng_explicit():
    a = np.asarray(obj.random_masking(jax.random.key(1), 8, 190, 0.7)[0])
    b = np.asarray(obj.random_masking(jax.random.key(1), 8, 190, 0.7)[0])
    c = np.asarray(obj.random_masking(jax.random.key(2), 8, 190, 0.7)[0])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(row) for row in a}) == 8  # every sample has its own mask


def test_prediction_loss_is_two_minus_two_cosine():
    preds, targets = RNG.normal(size=(3, 2, 5, 16)), RNG.normal(size=(2, 5, 16))
    expected = 2 - 2 * np.sum(np_normalize(preds) * np_normalize(targets)[None], axis=-1)
    got = obj.prediction_losses(jnp.asarray(preds, jnp.float32), jnp.asarray(targets, jnp.float32))
    assert_close_to_scale(got, expected)


def test_soft_mcl_weights_are_stop_gradient_softmax_of_negative_loss():
    losses = RNG.uniform(0, 2, size=(5, 3, 7))
    temp = 0.05
    q = np_softmax(-losses / temp, axis=0)
    loss, winner = obj.mcl_loss(jnp.asarray(losses, jnp.float32), jnp.float32(temp), 1e-4)
    np.testing.assert_allclose(np.asarray(loss), np.sum(q * losses, axis=0), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(winner), np.argmin(losses, axis=0))
    grad = jax.grad(lambda x: obj.mcl_loss(x, jnp.float32(temp), 1e-4)[0].sum())(jnp.asarray(losses, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), q, rtol=1e-4, atol=1e-6)  # q carries no gradient


def test_hard_mcl_is_winner_takes_all_below_the_threshold():
    losses = RNG.uniform(0, 2, size=(5, 3, 7))
    temp = jnp.float32(5e-5)  # below 1e-4
    loss, _ = obj.mcl_loss(jnp.asarray(losses, jnp.float32), temp, 1e-4)
    np.testing.assert_allclose(np.asarray(loss), losses.min(axis=0), rtol=1e-6)
    grad = jax.grad(lambda x: obj.mcl_loss(x, temp, 1e-4)[0].sum())(jnp.asarray(losses, jnp.float32))
    np.testing.assert_array_equal(np.asarray(grad), (losses == losses.min(axis=0)).astype(np.float32))


def test_single_hypothesis_reduces_to_plain_matpac_loss():
    losses = RNG.uniform(0, 2, size=(1, 3, 7))
    loss, winner = obj.mcl_loss(jnp.asarray(losses, jnp.float32), jnp.float32(0.1), 1e-4)
    np.testing.assert_allclose(np.asarray(loss), losses[0], rtol=1e-6)
    assert not np.asarray(winner).any()


def test_winner_selection_picks_the_argmin_hypothesis():
    preds = RNG.normal(size=(4, 2, 3, 8)).astype(np.float32)
    winner = RNG.integers(0, 4, size=(2, 3))
    got = np.asarray(obj.select_hypothesis(jnp.asarray(preds), jnp.asarray(winner)))
    expected = np.stack([[preds[winner[b, m], b, m] for m in range(3)] for b in range(2)])
    np.testing.assert_array_equal(got, expected)


def test_mcl_temperature_schedule_and_switch_to_hard():
    steps = np.array([0, 1, 1000, 230_000, 230_300])
    got = np.asarray(obj.mcl_temperature(jnp.asarray(steps), 0.1, 0.99997))
    np.testing.assert_allclose(got, 0.1 * 0.99997 ** steps.astype(np.float64), rtol=1e-4)
    switch = np.ceil(np.log(1e-4 / 0.1) / np.log(0.99997))  # first step with T <= 1e-4
    assert 230_000 < switch < 230_300
    assert got[3] > 1e-4 > got[4]


def test_teacher_temperature_warms_up_linearly_then_stays():
    """τ_t = 0.04 + 0.03 · t / 9827 for t < 9827, then 0.07: the reference's ``get_annealed_rate``
    (aurianworld/matpac training_matpac/models/utils.py:8-17, called at models/model.py:273-278), which divides by
    the warm-up length, not by its length − 1 as np.linspace would."""
    steps = np.asarray([0, 4913, 9826, 9827, 200_000])
    got = np.asarray(obj.teacher_temperature(jnp.asarray(steps), 0.04, 0.07, 9827), np.float64)
    expected = np.where(steps < 9827, 0.04 + 0.03 * steps / 9827, 0.07)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[2] < 0.07  # with linspace semantics step 9826 would already be at 0.07


def test_teacher_probabilities_and_cls_loss_match_reference():
    t_logits, s_logits = RNG.normal(size=(2, 5, 32)), RNG.normal(size=(2, 5, 32))
    center, tau_t, tau_s = RNG.normal(size=32) * 0.1, 0.05, 0.1
    p = np_softmax((t_logits - center) / tau_t)
    expected = -np.sum(p * np.log(np_softmax(s_logits / tau_s)), axis=-1)
    p_jax = obj.teacher_probs(jnp.asarray(t_logits, jnp.float32), jnp.asarray(center, jnp.float32), tau_t)
    np.testing.assert_allclose(np.asarray(p_jax), p, rtol=1e-4, atol=1e-7)
    got = obj.cls_loss(jnp.asarray(s_logits, jnp.float32), p_jax, tau_s)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_center_update_uses_the_mean_over_every_token():
    center, stat = RNG.normal(size=16), RNG.uniform(size=(4, 6, 16))
    got = obj.update_center(jnp.asarray(center, jnp.float32), jnp.asarray(stat, jnp.float32), 0.9)
    np.testing.assert_allclose(np.asarray(got), 0.9 * center + 0.1 * stat.reshape(-1, 16).mean(0), rtol=1e-5)


@pytest.mark.parametrize("start,end,total", [(0.99995, 0.99999, 294_816), (0.998, 1.0, 1000)])
def test_linear_anneal_runs_from_start_to_end(start, end, total):
    got = np.asarray(obj.linear_anneal(jnp.asarray([0, total // 2, total, 2 * total]), start, end, total))
    np.testing.assert_allclose(got, [start, start + (end - start) * (total // 2) / total, end, end], rtol=1e-7)


def test_ema_is_decay_weighted_average():
    t, s = {"w": RNG.normal(size=(3, 4))}, {"w": RNG.normal(size=(3, 4))}
    got = obj.ema(jax.tree.map(jnp.asarray, t), jax.tree.map(jnp.asarray, s), jnp.float32(0.9), jnp.float32(0.1))
    np.testing.assert_allclose(np.asarray(got["w"]), 0.9 * t["w"] + 0.1 * s["w"], rtol=1e-5)


@pytest.mark.parametrize("start,end,total", [(0.99995, 0.99999, 294_816), (0.998, 1.0, 294_816)])
def test_ema_one_minus_decay_is_computed_directly(start, end, total):
    """1 − d to float32 precision of 1 − d itself (the reference keeps d and 1 − d as doubles: fairseq
    fairseq/modules/ema_module.py:125-126, ``mul_(decay)``, ``add_(param, alpha=1 - decay)``; SPEC §3): 1 −
    float32(d) at d ≈ 0.99995 is off by up to ~8e-4 of 1 − d."""
    steps = np.asarray([1, 5_000, 20_000, 147_408, 250_000, total])
    d, one_minus = (np.asarray(x, np.float64) for x in obj.ema_weights(jnp.asarray(steps), start, end, total))
    want = start + (end - start) * steps / total
    np.testing.assert_allclose(d, want, rtol=1e-7)
    np.testing.assert_allclose(one_minus, 1.0 - want, rtol=2e-6, atol=1e-12)
    if start == 0.99995:
        naive = 1.0 - np.asarray(jnp.float32(start) + jnp.float32(end - start) * jnp.float32(steps / total))
        assert np.max(np.abs(naive - (1.0 - want)) / (1.0 - want)) > 1e-4  # what the direct form avoids
