"""MATPAC / MATPAC++ objective (SPEC §3) as pure functions of arrays and the step.

  masking           -> ids_keep [B, Nv], ids_mask [B, Nm] (same counts for every sample)
  prediction_losses -> l_k = 2 - 2 cos(ẑ_k, z)                      [K, B, Nm]
  mcl_loss          -> annealed winner-takes-all over the K hypotheses [B, Nm] (+ winner index)
  teacher_probs / cls_loss / update_center -> DINO-style unsupervised classification

MATPAC is the K = 1 case: the MCL reduction is then the identity.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Visible tokens per sample, as the reference computes it: int(N * (1 - ratio)) (190, 0.7 -> 57)."""
    return int(num_tokens * (1 - mask_ratio))


def random_masking(rng: jax.Array, batch: int, num_tokens: int, mask_ratio: float) -> tuple[jax.Array, jax.Array]:
    """Unstructured random masking, independent per sample. Returns sorted (ids_keep [B, Nv], ids_mask [B, Nm])."""
    n_vis = num_visible(num_tokens, mask_ratio)
    noise = jax.random.uniform(rng, (batch, num_tokens))
    ids_shuffle = jnp.argsort(noise, axis=1)
    return jnp.sort(ids_shuffle[:, :n_vis], axis=1), jnp.sort(ids_shuffle[:, n_vis:], axis=1)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def prediction_losses(preds: jax.Array, targets: jax.Array) -> jax.Array:
    """preds [K, B, M, D], targets [B, M, D] -> per-hypothesis per-token loss 2 - 2 cos, [K, B, M] (float32)."""
    p = l2_normalize(preds.astype(jnp.float32))
    z = l2_normalize(targets.astype(jnp.float32))
    return 2.0 - 2.0 * jnp.sum(p * z[None], axis=-1)


def mcl_temperature(step: jax.Array, init: float, decay: float) -> jax.Array:
    """T(t) = init · decay^t, as exp(t · log(decay)) with log(decay) taken in float64: a float32 decay**t drifts
    by ~0.4 % at t = 230k and would move the soft -> hard switch by ~150 steps."""
    return init * jnp.exp(step.astype(jnp.float32) * math.log(decay))


def mcl_loss(losses: jax.Array, temperature: jax.Array, hard_below: float) -> tuple[jax.Array, jax.Array]:
    """Annealed Multiple Choice Learning over K hypotheses.

    losses [K, B, M]. While temperature > hard_below: q = stop_grad(softmax_k(-l/T)), loss = Σ_k q_k l_k;
    afterwards hard winner-takes-all, loss = min_k l_k. Returns (per-token loss [B, M], winner = argmin_k [B, M]).
    """
    winner = jnp.argmin(losses, axis=0)
    safe_t = jnp.maximum(temperature, hard_below)  # avoids inf logits on the branch that is not taken
    q = jax.lax.stop_gradient(jax.nn.softmax(-losses / safe_t, axis=0))
    soft = jnp.sum(q * losses, axis=0)
    hard = jnp.min(losses, axis=0)
    return jnp.where(temperature > hard_below, soft, hard), winner


def select_hypothesis(preds: jax.Array, winner: jax.Array) -> jax.Array:
    """preds [K, B, M, D], winner [B, M] -> the winning prediction per token, [B, M, D].

    A one-hot weighted sum of the K hypotheses in their own dtype (exact: every other term is 0): elementwise work
    that XLA fuses, where a gather's gradient would be a scatter-add into the whole [K, B, M, D]."""
    one_hot = jax.nn.one_hot(winner, preds.shape[0], axis=0, dtype=preds.dtype)[..., None]  # [K, B, M, 1]
    return sum(one_hot[k] * preds[k] for k in range(preds.shape[0]))


def linear_anneal(step: jax.Array, start: float, end: float, total_steps: int) -> jax.Array:
    """start -> end linearly over total_steps, then end (aurianworld/matpac training_matpac/models/utils.py:8-17
    ``get_annealed_rate``, called by ``do_ema_step`` at models/model.py:317-327)."""
    frac = jnp.clip(step.astype(jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return start + (end - start) * frac


def ema_weights(step: jax.Array, start: float, end: float, total_steps: int) -> tuple[jax.Array, jax.Array]:
    """(d, 1 − d) of the linearly annealed EMA decay, with 1 − d computed directly from the double constants
    1 − start and 1 − end: 1 − float32(d) would lose ~8e-4 of 1 − d at d ≈ 0.99995 (the reference keeps d and 1 − d
    as Python doubles, each rounded once when it scales a float32 tensor: fairseq/modules/ema_module.py:125-126,
    ``ema_param.mul_(decay); ema_param.add_(param, alpha=1 - decay)``)."""
    frac = jnp.clip(step.astype(jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return start + (end - start) * frac, (1.0 - start) + (start - end) * frac


def teacher_temperature(step: jax.Array, warmup_temp: float, temp: float, warmup_steps: int) -> jax.Array:
    """τ_t = warmup_temp + (temp − warmup_temp) · t / warmup_steps for t < warmup_steps, then temp: the reference's
    ``get_annealed_rate`` (training_matpac/models/utils.py:8-17, called at models/model.py:273-278; divides by
    warmup_steps, not warmup_steps − 1 as np.linspace would)."""
    frac = jnp.clip(step.astype(jnp.float32) / max(warmup_steps, 1), 0.0, 1.0)
    return warmup_temp + (temp - warmup_temp) * frac


def teacher_probs(teacher_logits: jax.Array, center: jax.Array, temperature: jax.Array) -> jax.Array:
    """p = softmax((h_teacher(z) - c) / τ_t) over the prototypes, [..., P]."""
    return jax.nn.softmax((teacher_logits.astype(jnp.float32) - center) / temperature, axis=-1)


def cls_loss(student_logits: jax.Array, probs: jax.Array, student_temp: float) -> jax.Array:
    """L = -Σ_j p_j log softmax(h_student(ẑ) / τ_s)_j, per token [...]."""
    logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    return -jnp.sum(jax.lax.stop_gradient(probs) * logp, axis=-1)


def update_center(center: jax.Array, batch_stat: jax.Array, momentum: float) -> jax.Array:
    """c <- m·c + (1-m)·mean(stat) over every token of the (global) batch. stat [..., P]."""
    mean = jnp.mean(batch_stat.reshape(-1, batch_stat.shape[-1]), axis=0)
    return momentum * center + (1.0 - momentum) * mean


def ema(teacher, student, decay: jax.Array, one_minus_decay: jax.Array):
    """teacher <- decay · teacher + (1 − decay) · student, leaf-wise (float32 shadows); ``one_minus_decay`` is given,
    not recomputed from a rounded ``decay`` (``ema_weights``)."""
    return jax.tree.map(lambda t, s: decay * t + one_minus_decay * s.astype(t.dtype), teacher, student)
