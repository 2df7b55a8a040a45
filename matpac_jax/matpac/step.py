"""The pretraining step as a ``StepProgram`` (train.task): pure ``prepare`` / ``loss`` / ``finish``, which the
trainer composes with the optimizer, gradient accumulation and the non-finite guard (train.program).

Order within step t follows the reference (aurianworld/matpac training_matpac/models/model.py ``forward_cls_pred``:
teacher forward at :263-265 and :302, ``do_ema_step`` after the losses at :317-327):
  1. ``prepare``: log-mel on device and the masks, drawn once for the whole batch
  2. ``loss``: student / predictor forward, teacher forward with the shadows γ_t as they stand; prediction loss
     (annealed MCL over K hypotheses), cls loss on the winning hypothesis, total 0.5 / 0.5
  3. the student's update (the trainer's optimizer: fairseq's Adam by default, after clipping)
  4. ``finish``: the shadows move after the losses (``do_ema_step``): γ_{t+1} = d·γ_t + (1 − d)·θ_t from this
     step's student θ_t, not at step 0; the cls-head center moves (takes effect next step)
With gradient accumulation the batch statistics (the center's mean, the collapse monitors) are those of the whole
batch: means of equal micro-batches, and sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from matpac_jax.audio.frontend import LogMelConfig, log_mel
from matpac_jax.matpac import objective as obj
from matpac_jax.matpac.model import MatpacModel
from matpac_jax.matpac.state import TrainState, create_train_state
from matpac_jax.models.layer_decay import vit_layer_ids
from matpac_jax.train.task import StepProgram

# The shardings of MATPAC's own layers (parallel.PARAM_RULES holds the ViT's): logical axes per dimension.
SHARDING_RULES = (
    (r"predictor/embed/kernel$", ("embed", None)),
    (r"predictor/heads_\d+/kernel$", (None, "embed")),
    (r"cls_head/mlp_0/kernel$", ("embed", "mlp")),
    (r"cls_head/mlp_2/kernel$", ("mlp", "embed")),
    (r"cls_head/mlp_4/kernel$", ("embed", None)),
    (r"cls_head/weight_v$", (None, "embed")),
)


def moments(x: jax.Array) -> jax.Array:
    """Per-channel [count, Σx, Σx²] over the tokens of L2-normalised vectors x [..., T, D] -> [..., 3, D] (float32):
    sums, so that micro-batches add up to the batch's."""
    x = obj.l2_normalize(x.astype(jnp.float32))
    x = x.reshape(*x.shape[:-3], -1, x.shape[-1])
    count = jnp.full(x.shape[:-2] + x.shape[-1:], x.shape[-2], jnp.float32)
    return jnp.stack([count, jnp.sum(x, -2), jnp.sum(x * x, -2)], axis=-2)


def std_from_moments(m: jax.Array) -> jax.Array:
    """Mean over channels of the std over tokens (the collapse monitor) from ``moments`` [..., 3, D]."""
    n, s1, s2 = m[..., 0, :], m[..., 1, :], m[..., 2, :]
    mean = s1 / n
    return jnp.mean(jnp.sqrt(jnp.maximum(s2 / n - mean * mean, 0.0)), axis=-1)


def make_program(model: MatpacModel, config: ConfigDict) -> StepProgram:
    """The pure functions of MATPAC / MATPAC++ for a MatpacModel and a config (config.objective, total_steps)."""
    o = config.objective
    total = config.total_steps
    frontend_cfg = LogMelConfig.from_audio_config(config.audio)
    if o.center_from not in ("probs", "logits"):
        raise ValueError(f"config.objective.center_from must be 'probs' or 'logits', got {o.center_from!r}")

    def prepare(state: TrainState, batch: dict, rng: jax.Array) -> dict:
        mel = log_mel(batch["audio"], frontend_cfg)  # [B, F, T]
        n_tokens = (mel.shape[1] // model.tokenizer.patch) * (mel.shape[2] // model.tokenizer.patch)
        ids_keep, ids_mask = obj.random_masking(rng, mel.shape[0], n_tokens, o.mask_ratio)
        return {"mel": mel, "ids_keep": ids_keep, "ids_mask": ids_mask}

    def loss(student: dict, state: TrainState, inputs: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        """Loss of one (micro-)batch and its batch statistics, as means over its examples or sums."""
        del rng
        teacher, step = state.teacher, state.step
        mcl_t = obj.mcl_temperature(step, o.mcl_temp_init, o.mcl_temp_decay)
        tau_t = obj.teacher_temperature(step, o.teacher_temp_warmup, o.teacher_temp, o.teacher_temp_warmup_steps)
        ids = (inputs["ids_keep"], inputs["ids_mask"])
        # rng None: unused, the masks are given (ids)
        out = model.forward(student, teacher, inputs["mel"], None, o.mask_ratio, ids=ids)  # type: ignore[arg-type]
        per_hyp = obj.prediction_losses(out["preds"], out["targets"])  # [K, B, M]
        pred_tok, winner = obj.mcl_loss(per_hyp, mcl_t, o.mcl_hard_below)  # [B, M]
        z_hat = obj.select_hypothesis(out["preds"], winner)  # [B, M, D]
        t_logits = model.teacher_logits(teacher, out["targets"]).astype(jnp.float32)  # [B, M, P]
        probs = obj.teacher_probs(t_logits, state.center, tau_t)
        cls_tok = obj.cls_loss(model.student_logits(student, z_hat), probs, o.student_temp)
        loss_pred, loss_cls = jnp.mean(pred_tok), jnp.mean(cls_tok)
        num_p, k = probs.shape[-1], out["preds"].shape[0]
        used = jnp.zeros((num_p,), jnp.float32).at[jnp.argmax(probs, axis=-1).reshape(-1)].add(1.0)
        stats = dict(  # means over the micro-batch (averaged over micro-batches) and sums (added up)
            loss_pred=loss_pred,
            loss_cls=loss_cls,
            mean_probs=jnp.mean(probs.reshape(-1, num_p), axis=0),
            mean_logits=jnp.mean(t_logits.reshape(-1, num_p), axis=0),
            win_frac=jnp.mean(jax.nn.one_hot(winner, k), axis=(0, 1)),
            used_sum=used,
            target_moments_sum=moments(out["targets"]),
            pred_moments_sum=moments(out["preds"]),
        )
        return o.weight_pred * loss_pred + o.weight_cls * loss_cls, stats

    def finish(state: TrainState, new: TrainState, stats: dict) -> tuple[TrainState, dict]:
        step = state.step
        started = step > 0
        d_enc, w_enc = obj.ema_weights(step, o.ema_start, o.ema_end, total)
        d_head, w_head = obj.ema_weights(step, o.head_ema_start, o.head_ema_end, total)
        with jax.named_scope("ema_update"):  # a scope name bench/profile_step.py counts as the optimizer's
            moved = {
                part: obj.ema(
                    state.teacher[part], state.student[part], jnp.where(started, d, 1.0), jnp.where(started, w, 0.0)
                )
                for part, d, w in (("encoder", d_enc, w_enc), ("cls_head", d_head, w_head))
            }  # the shadows follow this step's student θ_t, before its update
        stat = stats["mean_probs"] if o.center_from == "probs" else stats["mean_logits"]
        center = obj.update_center(state.center, stat[None], o.center_momentum)
        mean_p = stats["mean_probs"]
        metrics = dict(
            loss_pred=stats["loss_pred"],
            loss_cls=stats["loss_cls"],
            ema_decay=d_enc,
            head_ema_decay=d_head,
            teacher_temp=obj.teacher_temperature(
                step, o.teacher_temp_warmup, o.teacher_temp, o.teacher_temp_warmup_steps
            ),
            mcl_temp=obj.mcl_temperature(step, o.mcl_temp_init, o.mcl_temp_decay),
            target_std=std_from_moments(stats["target_moments_sum"]),
            teacher_classes=jnp.sum(stats["used_sum"] > 0),
            cls_perplexity=jnp.exp(-jnp.sum(mean_p * jnp.log(mean_p + 1e-12))),
        )
        pred_std = std_from_moments(stats["pred_moments_sum"])  # [K]
        for i in range(pred_std.shape[0]):
            metrics[f"pred_std_{i}"] = pred_std[i]
            metrics[f"win_frac_{i}"] = stats["win_frac"][i]
        return new.replace(teacher=moved, center=center), metrics  # type: ignore[attr-defined]  # flax struct

    return StepProgram(
        init=lambda rng: create_train_state(model, rng),
        prepare=prepare,
        loss=loss,
        finish=finish,
        params_field="student",
        layer_ids=lambda params: vit_layer_ids(params),
        sharding_rules=SHARDING_RULES,
    )
