"""The S-SONDO distillation step as a ``StepProgram`` (train.task), which the trainer composes with its optimizer,
gradient accumulation and the non-finite guard (train.program):

1. the student's log-mel front-end on device, float32 (SPEC §6: 32 kHz, 128 mels, n_fft 1024, win 1024, hop 512)
2. optional mixup (``config.distill.mixup`` = α > 0): per example λ ~ Beta(α, α), λ ← max(λ, 1 − λ), the log-mel
   mixed with a random other clip of the batch, the loss λ-mixed against both teacher targets (EfficientAT's mixup)
3. backbone (BatchNorm in training mode) -> projection head (dropout) -> loss to the teacher clip embedding; with
   ``config.student.dtype='bfloat16'`` the forward and backward run on bfloat16 copies of the parameters and the
   log-mel (the published run's 16-bit mixed precision), while parameters, gradients, optimizer moments, BatchNorm
   statistics (flax reduces them in float32) and the loss stay float32
4. the trainer's Adam(W) update after global-norm clipping; BatchNorm statistics move
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from ml_collections import ConfigDict

from matpac_jax.audio.frontend import LogMelConfig, log_mel
from matpac_jax.distill.losses import LOSSES, cosine, distill_loss, mixup_loss
from matpac_jax.models.students import Distiller
from matpac_jax.train.task import StepProgram

COMPUTE_DTYPES = ("float32", "bfloat16")  # config.student.dtype: what the student computes in


@struct.dataclass
class DistillState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: dict  # {'backbone', 'head'}
    batch_stats: dict  # BatchNorm running statistics of the backbone
    opt_state: optax.OptState


def create_distill_state(model: Distiller, rng: jax.Array, mel_shape: tuple) -> DistillState:
    """The initial state; ``opt_state`` is the trainer's to fill (train.program)."""
    variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(mel_shape, jnp.float32))
    params, stats = variables["params"], variables["batch_stats"]
    return DistillState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=None)


def loss_kwargs(distill: ConfigDict) -> dict:
    return {"temperature": distill.temperature} if distill.loss in ("info_nce", "kl_softmax") else {}


TARGETS = ("raw", "center", "standardize")


def compute_dtype(student: ConfigDict) -> jnp.dtype:
    """``config.student.dtype``: the dtype the student computes in (parameters stay float32)."""
    name = student.dtype
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"config.student.dtype={name!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    return jnp.dtype(name)


def cast_floats(tree: Any, dtype: jnp.dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def normalize_targets(target: jax.Array, mode: str, stats: tuple | None) -> jax.Array:
    """'raw': as is; 'center': minus the corpus mean; 'standardize': and divided by the corpus std (floored at 1e-6)."""
    if mode == "raw":
        return target
    assert stats is not None, f"targets={mode!r} needs the corpus statistics (mean, std)"
    mean, std = (jnp.asarray(a, jnp.float32) for a in stats)
    return (target - mean) / (jnp.maximum(std, 1e-6) if mode == "standardize" else 1.0)


def make_program(
    model: Distiller, config: ConfigDict, mel_shape: tuple, target_stats: tuple | None = None
) -> StepProgram:
    """The pure functions of distillation. ``target_stats``: (mean [D], std [D]) of the teacher embeddings over the
    corpus, needed when ``config.distill.targets`` is 'center' (targets minus the mean) or 'standardize' (and divided
    by the std)."""
    d = config.distill
    if d.loss not in LOSSES:
        raise ValueError(f"config.distill.loss={d.loss!r}: choose one of {', '.join(LOSSES)}")
    if d.targets not in TARGETS:
        raise ValueError(f"config.distill.targets={d.targets!r}: choose one of {', '.join(TARGETS)}")
    kwargs = loss_kwargs(d)
    dtype = compute_dtype(config.student)
    frontend_cfg = LogMelConfig.from_audio_config(config.audio)

    def prepare(state: DistillState, batch: dict, rng: jax.Array) -> dict:
        _, rng_lam, rng_perm = jax.random.split(rng, 3)
        mel = log_mel(batch["audio"], frontend_cfg)  # [B, F, T]
        target = normalize_targets(batch["target"].astype(jnp.float32), d.targets, target_stats)
        if d.mixup <= 0:
            return {"mel": mel, "target": target}
        b = mel.shape[0]
        lam = jax.random.beta(rng_lam, d.mixup, d.mixup, (b,))
        lam = jnp.maximum(lam, 1.0 - lam)
        perm = jax.random.permutation(rng_perm, b)
        mel = lam[:, None, None] * mel + (1.0 - lam[:, None, None]) * mel[perm]
        return {"mel": mel, "target": target, "other": target[perm], "lam": lam}

    def loss(params: dict, state: DistillState, inputs: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        rng_drop = jax.random.split(rng, 3)[0]
        variables = {"params": cast_floats(params, dtype), "batch_stats": state.batch_stats}
        (emb, proj), updates = model.apply(
            variables, inputs["mel"].astype(dtype), train=True, mutable=["batch_stats"], rngs={"dropout": rng_drop}
        )
        proj, target = proj.astype(jnp.float32), inputs["target"]
        if d.mixup > 0:
            value = mixup_loss(d.loss, proj, target, inputs["other"], inputs["lam"], **kwargs)
        else:
            value = distill_loss(d.loss, proj, target, **kwargs)
        aux = {
            "batch_stats": updates["batch_stats"],
            "cos_to_teacher": 1.0 - jnp.mean(cosine(proj, target)),  # the mixed clip against its first target
            "embedding_std": jnp.mean(jnp.std(emb.astype(jnp.float32), axis=0)),
        }
        return value, aux

    def finish(state: DistillState, new: DistillState, aux: dict) -> tuple[DistillState, dict]:
        metrics = {k: v for k, v in aux.items() if k != "batch_stats"}
        return new.replace(batch_stats=aux["batch_stats"]), metrics  # type: ignore[attr-defined]  # flax struct

    return StepProgram(
        init=lambda rng: create_distill_state(model, rng, mel_shape), prepare=prepare, loss=loss, finish=finish
    )
