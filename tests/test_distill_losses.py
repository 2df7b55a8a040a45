"""S-SONDO losses against float64 numpy written from their definitions."""

import jax.numpy as jnp
import numpy as np
import pytest

from matpac_jax.distill.losses import LOSSES, distill_loss, mixup_loss


def _np_logsumexp(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _reference(name, s, t, temperature=None):
    s, t = s.astype(np.float64), t.astype(np.float64)
    if name == "cosine":
        return 1 - (s * t).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))
    if name == "info_nce":
        sn = s / np.linalg.norm(s, axis=1, keepdims=True)
        tn = t / np.linalg.norm(t, axis=1, keepdims=True)
        z = sn @ tn.T / temperature
        return 0.5 * ((_np_logsumexp(z, 1) - np.diag(z)) + (_np_logsumexp(z, 0) - np.diag(z)))
    if name == "kl_softmax":
        p = np.exp(t / temperature - _np_logsumexp(t / temperature, 1)[:, None])
        q = np.exp(s / temperature - _np_logsumexp(s / temperature, 1)[:, None])
        # KLDivLoss(reduction="none") averaged over dimensions, x T^2 (ssondo system.py:307-327 `_kd_loss_kl_div`)
        return (p * np.log(p / q)).mean(1) * temperature**2
    if name == "l1":
        return np.abs(s - t).mean(1)
    return ((s - t) ** 2).mean(1)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_match_numpy(name):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 40)).astype(np.float32), rng.normal(size=(6, 40)).astype(np.float32)
    kw = {"temperature": 0.2} if name in ("info_nce", "kl_softmax") else {}
    want = _reference(name, s, t, **kw)
    got = float(distill_loss(name, jnp.asarray(s), jnp.asarray(t), **kw))
    assert got == pytest.approx(want.mean(), rel=1e-5)
    if name != "info_nce":  # a perfect student has zero loss (InfoNCE keeps the batch's other pairs)
        assert float(distill_loss(name, jnp.asarray(t), jnp.asarray(t), **kw)) == pytest.approx(0.0, abs=1e-5)


def test_mixup_loss_weights_both_targets():
    rng = np.random.default_rng(1)
    s, ta, tb = (rng.normal(size=(4, 16)).astype(np.float32) for _ in range(3))
    lam = np.array([1.0, 0.0, 0.3, 0.7], np.float32)
    want = (lam * _reference("cosine", s, ta) + (1 - lam) * _reference("cosine", s, tb)).mean()
    assert float(mixup_loss("cosine", jnp.asarray(s), jnp.asarray(ta), jnp.asarray(tb), jnp.asarray(lam))) == (
        pytest.approx(want, rel=1e-5)
    )
    with pytest.raises(ValueError, match="unknown distillation loss 'cos'"):
        distill_loss("cos", jnp.asarray(s), jnp.asarray(ta))
