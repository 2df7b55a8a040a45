"""One pretraining step against a float64 NumPy computation of SPEC §3 (tests/reference.py), at a step t > 0 with a
fast EMA so that the teacher before and after its move differ a lot: the forward uses the shadows γ_t as they stand
(aurianworld/matpac training_matpac/models/model.py ``forward_cls_pred``: teacher forward at :263-265 and :302, the
EMA moves in ``do_ema_step`` at :317-327, after the losses), and the stored teacher is d·γ_t + (1 − d)·θ_t."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from helpers import load_config

from matpac_jax import parallel
from matpac_jax.audio.frontend import log_mel
from matpac_jax.matpac import objective as obj
from matpac_jax.matpac import task as pretrain

STEP = 2


@pytest.fixture(scope="module")
def run():
    config = load_config()
    o = config.objective
    o.ema_start = o.ema_end = 0.5  # γ_{t+1} far from γ_t
    o.head_ema_start = o.head_ema_end = 0.5
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    model, init_fn, step_fn, _ = pretrain.build(config, mesh)
    batches, _ = pretrain.make_input(config)
    state = init_fn(jax.random.key(config.seed))
    for t in range(STEP):
        state, _ = step_fn(state, {"audio": jnp.asarray(batches(t)["audio"])}, jax.random.key(t))
    audio = np.asarray(batches(STEP)["audio"])
    before = jax.device_get(state)
    after, metrics = step_fn(state, {"audio": jnp.asarray(audio)}, jax.random.key(STEP))
    mel = np.asarray(log_mel(jnp.asarray(audio), pretrain.frontend_config(config)), np.float64)
    n = model.num_patches
    ids_keep, ids_mask = (np.asarray(x) for x in obj.random_masking(jax.random.key(STEP), len(audio), n, o.mask_ratio))
    return config, model, before, jax.device_get(after), jax.device_get(metrics), mel, ids_keep, ids_mask


def _loss64(config, model, student, teacher, center, mel, ids_keep, ids_mask):
    """Total loss of SPEC §3 in float64 for (student θ, teacher shadows, center) at step STEP."""
    m, o = config.model, config.objective
    grid_f, grid_t = model.tokenizer.grid_freq, model.tokenizer.grid_time
    s, t = ref.to_numpy(student), ref.to_numpy(teacher)
    tokens, cls = ref.tokenize(mel, s["tokenizer"], grid_f, grid_t)
    latents = ref.transformer(ref.prepend_cls(cls, ref.gather(tokens, ids_keep)), s["encoder"], m.encoder.heads)
    preds = ref.predictor(latents, ids_keep, ids_mask, s["predictor"], m.predictor.heads, grid_f, grid_t)
    targets = ref.transformer(ref.prepend_cls(cls, ref.gather(tokens, ids_mask)), t["encoder"], m.encoder.heads)[:, 1:]
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    per_hyp = 2 - 2 * np.sum(unit(preds) * unit(targets)[None], axis=-1)  # [K, B, M]
    temp = o.mcl_temp_init * o.mcl_temp_decay**STEP
    q = ref.softmax(-per_hyp / temp, axis=0)
    pred_loss = np.sum(q * per_hyp, axis=0) if temp > o.mcl_hard_below else per_hyp.min(0)
    winner = per_hyp.argmin(0)
    z_hat = np.take_along_axis(preds, winner[None, ..., None], axis=0)[0]
    tau = o.teacher_temp_warmup + (o.teacher_temp - o.teacher_temp_warmup) * min(STEP / o.teacher_temp_warmup_steps, 1)
    probs = ref.softmax((ref.cls_head(targets, t["cls_head"]) - np.asarray(center, np.float64)) / tau)
    logp = np.log(ref.softmax(ref.cls_head(z_hat, s["cls_head"]) / o.student_temp))
    cls_loss = -np.sum(probs * logp, axis=-1)
    return o.weight_pred * pred_loss.mean() + o.weight_cls * cls_loss.mean()


def test_forward_uses_the_teacher_before_its_move(run):
    config, model, before, after, metrics, mel, ids_keep, ids_mask = run
    want = _loss64(config, model, before.student, before.teacher, before.center, mel, ids_keep, ids_mask)
    moved = _loss64(config, model, before.student, after.teacher, before.center, mel, ids_keep, ids_mask)
    assert abs(moved - want) > 1e-3 * abs(want)  # the two orders are told apart by far more than the tolerance
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-4)


def test_stored_teacher_is_the_moved_shadow(run):
    config, _, before, after, _, *_ = run
    d = 0.5  # γ_{t+1} = d·γ_t + (1 − d)·θ_t, θ_t the student of this step's forward (before its update)
    for part in ("encoder", "cls_head"):
        g, th, new = (ref.to_numpy(x[part]) for x in (before.teacher, before.student, after.teacher))
        for (path, a), b, c in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(g), jax.tree.leaves(th),
                                   strict=True):  # fmt: skip
            want = d * b + (1 - d) * c
            np.testing.assert_allclose(a, want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=str(path))
