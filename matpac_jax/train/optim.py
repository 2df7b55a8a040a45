"""Optimizers and learning-rate schedules, after global-norm clipping.

- ``config.optim.optimizer``: 'adamw_fairseq' (SPEC §4, the MATPAC recipes: fairseq's Adam, eps added to √v before
  the bias correction, decoupled weight decay), 'adamw' (optax / torch form, eps after the bias correction: S-SONDO's
  torch Adam; weight_decay 0 is Adam), 'lamb' (AdamW direction with a per-tensor trust ratio ‖p‖ / ‖u‖, for large
  batches), 'lars' (SGD with momentum ``b1`` and a per-tensor trust ratio) or 'sgd' (torch's SGD with momentum
  ``b1``: m2d's AudioSet fine-tuning);
- ``config.optim.layer_decay`` < 1: MAE's layer-wise decay of the lr over the layers the method names (a ViT's:
  models.layer_decay); parameters the method freezes get no update at all (weight decay and momentum included);
- gradients are first clipped to a global norm ``clip_norm`` as fairseq and torch do: scaled by
  min(1, clip_norm / (‖g‖ + 1e-6));
- ``config.optim.schedule``: 'warmup_cosine' (SPEC §4, pretraining), 'warmup_ramp_down' (EfficientAT's, S-SONDO) or
  'timm_cosine' (timm's ``CosineLRScheduler`` as EVAR steps it: AudioSet fine-tuning, floor ``optim.lr_min``);
- ``config.optim.lr_scaling``: the peak lr is ``lr`` at ``reference_batch`` and, for another global batch B,
  'none' keeps it, 'linear' multiplies it by B / reference_batch, 'sqrt' by √(B / reference_batch).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

SCHEDULES = ("warmup_cosine", "warmup_ramp_down", "timm_cosine")
OPTIMIZERS = ("adamw_fairseq", "adamw", "lamb", "lars", "sgd")
LR_SCALINGS = ("none", "linear", "sqrt")


def peak_lr(optim: ConfigDict, batch_size: int | None = None) -> float:
    """``optim.lr`` scaled from ``optim.reference_batch`` to ``batch_size`` by ``optim.lr_scaling``."""
    rule = optim.lr_scaling
    if rule not in LR_SCALINGS:
        raise ValueError(f"config.optim.lr_scaling={rule!r}: expected one of {', '.join(LR_SCALINGS)}")
    if rule == "none" or batch_size is None:
        return float(optim.lr)
    ratio = batch_size / optim.reference_batch
    return float(optim.lr) * (ratio if rule == "linear" else ratio**0.5)


# Parameters that the M2D-style switch excludes from weight decay: biases, LayerNorm scales, learned tokens.
_NO_DECAY = re.compile(r"(bias|scale|cls_token|mask_token)$")


def warmup_ramp_down(lr: float, warmup: int, ramp_start: int, ramp_steps: int, final: float) -> optax.Schedule:
    """EfficientAT's ``exp_warmup_linear_down`` in steps: lr × exp(−5 (1 − max(t, 1) / warmup)²) while t < warmup,
    then lr until ``ramp_start``, then linear to ``final × lr`` over ``ramp_steps``, then constant."""

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        phase = 1.0 - jnp.maximum(t, 1.0) / max(warmup, 1)
        up = jnp.where(t < warmup, jnp.exp(-5.0 * phase * phase), 1.0)
        down = final + (1.0 - final) * jnp.clip((ramp_start + ramp_steps - t) / max(ramp_steps, 1), 0.0, 1.0)
        return lr * up * jnp.where(t <= ramp_start, 1.0, down)

    return schedule


def timm_cosine(lr: float, warmup: int, total: int, lr_min: float) -> optax.Schedule:
    """timm's ``CosineLRScheduler(t_initial=epochs, lr_min, warmup_t=warmup_epochs, warmup_lr_init=0)`` as EVAR builds
    it (eval-audio-repr finetune.py:225) and steps it (finetune.py:250-264), in steps of a fixed-length epoch.

    timm's lr at a time t in epochs (timm/scheduler/cosine_lr.py:81-109; warmup_prefix False, one cycle):
    lr · t / W while t < W, then lr_min + (lr − lr_min) · (1 + cos(π t / T)) / 2 (lr_min once t >= T). The cosine's
    clock starts at 0, not at the end of the warm-up: it runs over the whole run, so the lr drops at t = W from
    lr to the cosine's value there (AS2M: 2.0 -> 1.78 at epoch 15 of 70, 1.00 at epoch 35).
    EVAR calls ``scheduler.step(epoch + iter / epoch_iters)`` *after* ``optimizer.step()``: update k (0-based) runs
    at the lr set after update k − 1, t = (k − 1) / epoch_iters, and update 0 at ``warmup_lr_init`` = 0
    (timm cosine_lr.py:75-77). With t in steps, W = ``warmup`` and T = ``total``, the epoch length cancels."""

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        t = jnp.maximum(jnp.asarray(count, jnp.float32) - 1.0, 0.0)  # the lr set after the previous update
        up = lr * t / max(warmup, 1)
        down = lr_min + 0.5 * (lr - lr_min) * (1.0 + jnp.cos(jnp.pi * t / total))
        return jnp.where(t < warmup, up, jnp.where(t < total, down, lr_min))

    return schedule


def lr_schedule(optim: ConfigDict, total_steps: int, batch_size: int | None = None) -> optax.Schedule:
    """'warmup_cosine': linear warm-up 0 -> lr over warmup_steps, then half-cosine to 0 at total_steps.
    'warmup_ramp_down': ``warmup_ramp_down`` with optim.ramp_down_start, ramp_down_steps, final_lr_factor.
    'timm_cosine': ``timm_cosine`` over total_steps with optim.warmup_steps and optim.lr_min."""
    if optim.warmup_steps >= total_steps:
        raise ValueError(f"config.optim.warmup_steps ({optim.warmup_steps}) must be < total_steps ({total_steps})")
    name = optim.schedule
    lr = peak_lr(optim, batch_size)
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, optim.warmup_steps, total_steps, end_value=0.0)
    if name == "warmup_ramp_down":
        return warmup_ramp_down(lr, optim.warmup_steps, optim.ramp_down_start, optim.ramp_down_steps,
                                optim.final_lr_factor)  # fmt: skip
    if name == "timm_cosine":
        return timm_cosine(lr, optim.warmup_steps, total_steps, optim.lr_min)
    raise ValueError(f"config.optim.schedule={name!r}: expected one of {', '.join(SCHEDULES)}")


def decay_mask(params: Any, exclude_bias_norm_tokens: bool) -> Any:
    """True where weight decay applies: every trained parameter, or all but biases, norm scales and learned tokens."""

    def keep(path: tuple, _: Any) -> bool:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not (exclude_bias_norm_tokens and _NO_DECAY.search(name))

    return jax.tree_util.tree_map_with_path(keep, params)


class ScaleByFairseqAdamState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # optax's name for the step count; shadows tuple.count
    mu: optax.Updates
    nu: optax.Updates


def scale_by_fairseq_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """fairseq's Adam direction (fairseq/optim/adam.py:223-234): m / (√v + eps) · √(1 − b2ⁿ) / (1 − b1ⁿ).

    eps sits on the raw √v, before the bias correction; optax's ``scale_by_adam`` puts it on √v̂, which differs by
    up to ~40 % of an update over the first ~100 steps at eps = 1e-6, b2 = 0.95. Moments in float32."""

    def init(params: optax.Params) -> ScaleByFairseqAdamState:
        zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
        mu, nu = jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        return ScaleByFairseqAdamState(jnp.zeros((), jnp.int32), mu, nu)

    def update(
        updates: optax.Updates, state: ScaleByFairseqAdamState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByFairseqAdamState]:
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates)
        count = optax.safe_increment(state.count)
        n = count.astype(jnp.float32)
        step_size = jnp.sqrt(1.0 - b2**n) / (1.0 - b1**n)
        out = jax.tree.map(lambda m, v, g: (step_size * m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, updates)
        return out, ScaleByFairseqAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """g · min(1, max_norm / (‖g‖ + eps)): fairseq's ``clip_grad_norm_`` (fairseq/utils.py:392-395) and torch's
    ``clip_grad_norm_``; optax's ``clip_by_global_norm`` omits the eps."""

    def update(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        coef = jnp.minimum(1.0, max_norm / (optax.tree_utils.tree_norm(updates) + eps))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def scale_by_layer(scales: Any) -> optax.GradientTransformation:
    """Multiply each update leaf by its layer scale (a pytree like the updates, e.g. from
    ``models.layer_decay.layer_scales``)."""

    def update(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        scaled = lambda u, s: u if isinstance(s, float) and s == 1.0 else (u * s).astype(u.dtype)  # noqa: E731
        return jax.tree.map(scaled, updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _direction(optim: ConfigDict, schedule: optax.Schedule, mask: Any) -> optax.GradientTransformation:
    """``config.optim.optimizer``'s update (after clipping, before the layer scales)."""
    name, wd = optim.optimizer, optim.weight_decay
    adam = dict(b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=wd, mask=mask)
    if name == "adamw_fairseq":
        fairseq = scale_by_fairseq_adam(optim.b1, optim.b2, optim.eps)
        return optax.chain(fairseq, optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(schedule))
    if name == "adamw":
        return optax.adamw(schedule, **adam)
    if name == "lamb":
        return optax.lamb(schedule, **adam)
    if name == "sgd":  # torch SGD: momentum b1 on (gradient + weight decay · p); m2d's fine-tuning (timm Lars, wd 0)
        return optax.chain(optax.add_decayed_weights(wd, mask), optax.sgd(schedule, momentum=optim.b1))
    if name == "lars":
        lars = dict(weight_decay=wd, weight_decay_mask=mask, trust_ratio_mask=mask, momentum=optim.b1)
        return optax.lars(schedule, **lars)
    raise ValueError(f"config.optim.optimizer={name!r}: expected one of {', '.join(OPTIMIZERS)}")


def make_optimizer(
    optim: ConfigDict,
    total_steps: int,
    params: Any,
    batch_size: int | None = None,
    frozen: Any = None,
    layer_ids: tuple[Any, int] | None = None,
) -> optax.GradientTransformation:
    """The one optimizer of every method: clipping, ``config.optim.optimizer``, the layer-wise lr decay.

    ``params``: the trained parameters (or their shapes); ``frozen``: a tree like them of bools, True where a
    parameter gets no update; ``layer_ids``: (a tree like them of layer ids, depth) for ``optim.layer_decay`` < 1
    (``StepProgram.frozen`` and ``layer_ids``: what the method says of its parameters)."""
    schedule = lr_schedule(optim, total_steps, batch_size)
    mask = decay_mask(params, optim.wd_exclude_bias_norm_tokens)
    tx = optax.chain(clip_by_global_norm(optim.clip_norm), _direction(optim, schedule, mask))
    if optim.layer_decay != 1.0 and params:  # MAE's layer-wise lr decay; 1.0 = off
        if layer_ids is None:
            raise ValueError(f"layer_decay={optim.layer_decay}: this method names no layers; set it to 1.0")
        ids, depth = layer_ids
        tx = optax.chain(tx, scale_by_layer(jax.tree.map(lambda i: optim.layer_decay ** (depth + 1 - i), ids)))
    if frozen is not None:
        tx = optax.chain(tx, optax.masked(optax.set_to_zero(), frozen))
    return tx
