"""The fine-tuning step: a pure function (state, batch, rng) -> (state, metrics), jitted by the trainer.

1. mixup of the waveforms and targets when the recipe mixes waveforms (AS20K; finetune.augment.mix_waveform)
2. log-mel of the waveform crops on device (the teacher front-end of SPEC §1)
3. augmentation on device (finetune.augment, EVAR's order): mixup of log-mel and targets (AS2M), one frequency and one
   time stripe, the random resize crop (AS20K), an optional random time roll
4. m2d's training-time token masking (``config.finetune.training_mask`` > 0; finetune.token_mask): the ViT encoder
   sees CLS and the visible tokens only -> AudioSet head (BatchNorm on the batch's statistics, running statistics
   moved) -> logits
5. sigmoid binary cross-entropy against the (mixed) multi-hot targets, mean over batch and classes
6. the optimizer's update (config.optim; frozen parameters get none)
The trainer adds the non-finite guard (train.program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from matpac_jax.audio.frontend import log_mel
from matpac_jax.finetune.augment import AugmentConfig, augment_batch, mix_waveform
from matpac_jax.finetune.head import bce_loss
from matpac_jax.finetune.token_mask import structured_keep


@struct.dataclass
class FinetuneState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: dict  # {'tokenizer', 'encoder', 'head'}
    batch_stats: dict  # {'head': {'mean', 'var'}}: the head's BatchNorm running statistics
    opt_state: optax.OptState


def create_finetune_state(model, tx: optax.GradientTransformation, rng: jax.Array, mel_shape: tuple) -> FinetuneState:
    variables = model.init({"params": rng}, jnp.zeros(mel_shape, jnp.float32), train=False)
    return FinetuneState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                         batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))  # fmt: skip


def augment_config(finetune) -> AugmentConfig:
    return AugmentConfig(
        mixup_alpha=float(finetune.mixup),
        freq_mask=int(finetune.freq_mask),
        time_mask=int(finetune.time_mask),
        max_time_shift=int(finetune.time_shift),
        mixup_on=str(finetune.mixup_on),
        rrc=bool(finetune.rrc),
    )


def make_finetune_step(model, config, tx: optax.GradientTransformation, frontend_cfg, lr_fn):
    aug = augment_config(config.finetune)
    ratio = float(config.finetune.training_mask)
    grid = (config.audio.n_mels // config.model.patch, config.audio.crop_frames // config.model.patch)

    def train_step(state: FinetuneState, batch: dict, rng: jax.Array) -> tuple[FinetuneState, dict]:
        k_wave, k_aug, k_mask = jax.random.split(rng, 3)
        audio, targets = mix_waveform(k_wave, batch["audio"], batch["targets"].astype(jnp.float32), aug)
        mel = log_mel(audio, frontend_cfg)  # [B, F, T]
        mel, targets = augment_batch(k_aug, mel, targets, aug)
        keep = structured_keep(k_mask, mel.shape[0], *grid, ratio) if ratio > 0 else None

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, updates = model.apply(variables, mel, train=True, keep=keep, mutable=["batch_stats"])
            return bce_loss(logits, targets), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        with jax.named_scope("optimizer_update"):  # a scope name bench/profile_step.py reads
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        new_state = FinetuneState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        metrics = dict(loss=loss, lr=lr_fn(state.step), grad_norm=optax.tree_utils.tree_norm(grads))
        return new_state, metrics

    return train_step
