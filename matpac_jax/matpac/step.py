"""The pretraining step: a pure function (state, batch, rng) -> (state, metrics), jitted by the trainer.

Order within step t follows the reference (aurianworld/matpac training_matpac/models/model.py ``forward_cls_pred``:
teacher forward at :263-265 and :302, ``do_ema_step`` after the losses at :317-327):
  1. log-mel on device, masking, student / predictor forward, teacher forward with the shadows γ_t as they stand
  2. prediction loss (annealed MCL over K hypotheses), cls loss on the winning hypothesis, total 0.5 / 0.5
  3. the shadows move after the losses (``do_ema_step``): γ_{t+1} = d·γ_t + (1 − d)·θ_t from this step's student
     θ_t, not at step 0; the cls-head center moves (takes effect next step)
  4. the student's update (fairseq's Adam by default, after clipping)
  Gradient accumulation (``config.optim.accum_steps`` = A > 1): 2–4 run on A interleaved micro-batches in a
  ``lax.scan`` (masks drawn once for the whole batch), gradients, losses and batch statistics averaged: the update is
  the one of the whole batch, with a micro-batch's activation memory.
The trainer adds the non-finite guard (train.program: a NaN/Inf loss, gradient norm or updated state keeps the
previous state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from matpac_jax.audio.frontend import log_mel
from matpac_jax.matpac import objective as obj
from matpac_jax.matpac.state import TrainState


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


def make_train_step(model, config, tx: optax.GradientTransformation, frontend_cfg, lr_fn):
    """Build train_step(state, batch, rng) for a MatpacModel and a config (config.objective, total_steps)."""
    o = config.objective
    total = config.total_steps
    if o.center_from not in ("probs", "logits"):
        raise ValueError(f"config.objective.center_from must be 'probs' or 'logits', got {o.center_from!r}")

    def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
        step = state.step
        started = step > 0
        d_enc, w_enc = obj.ema_weights(step, o.ema_start, o.ema_end, total)
        d_head, w_head = obj.ema_weights(step, o.head_ema_start, o.head_ema_end, total)
        teacher = state.teacher  # the forward uses γ_t; the shadows move after the losses
        with jax.named_scope("ema_update"):  # a scope name bench/profile_step.py counts as the optimizer's
            moved_teacher = {
                "encoder": obj.ema(teacher["encoder"], state.student["encoder"], jnp.where(started, d_enc, 1.0),
                                   jnp.where(started, w_enc, 0.0)),
                "cls_head": obj.ema(teacher["cls_head"], state.student["cls_head"], jnp.where(started, d_head, 1.0),
                                    jnp.where(started, w_head, 0.0)),
            }  # fmt: skip
        mel = log_mel(batch["audio"], frontend_cfg)  # [B, F, T]
        mcl_t = obj.mcl_temperature(step, o.mcl_temp_init, o.mcl_temp_decay)
        tau_t = obj.teacher_temperature(step, o.teacher_temp_warmup, o.teacher_temp, o.teacher_temp_warmup_steps)

        n_tokens = (mel.shape[1] // model.tokenizer.patch) * (mel.shape[2] // model.tokenizer.patch)
        ids_keep, ids_mask = obj.random_masking(rng, mel.shape[0], n_tokens, o.mask_ratio)

        def loss_fn(student, mel, ids_keep, ids_mask):
            """Loss of one (micro-)batch and its batch statistics, as sums or means over its examples."""
            out = model.forward(student, teacher, mel, None, o.mask_ratio, ids=(ids_keep, ids_mask))
            per_hyp = obj.prediction_losses(out["preds"], out["targets"])  # [K, B, M]
            pred_tok, winner = obj.mcl_loss(per_hyp, mcl_t, o.mcl_hard_below)  # [B, M]
            z_hat = obj.select_hypothesis(out["preds"], winner)  # [B, M, D]
            t_logits = model.teacher_logits(teacher, out["targets"]).astype(jnp.float32)  # [B, M, P]
            probs = obj.teacher_probs(t_logits, state.center, tau_t)
            cls_tok = obj.cls_loss(model.student_logits(student, z_hat), probs, o.student_temp)
            loss_pred, loss_cls = jnp.mean(pred_tok), jnp.mean(cls_tok)
            loss = o.weight_pred * loss_pred + o.weight_cls * loss_cls
            num_p, k = probs.shape[-1], out["preds"].shape[0]
            stats = dict(  # means over the micro-batch (averaged over micro-batches) and sums (added up)
                loss_pred=loss_pred,
                loss_cls=loss_cls,
                mean_probs=jnp.mean(probs.reshape(-1, num_p), axis=0),
                mean_logits=jnp.mean(t_logits.reshape(-1, num_p), axis=0),
                win_frac=jnp.mean(jax.nn.one_hot(winner, k), axis=(0, 1)),
                used_sum=jnp.zeros((num_p,), jnp.float32).at[jnp.argmax(probs, axis=-1).reshape(-1)].add(1.0),
                target_moments_sum=moments(out["targets"]),
                pred_moments_sum=moments(out["preds"]),
            )
            return loss, stats

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        accum = config.optim.accum_steps
        if accum == 1:
            (loss, stats), grads = grad_fn(state.student, mel, ids_keep, ids_mask)
        else:  # micro-batches in a scan; means of means over equal micro-batches are the batch's means

            def micro(carry, xs):
                (loss, stats), grads = grad_fn(state.student, *xs)
                return jax.tree.map(jnp.add, carry, (loss, stats, grads)), None

            # micro-batch j = examples j, j + accum, ...: every device keeps its share of every micro-batch
            xs = tuple(
                x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1) for x in (mel, ids_keep, ids_mask)
            )
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
                lambda: (lambda r: (r[0][0], r[0][1], r[1]))(grad_fn(state.student, *(x[0] for x in xs)))))  # fmt: skip
            (loss, stats, grads), _ = jax.lax.scan(micro, zeros, xs)
            mean = lambda t: jax.tree.map(lambda v: v / accum, t)
            loss, grads = loss / accum, mean(grads)
            stats = {k: v if k.endswith("_sum") else v / accum for k, v in stats.items()}
        with jax.named_scope("optimizer_update"):
            updates, opt_state = tx.update(grads, state.opt_state, state.student)
            student = optax.apply_updates(state.student, updates)
        stat = stats["mean_probs"] if o.center_from == "probs" else stats["mean_logits"]
        center = obj.update_center(state.center, stat[None], o.center_momentum)
        grad_norm = optax.tree_utils.tree_norm(grads)
        new_state = TrainState(step=step + 1, student=student, teacher=moved_teacher, center=center,
                               opt_state=opt_state)  # fmt: skip

        mean_p = stats["mean_probs"]
        metrics = dict(
            loss=loss,
            loss_pred=stats["loss_pred"],
            loss_cls=stats["loss_cls"],
            lr=lr_fn(step),
            grad_norm=grad_norm,
            ema_decay=d_enc,
            head_ema_decay=d_head,
            teacher_temp=tau_t,
            mcl_temp=mcl_t,
            target_std=std_from_moments(stats["target_moments_sum"]),
            teacher_classes=jnp.sum(stats["used_sum"] > 0),
            cls_perplexity=jnp.exp(-jnp.sum(mean_p * jnp.log(mean_p + 1e-12))),
        )
        pred_std = std_from_moments(stats["pred_moments_sum"])  # [K]
        for i in range(pred_std.shape[0]):
            metrics[f"pred_std_{i}"] = pred_std[i]
            metrics[f"win_frac_{i}"] = stats["win_frac"][i]
        return new_state, metrics

    return train_step
