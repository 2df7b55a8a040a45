"""The pretraining step: a pure function (state, batch, rng) -> (state, metrics), jitted by the trainer.

Order within a step follows the reference:
  1. EMA teacher update from the previous step's student (skipped at step 0)
  2. log-mel on device, masking, student / predictor / teacher forward
  3. prediction loss (annealed MCL over K hypotheses), cls loss on the winning hypothesis, total 0.5 / 0.5
  4. AdamW update of the student; the cls-head center moves (takes effect next step)
  5. non-finite guard: if the loss or the gradient norm is NaN/Inf, the state keeps its previous values (only the step
     counter advances) and ``metrics['nonfinite']`` is 1; the trainer then stops or skips (``config.nonfinite``)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from matpac_jax.audio.frontend import log_mel
from matpac_jax.objectives import matpac as obj
from matpac_jax.train.state import TrainState

NONFINITE_ACTIONS = ("stop", "skip")


def prediction_std(x: jax.Array) -> jax.Array:
    """Mean over channels of the std over tokens of L2-normalised vectors x [..., T, D] -> [...] (collapse monitor)."""
    x = obj.l2_normalize(x.astype(jnp.float32))
    x = x.reshape(*x.shape[:-3], -1, x.shape[-1])
    return jnp.mean(jnp.std(x, axis=-2), axis=-1)


def make_train_step(model, config, tx: optax.GradientTransformation, frontend_cfg, lr_fn):
    """Build train_step(state, batch, rng) for a MatpacModel and a config (config.objective, total_steps)."""
    o = config.objective
    total = config.total_steps
    if config.nonfinite not in NONFINITE_ACTIONS:
        raise ValueError(f"config.nonfinite must be one of {NONFINITE_ACTIONS}, got {config.nonfinite!r}")
    if o.center_from not in ("probs", "logits"):
        raise ValueError(f"config.objective.center_from must be 'probs' or 'logits', got {o.center_from!r}")

    def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
        step = state.step
        started = step > 0
        d_enc = obj.linear_anneal(step, o.ema_start, o.ema_end, total)
        d_head = obj.linear_anneal(step, o.head_ema_start, o.head_ema_end, total)
        teacher = {
            "encoder": obj.ema(state.teacher["encoder"], state.student["encoder"], jnp.where(started, d_enc, 1.0)),
            "cls_head": obj.ema(state.teacher["cls_head"], state.student["cls_head"], jnp.where(started, d_head, 1.0)),
        }
        audio_is_float = jnp.issubdtype(batch["audio"].dtype, jnp.floating)
        mel = log_mel(batch["audio"], frontend_cfg)  # [B, F, T]
        mcl_t = obj.mcl_temperature(step, o.mcl_temp_init, o.mcl_temp_decay)
        tau_t = obj.teacher_temperature(step, o.teacher_temp_warmup, o.teacher_temp, o.teacher_temp_warmup_steps)

        def loss_fn(student):
            out = model.forward(student, teacher, mel, rng, o.mask_ratio)
            per_hyp = obj.prediction_losses(out["preds"], out["targets"])  # [K, B, M]
            pred_tok, winner = obj.mcl_loss(per_hyp, mcl_t, o.mcl_hard_below)  # [B, M]
            z_hat = obj.select_hypothesis(out["preds"], winner)  # [B, M, D]
            t_logits = model.teacher_logits(teacher, out["targets"]).astype(jnp.float32)  # [B, M, P]
            probs = obj.teacher_probs(t_logits, state.center, tau_t)
            cls_tok = obj.cls_loss(model.student_logits(student, z_hat), probs, o.student_temp)
            loss_pred, loss_cls = jnp.mean(pred_tok), jnp.mean(cls_tok)
            loss = o.weight_pred * loss_pred + o.weight_cls * loss_cls
            aux = dict(
                loss_pred=loss_pred,
                loss_cls=loss_cls,
                probs=probs,
                t_logits=t_logits,
                winner=winner,
                preds=out["preds"],
                targets=out["targets"],
            )
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
        updates, opt_state = tx.update(grads, state.opt_state, state.student)
        student = optax.apply_updates(state.student, updates)
        stat = aux["probs"] if o.center_from == "probs" else aux["t_logits"]
        center = obj.update_center(state.center, stat, o.center_momentum)
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updated = (student, teacher, center, opt_state)
        kept = (state.student, state.teacher, state.center, state.opt_state)
        student, teacher, center, opt_state = jax.tree.map(lambda u, k: jnp.where(finite, u, k), updated, kept)
        new_state = TrainState(step=step + 1, student=student, teacher=teacher, center=center, opt_state=opt_state)

        probs = aux["probs"]
        num_p = probs.shape[-1]
        used = jnp.zeros((num_p,), jnp.int32).at[jnp.argmax(probs, axis=-1).reshape(-1)].add(1)
        mean_p = jnp.mean(probs.reshape(-1, num_p), axis=0)
        k = aux["preds"].shape[0]
        metrics = dict(
            loss=loss,
            loss_pred=aux["loss_pred"],
            loss_cls=aux["loss_cls"],
            lr=lr_fn(step),
            grad_norm=grad_norm,
            nonfinite=1.0 - finite.astype(jnp.float32),
            nonfinite_inputs=jnp.sum(~jnp.isfinite(batch["audio"])) if audio_is_float else jnp.zeros((), jnp.int32),
            ema_decay=d_enc,
            head_ema_decay=d_head,
            teacher_temp=tau_t,
            mcl_temp=mcl_t,
            target_std=prediction_std(aux["targets"]),
            teacher_classes=jnp.sum(used > 0),
            cls_perplexity=jnp.exp(-jnp.sum(mean_p * jnp.log(mean_p + 1e-12))),
        )
        pred_std = prediction_std(aux["preds"])  # [K]
        win_frac = jnp.mean(jax.nn.one_hot(aux["winner"], k), axis=(0, 1))  # [K]
        for i in range(k):
            metrics[f"pred_std_{i}"] = pred_std[i]
            metrics[f"win_frac_{i}"] = win_frac[i]
        return new_state, metrics

    return train_step
