"""The train state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied so far
    student: dict  # trained parameters {'tokenizer', 'encoder', 'predictor', 'cls_head'}
    teacher: dict  # EMA shadows {'encoder', 'cls_head'} (float32)
    center: jax.Array  # [P] cls-head center
    opt_state: optax.OptState


def create_train_state(model, rng: jax.Array) -> TrainState:
    """The initial state; ``opt_state`` is the trainer's to fill (train.program)."""
    student, teacher = model.init(rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        student=student,
        teacher=teacher,
        center=jnp.zeros((model.cls_head.num_prototypes,), jnp.float32),
        opt_state=None,
    )
