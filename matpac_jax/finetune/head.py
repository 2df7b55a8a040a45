"""The published AudioSet head (SPEC §5) and its multi-label objective.

    tokens [B, N, D] (CLS dropped) -> mean over the N tokens -> BatchNorm1d(D), no affine -> Linear(D, 527) -> logits

Logit ``i`` is the ``i``-th AudioSet class sorted by mid, the label id ``prepare`` stores (``data.audioset_classes``).

The published fine-tuned MATPAC++ model (aurianworld/matpac inference_matpac/matpac/model.py:84-87 ``head_norm`` =
``BatchNorm1d(768, affine=False)``, ``head`` = ``Linear(768, 527)``) averages the last layer's tokens over frequency
(model.py:287-289), then over time (model.py:193 / 301), then applies ``head_norm`` and ``head`` (model.py:303-305).
On a full Fp x Tp grid the mean of the frequency means is the mean over all N = Fp*Tp tokens, so this module takes the
tokens in any order, [B, N, D]: the same function, and also what m2d's fine-tuning pools when its ``training_mask``
drops tokens (nttcslab/m2d m2d/runtime_audio.py:329-333 keeps the visible tokens, flat; eval-audio-repr
evar/ar_m2d.py:67-81 averages them, then finetune.py:315-323 ``TaskHead`` = BatchNorm1d(affine=False) + MLP).

BatchNorm follows torch's ``BatchNorm1d`` exactly, which flax's ``nn.BatchNorm`` does not: in training it normalises
with the batch mean and the *biased* batch variance and moves the running statistics with momentum 0.1 using the
*unbiased* variance (n / (n - 1)); flax updates its running variance with the biased one (and computes it as
E[x²] - E[x]²). Running statistics start at mean 0, var 1; eps 1e-5; evaluation uses the running statistics. The
statistics live in the ``batch_stats`` collection ({'mean', 'var'}) and are always float32. The batch statistics
are those of the whole (global) batch the module sees.

Linear init: N(0, 0.01) weight, zero bias, as EVAR's ``MLP`` that trained the published heads
(eval-audio-repr evar/model_utils.py:96-98; m2d's own ``RuntimeM2D`` uses trunc-normal std 2e-5,
m2d/runtime_audio.py:243-245).

Loss: ``bce_loss`` = mean sigmoid binary cross-entropy over batch and classes, torch's
``binary_cross_entropy_with_logits`` with mean reduction (eval-audio-repr finetune.py:125-126), on targets that
mixup may have made soft.

``head_params_for_encoder`` gives the head in the layout that ``matpac_jax.inference.Encoder.tag`` reads from
``params['head']`` ({'norm_mean', 'norm_var', 'kernel' [D, C], 'bias'}), which ``convert`` maps to the published
``head_norm.running_mean|running_var``, ``head.weight`` [C, D], ``head.bias``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

AUDIOSET_CLASSES = 527
BN_MOMENTUM = 0.1  # torch's convention: new = (1 - m) * old + m * batch (flax's momentum 0.9 is 1 - this)
BN_EPS = 1e-5


class AudioSetHead(nn.Module):
    """tokens [B, N, D] (CLS dropped; freq-major or any order) -> logits [B, num_classes] (float32).

    ``train=True``: batch statistics (B >= 2, as torch requires) and, outside ``init``, the running statistics move
    (call ``apply`` with ``mutable=['batch_stats']``). ``train=False``: the running statistics."""

    num_classes: int = AUDIOSET_CLASSES
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False, n_valid: jax.Array | None = None) -> jax.Array:
        """``n_valid`` (int scalar): only the first ``n_valid`` tokens are averaged, the rest is padding (the visible
        tokens of the training-time token masking, ``finetune.token_mask``)."""
        if tokens.ndim != 3:
            raise ValueError(f"AudioSetHead expects tokens [B, N, D] with the CLS token dropped, got {tokens.shape}")
        tokens = tokens.astype(jnp.float32)
        if n_valid is None:
            x = tokens.mean(axis=1)  # [B, D]: frequency-average then time-mean on a full grid
        else:
            valid = (jnp.arange(tokens.shape[1]) < n_valid).astype(jnp.float32)  # [N]
            x = jnp.einsum("bnd,n->bd", tokens, valid) / n_valid.astype(jnp.float32)
        b, d = x.shape
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((d,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((d,), jnp.float32))
        if train:
            if b < 2:
                raise ValueError(f"AudioSetHead(train=True) needs at least 2 examples per batch, got {b}")
            mu = x.mean(axis=0)
            v = jnp.square(x - mu).mean(axis=0)  # biased: what torch normalises with
            if not self.is_initializing():
                m = self.momentum
                mean.value = (1.0 - m) * mean.value + m * mu
                var.value = (1.0 - m) * var.value + m * v * (b / (b - 1))  # unbiased: what torch keeps
        else:
            mu, v = mean.value, var.value
        x = (x - mu) * jax.lax.rsqrt(v + self.epsilon)
        init = {"kernel_init": nn.initializers.normal(0.01), "bias_init": nn.initializers.zeros}
        linear = nn.Dense(self.num_classes, **init, name="linear")
        return linear(x)


def bce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over batch and classes of the sigmoid binary cross-entropy (torch ``BCEWithLogitsLoss``), float32."""
    logits, targets = logits.astype(jnp.float32), targets.astype(jnp.float32)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def head_params_for_encoder(variables: dict) -> dict:
    """The head's flax variables ({'params': {'linear'}, 'batch_stats': {'mean', 'var'}}) -> the encoder directory's
    ``head`` group {'norm_mean', 'norm_var', 'kernel' [D, C], 'bias' [C]} (numpy float32)."""
    try:
        linear, stats = variables["params"]["linear"], variables["batch_stats"]
        out = {"norm_mean": stats["mean"], "norm_var": stats["var"], "kernel": linear["kernel"], "bias": linear["bias"]}
    except KeyError as e:
        raise ValueError(
            f"head_params_for_encoder: missing {e} in the head variables; pass AudioSetHead's full variables "
            "({'params': {'linear': ...}, 'batch_stats': {'mean', 'var'}})"
        ) from None
    return {k: np.asarray(jax.device_get(v), np.float32) for k, v in out.items()}


def head_variables_from_encoder(head: dict) -> dict:
    """Inverse of ``head_params_for_encoder``: an encoder's ``params['head']`` (e.g. converted from a published
    fine-tuned checkpoint) -> AudioSetHead variables, to evaluate it or to continue fine-tuning from it."""
    return {
        "params": {"linear": {"kernel": jnp.asarray(head["kernel"]), "bias": jnp.asarray(head["bias"])}},
        "batch_stats": {"mean": jnp.asarray(head["norm_mean"]), "var": jnp.asarray(head["norm_var"])},
    }
