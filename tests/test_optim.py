"""Large-batch optimizer options: lr scaling rules by hand, LAMB and LARS against float64 numpy references (two
steps, per-tensor trust ratios, weight-decay mask), and unknown names failing before compute."""

import ml_collections as mlc
import numpy as np
import optax
import pytest

from matpac_jax.train.optim import make_optimizer, peak_lr


def _optim(**kw):
    base = dict(optimizer="adamw", lr=1e-2, lr_scaling="none", reference_batch=256, b1=0.9, b2=0.95, eps=1e-6,
                weight_decay=0.1, wd_exclude_bias_norm_tokens=True, schedule="warmup_cosine", warmup_steps=0,
                clip_norm=1e9)  # fmt: skip
    return mlc.ConfigDict(base | kw)


def test_lr_scaling_rules():
    assert peak_lr(_optim(), 4096) == 1e-2
    assert peak_lr(_optim(lr_scaling="linear"), 4096) == pytest.approx(1e-2 * 16)
    assert peak_lr(_optim(lr_scaling="sqrt"), 4096) == pytest.approx(1e-2 * 4)
    assert peak_lr(_optim(lr_scaling="sqrt"), 64) == pytest.approx(1e-2 * 0.5)
    with pytest.raises(ValueError, match="config.optim.lr_scaling='cubic'"):
        peak_lr(_optim(lr_scaling="cubic"), 64)
    with pytest.raises(ValueError, match="config.optim.optimizer='sgd'"):
        make_optimizer(_optim(optimizer="sgd"), 10, {})


def _tree(rng):
    return {"dense": {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)}}


def _run(optim, steps=2):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(steps)]
    tx = make_optimizer(optim, 1_000_000, params)
    p = {k: {n: np.asarray(v, np.float32) for n, v in d.items()} for k, d in params.items()}
    state = tx.init(p)
    for g in grads:
        g32 = {k: {n: np.asarray(v, np.float32) for n, v in d.items()} for k, d in g.items()}
        updates, state = tx.update(g32, state, p)
        p = optax.apply_updates(p, updates)
    return params, grads, p


def _lr(optim, t):  # half-cosine without warm-up over 1e6 steps
    return optim.lr * 0.5 * (1 + np.cos(np.pi * t / 1_000_000))


def test_lamb_matches_numpy_reference():
    o = _optim(optimizer="lamb")
    params, grads, got = _run(o)
    for name in ("kernel", "bias"):
        p, m, v = params["dense"][name].copy(), 0.0, 0.0
        for t, g in enumerate(grads, start=1):
            g = g["dense"][name]
            m = o.b1 * m + (1 - o.b1) * g
            v = o.b2 * v + (1 - o.b2) * g * g
            u = (m / (1 - o.b1**t)) / (np.sqrt(v / (1 - o.b2**t)) + o.eps)
            if name == "kernel":  # biases are excluded from decay (and from the trust ratio: wd mask)
                u = u + o.weight_decay * p
            trust = np.linalg.norm(p) / np.linalg.norm(u)
            p = p - _lr(o, t - 1) * trust * u
        np.testing.assert_allclose(got["dense"][name], p, rtol=2e-5, atol=1e-6)


def test_lars_matches_numpy_reference():
    o = _optim(optimizer="lars", b1=0.9)
    params, grads, got = _run(o)
    for name in ("kernel", "bias"):
        p, mom = params["dense"][name].copy(), 0.0
        for t, g in enumerate(grads):
            g = g["dense"][name]
            if name == "kernel":
                g = g + o.weight_decay * p
                g = 0.001 * np.linalg.norm(p) / np.linalg.norm(g) * g  # trust ratio (coefficient 1e-3)
            mom = o.b1 * mom + _lr(o, t) * g
            p = p - mom
        np.testing.assert_allclose(got["dense"][name], p, rtol=2e-5, atol=1e-7)


def test_unknown_optimizer_in_a_run_config_is_a_config_error_before_compute(tmp_path):
    from helpers import load_config

    from matpac_jax.config_lib import ConfigError
    from matpac_jax.train.loop import check_run

    config = load_config("pp.py", "smoke")
    config.optim.optimizer = "sgd"
    with pytest.raises(ConfigError, match="config.optim: config.optim.optimizer='sgd'"):
        check_run(config, str(tmp_path))
    config.optim.optimizer, config.optim.lr_scaling = "lamb", "linear"
    check_run(config, str(tmp_path))  # accepted
