"""Optimizer and learning-rate schedule (SPEC §4): AdamW after global-norm clipping, warm-up + half-cosine."""

from __future__ import annotations

import re

import jax
import optax

# Parameters that the M2D-style switch excludes from weight decay: biases, LayerNorm scales, learned tokens.
_NO_DECAY = re.compile(r"(bias|scale|cls_token|mask_token)$")


def lr_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warm-up 0 -> lr over warmup_steps, then half-cosine to 0 at total_steps."""
    if optim.warmup_steps >= total_steps:
        raise ValueError(f"config.optim.warmup_steps ({optim.warmup_steps}) must be < total_steps ({total_steps})")
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps, total_steps, end_value=0.0)


def decay_mask(params, exclude_bias_norm_tokens: bool):
    """True where weight decay applies. Reference: every trainable parameter."""

    def keep(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not (exclude_bias_norm_tokens and _NO_DECAY.search(name))

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim, total_steps: int, params) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(
            lr_schedule(optim, total_steps),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask(params, optim.wd_exclude_bias_norm_tokens),
        ),
    )
