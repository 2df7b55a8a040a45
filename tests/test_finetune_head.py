"""The AudioSet head against float64 NumPy written from the published code: pooling, torch-style BatchNorm1d (eval and
train, running-statistics update with the unbiased variance), linear, the mean BCE loss, and the encoder layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_scale

from matpac_jax.finetune.head import AudioSetHead, bce_loss, head_params_for_encoder, head_variables_from_encoder

B, FP, TP, D, C = 4, 5, 3, 8, 6


def _tokens(seed=0):
    return np.random.default_rng(seed).standard_normal((B, FP * TP, D)).astype(np.float32) * 2.0 + 0.5


def _variables(seed=1):
    rng = np.random.default_rng(seed)
    head = {"kernel": rng.standard_normal((D, C)), "bias": rng.standard_normal(C),
            "norm_mean": rng.standard_normal(D), "norm_var": rng.uniform(0.5, 2.0, D)}  # fmt: skip
    return head_variables_from_encoder({k: v.astype(np.float32) for k, v in head.items()})


def _pool(tokens):
    """aurianworld/matpac inference_matpac/matpac/model.py:287-289 (freq-average per time step), :301 (time-mean)."""
    t = tokens.astype(np.float64).reshape(B, FP, TP, D)  # freq-major token order (index = f * Tp + t)
    return t.mean(axis=1).mean(axis=1)


def _np(v):
    return np.asarray(v, np.float64)


def test_eval_forward_uses_running_statistics():
    """aurianworld/matpac inference_matpac/matpac/model.py:303-305: head(head_norm(x)) with
    BatchNorm1d(affine=False) in eval mode, i.e. (x - running_mean) / sqrt(running_var + 1e-5) @ W.T + b."""
    tokens, v = _tokens(), _variables()
    got = AudioSetHead(C).apply(v, jnp.asarray(tokens), train=False)
    stats, lin = v["batch_stats"], v["params"]["linear"]
    x = (_pool(tokens) - _np(stats["mean"])) / np.sqrt(_np(stats["var"]) + 1e-5)
    assert_close_to_scale(np.asarray(got), x @ _np(lin["kernel"]) + _np(lin["bias"]), rtol=1e-5)


def test_train_forward_uses_batch_statistics_and_updates_running_ones_like_torch():
    """torch BatchNorm1d in training (nttcslab/eval-audio-repr finetune.py:318-322, TaskHead): normalise with the
    batch mean and biased variance; running = 0.9 running + 0.1 batch, with the *unbiased* variance for running_var."""
    tokens, v = _tokens(2), _variables()
    got, updated = AudioSetHead(C).apply(v, jnp.asarray(tokens), train=True, mutable=["batch_stats"])
    x = _pool(tokens)
    mu, var_biased, var_unbiased = x.mean(0), x.var(0), x.var(0, ddof=1)
    lin, stats = v["params"]["linear"], v["batch_stats"]
    want = (x - mu) / np.sqrt(var_biased + 1e-5) @ _np(lin["kernel"]) + _np(lin["bias"])
    assert_close_to_scale(np.asarray(got), want, rtol=1e-5)
    new = updated["batch_stats"]
    assert_close_to_scale(_np(new["mean"]), 0.9 * _np(stats["mean"]) + 0.1 * mu, rtol=1e-5)
    assert_close_to_scale(_np(new["var"]), 0.9 * _np(stats["var"]) + 0.1 * var_unbiased, rtol=1e-5)


def test_init_gives_torch_initial_statistics_and_does_not_move_them():
    """torch BatchNorm1d starts with running_mean 0, running_var 1; EVAR's MLP head init is N(0, 0.01) weight and zero
    bias (nttcslab/eval-audio-repr evar/model_utils.py:96-98)."""
    v = AudioSetHead(527).init(jax.random.key(0), jnp.ones((2, 10, 768)), train=True)
    assert set(v) == {"params", "batch_stats"}
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(768))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(768))
    kernel = np.asarray(v["params"]["linear"]["kernel"])
    assert kernel.shape == (768, 527) and abs(kernel.std() - 0.01) < 5e-4
    np.testing.assert_array_equal(v["params"]["linear"]["bias"], np.zeros(527))


def test_train_mode_rejects_a_single_example_as_torch_does():
    v = _variables()
    with pytest.raises(ValueError, match="at least 2 examples"):
        AudioSetHead(C).apply(v, jnp.ones((1, 3, D)), train=True, mutable=["batch_stats"])


def test_bce_loss_is_the_mean_sigmoid_cross_entropy():
    """nttcslab/eval-audio-repr finetune.py:125-126: F.binary_cross_entropy_with_logits(logits, gts), mean over
    batch and classes; targets soft after mixup. NumPy: max(x, 0) - x y + log(1 + exp(-|x|))."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((B, C)) * 4.0
    targets = rng.uniform(0.0, 1.0, (B, C))
    want = np.mean(np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits))))
    got = bce_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_head_params_round_trip_through_the_encoder_layout():
    """The names matpac_jax.inference.Encoder.tag reads from params['head'] (norm_mean, norm_var, kernel [D, C],
    bias), which convert maps to head_norm.running_mean|running_var and head.weight [C, D] / head.bias."""
    v = _variables()
    head = head_params_for_encoder(v)
    assert set(head) == {"norm_mean", "norm_var", "kernel", "bias"}
    assert head["kernel"].shape == (D, C) and head["norm_var"].shape == (D,)
    back = head_variables_from_encoder(head)
    jax.tree.map(np.testing.assert_array_equal, back, v)
    with pytest.raises(ValueError, match="batch_stats"):
        head_params_for_encoder({"params": v["params"]})
