"""The fine-tuning step as a ``StepProgram`` (train.task), which the trainer composes with its optimizer, gradient
accumulation and the non-finite guard (train.program):

1. mixup of the waveforms and targets when the recipe mixes waveforms (AS20K; finetune.augment.mix_waveform)
2. log-mel of the waveform crops on device (the teacher front-end of SPEC §1)
3. augmentation on device (finetune.augment, EVAR's order): mixup of log-mel and targets (AS2M), one frequency and one
   time stripe, the random resize crop (AS20K), an optional random time roll
4. m2d's training-time token masking (``config.finetune.training_mask`` > 0; finetune.token_mask): the ViT encoder
   sees CLS and the visible tokens only -> AudioSet head (BatchNorm on the batch's statistics, running statistics
   moved) -> logits
5. sigmoid binary cross-entropy against the (mixed) multi-hot targets, mean over batch and classes
6. the trainer's optimizer update (config.optim; frozen parameters get none); the running statistics move
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from ml_collections import ConfigDict

from matpac_jax.audio.frontend import LogMelConfig, log_mel
from matpac_jax.finetune.augment import AugmentConfig, augment_batch, mix_waveform
from matpac_jax.finetune.head import bce_loss
from matpac_jax.finetune.model import FinetuneModel
from matpac_jax.finetune.token_mask import structured_keep
from matpac_jax.train.task import StepProgram


@struct.dataclass
class FinetuneState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: dict  # {'tokenizer', 'encoder', 'head'}
    batch_stats: dict  # {'head': {'mean', 'var'}}: the head's BatchNorm running statistics
    opt_state: optax.OptState


def create_finetune_state(model: FinetuneModel, rng: jax.Array, mel_shape: tuple) -> FinetuneState:
    """The initial state; ``opt_state`` is the trainer's to fill (train.program)."""
    variables = model.init({"params": rng}, jnp.zeros(mel_shape, jnp.float32), train=False)
    params, stats = variables["params"], variables["batch_stats"]
    return FinetuneState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=None)


def augment_config(finetune: ConfigDict) -> AugmentConfig:
    return AugmentConfig(
        mixup_alpha=float(finetune.mixup),
        freq_mask=int(finetune.freq_mask),
        time_mask=int(finetune.time_mask),
        max_time_shift=int(finetune.time_shift),
        mixup_on=str(finetune.mixup_on),
        rrc=bool(finetune.rrc),
    )


def make_program(
    model: FinetuneModel,
    config: ConfigDict,
    mel_shape: tuple,
    frozen: Callable[[Any], Any] | None = None,
    layer_ids: Callable[[Any], tuple[Any, int]] | None = None,
) -> StepProgram:
    """The pure functions of fine-tuning; ``frozen`` and ``layer_ids`` as ``StepProgram``'s."""
    aug = augment_config(config.finetune)
    ratio = float(config.finetune.training_mask)
    grid = (config.audio.n_mels // config.model.patch, config.audio.crop_frames // config.model.patch)
    frontend_cfg = LogMelConfig.from_audio_config(config.audio)

    def prepare(state: FinetuneState, batch: dict, rng: jax.Array) -> dict:
        k_wave, k_aug, k_mask = jax.random.split(rng, 3)
        audio, targets = mix_waveform(k_wave, batch["audio"], batch["targets"].astype(jnp.float32), aug)
        mel = log_mel(audio, frontend_cfg)  # [B, F, T]
        mel, targets = augment_batch(k_aug, mel, targets, aug)
        out = {"mel": mel, "targets": targets}
        if ratio > 0:  # the visible count, one for the batch, repeated per example (micro-batches cut every array)
            ids, n_keep = structured_keep(k_mask, mel.shape[0], *grid, ratio)
            out |= {"keep_ids": ids, "keep_n": jnp.full((mel.shape[0],), n_keep)}
        return out

    def loss(params: dict, state: FinetuneState, inputs: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng
        variables = {"params": params, "batch_stats": state.batch_stats}
        keep = (inputs["keep_ids"], inputs["keep_n"][0]) if "keep_ids" in inputs else None
        logits, updates = model.apply(variables, inputs["mel"], train=True, keep=keep, mutable=["batch_stats"])
        return bce_loss(logits, inputs["targets"]), {"batch_stats": updates["batch_stats"]}

    def finish(state: FinetuneState, new: FinetuneState, aux: dict) -> tuple[FinetuneState, dict]:
        return new.replace(batch_stats=aux["batch_stats"]), {}  # type: ignore[attr-defined]  # flax struct

    return StepProgram(
        init=lambda rng: create_finetune_state(model, rng, mel_shape),
        prepare=prepare,
        loss=loss,
        finish=finish,
        frozen=frozen,
        layer_ids=layer_ids,
    )
