"""The S-SONDO distillation step: a pure function (state, batch, rng) -> (state, metrics), jitted by the trainer.

1. the student's log-mel front-end on device, float32 (SPEC §6: 32 kHz, 128 mels, n_fft 1024, win 1024, hop 512)
2. optional mixup (``config.distill.mixup`` = α > 0): per example λ ~ Beta(α, α), λ ← max(λ, 1 − λ), the log-mel
   mixed with a random other clip of the batch, the loss λ-mixed against both teacher targets (EfficientAT's mixup)
3. backbone (BatchNorm in training mode) -> projection head (dropout) -> loss to the teacher clip embedding; with
   ``config.student.dtype='bfloat16'`` the forward and backward run on bfloat16 copies of the parameters and the
   log-mel (the published run's 16-bit mixed precision), while parameters, gradients, optimizer moments, BatchNorm
   statistics (flax reduces them in float32) and the loss stay float32
4. Adam(W) update after global-norm clipping; BatchNorm statistics move
The trainer adds the non-finite guard (train.program: a NaN/Inf loss, gradient norm or updated state keeps the
previous state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from matpac_jax.audio.frontend import log_mel
from matpac_jax.config_lib import COMPUTE_DTYPES
from matpac_jax.distill.losses import LOSSES, cosine, distill_loss, mixup_loss


@struct.dataclass
class DistillState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: dict  # {'backbone', 'head'}
    batch_stats: dict  # BatchNorm running statistics of the backbone
    opt_state: optax.OptState


def create_distill_state(model, tx: optax.GradientTransformation, rng: jax.Array, mel_shape: tuple) -> DistillState:
    variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(mel_shape, jnp.float32))
    return DistillState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )


def loss_kwargs(distill) -> dict:
    return {"temperature": distill.temperature} if distill.loss in ("info_nce", "kl_softmax") else {}


TARGETS = ("raw", "center", "standardize")


def compute_dtype(student) -> jnp.dtype:
    """``config.student.dtype``: the dtype the student computes in (parameters stay float32)."""
    name = student.dtype
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"config.student.dtype={name!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    return jnp.dtype(name)


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def normalize_targets(target: jax.Array, mode: str, stats: tuple | None) -> jax.Array:
    """'raw': as is; 'center': minus the corpus mean; 'standardize': and divided by the corpus std (floored at 1e-6)."""
    if mode == "raw":
        return target
    mean, std = (jnp.asarray(a, jnp.float32) for a in stats)
    return (target - mean) / (jnp.maximum(std, 1e-6) if mode == "standardize" else 1.0)


def make_distill_step(model, config, tx: optax.GradientTransformation, frontend_cfg, lr_fn, target_stats=None):
    """``target_stats``: (mean [D], std [D]) of the teacher embeddings over the corpus, needed when
    ``config.distill.targets`` is 'center' (targets minus the mean) or 'standardize' (and divided by the std)."""
    d = config.distill
    if d.loss not in LOSSES:
        raise ValueError(f"config.distill.loss={d.loss!r}: choose one of {', '.join(LOSSES)}")
    if d.targets not in TARGETS:
        raise ValueError(f"config.distill.targets={d.targets!r}: choose one of {', '.join(TARGETS)}")
    kwargs = loss_kwargs(d)
    dtype = compute_dtype(config.student)

    def train_step(state: DistillState, batch: dict, rng: jax.Array) -> tuple[DistillState, dict]:
        rng_drop, rng_lam, rng_perm = jax.random.split(rng, 3)
        mel = log_mel(batch["audio"], frontend_cfg)  # [B, F, T]
        target = batch["target"].astype(jnp.float32)
        target = normalize_targets(target, d.targets, target_stats)
        b = mel.shape[0]
        if d.mixup > 0:
            lam = jax.random.beta(rng_lam, d.mixup, d.mixup, (b,))
            lam = jnp.maximum(lam, 1.0 - lam)
            perm = jax.random.permutation(rng_perm, b)
            mel = lam[:, None, None] * mel + (1.0 - lam[:, None, None]) * mel[perm]

        def loss_fn(params):
            (emb, proj), updates = model.apply(
                {"params": cast_floats(params, dtype), "batch_stats": state.batch_stats}, mel.astype(dtype),
                train=True, mutable=["batch_stats"], rngs={"dropout": rng_drop},
            )  # fmt: skip
            proj = proj.astype(jnp.float32)
            if d.mixup > 0:
                loss = mixup_loss(d.loss, proj, target, target[perm], lam, **kwargs)
            else:
                loss = distill_loss(d.loss, proj, target, **kwargs)
            return loss, (updates["batch_stats"], emb, proj)

        (loss, (batch_stats, emb, proj)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        with jax.named_scope("optimizer_update"):  # a scope name bench/profile_step.py reads
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree_utils.tree_norm(grads)
        new_state = DistillState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        metrics = dict(
            loss=loss,
            cos_to_teacher=1.0 - jnp.mean(cosine(proj, target)),  # the mixed clip against its first target
            lr=lr_fn(state.step),
            grad_norm=grad_norm,
            embedding_std=jnp.mean(jnp.std(emb.astype(jnp.float32), axis=0)),
        )
        return new_state, metrics

    return train_step
