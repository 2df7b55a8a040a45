"""Optimizers and learning-rate schedules, after global-norm clipping.

- ``config.optim.optimizer``: 'adamw' (SPEC §4; weight_decay 0 is Adam), 'lamb' (AdamW direction with a per-tensor
  trust ratio ‖p‖ / ‖u‖, for large batches) or 'lars' (SGD with momentum ``b1`` and a per-tensor trust ratio);
- ``config.optim.schedule``: 'warmup_cosine' (SPEC §4, pretraining) or 'warmup_ramp_down' (EfficientAT's, S-SONDO);
- ``config.optim.lr_scaling``: the peak lr is ``lr`` at ``reference_batch`` and, for another global batch B,
  'none' keeps it, 'linear' multiplies it by B / reference_batch, 'sqrt' by √(B / reference_batch).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("warmup_cosine", "warmup_ramp_down")
OPTIMIZERS = ("adamw", "lamb", "lars")
LR_SCALINGS = ("none", "linear", "sqrt")


def peak_lr(optim, batch_size: int | None = None) -> float:
    """``optim.lr`` scaled from ``optim.reference_batch`` to ``batch_size`` by ``optim.lr_scaling``."""
    rule = optim.get("lr_scaling", "none")
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

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        phase = 1.0 - jnp.maximum(t, 1.0) / max(warmup, 1)
        up = jnp.where(t < warmup, jnp.exp(-5.0 * phase * phase), 1.0)
        down = final + (1.0 - final) * jnp.clip((ramp_start + ramp_steps - t) / max(ramp_steps, 1), 0.0, 1.0)
        return lr * up * jnp.where(t <= ramp_start, 1.0, down)

    return schedule


def lr_schedule(optim, total_steps: int, batch_size: int | None = None) -> optax.Schedule:
    """'warmup_cosine': linear warm-up 0 -> lr over warmup_steps, then half-cosine to 0 at total_steps.
    'warmup_ramp_down': ``warmup_ramp_down`` with optim.ramp_down_start, ramp_down_steps, final_lr_factor."""
    if optim.warmup_steps >= total_steps:
        raise ValueError(f"config.optim.warmup_steps ({optim.warmup_steps}) must be < total_steps ({total_steps})")
    name = optim.get("schedule", "warmup_cosine")
    lr = peak_lr(optim, batch_size)
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, optim.warmup_steps, total_steps, end_value=0.0)
    if name == "warmup_ramp_down":
        return warmup_ramp_down(lr, optim.warmup_steps, optim.ramp_down_start, optim.ramp_down_steps,
                                optim.final_lr_factor)  # fmt: skip
    raise ValueError(f"config.optim.schedule={name!r}: expected one of {', '.join(SCHEDULES)}")


def decay_mask(params, exclude_bias_norm_tokens: bool):
    """True where weight decay applies. Reference: every trainable parameter."""

    def keep(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not (exclude_bias_norm_tokens and _NO_DECAY.search(name))

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim, total_steps: int, params, batch_size: int | None = None) -> optax.GradientTransformation:
    schedule = lr_schedule(optim, total_steps, batch_size)
    mask = decay_mask(params, optim.wd_exclude_bias_norm_tokens)
    name = optim.get("optimizer", "adamw")
    if name == "adamw":
        inner = optax.adamw(
            schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=mask
        )
    elif name == "lamb":
        inner = optax.lamb(
            schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=mask
        )
    elif name == "lars":
        inner = optax.lars(schedule, weight_decay=optim.weight_decay, weight_decay_mask=mask, trust_ratio_mask=mask,
                           momentum=optim.b1)  # fmt: skip
    else:
        raise ValueError(f"config.optim.optimizer={name!r}: expected one of {', '.join(OPTIMIZERS)}")
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), inner)
