"""Large-batch optimizer options: lr scaling rules by hand, LAMB and LARS against float64 numpy references (two
steps, per-tensor trust ratios, weight-decay mask), and unknown names failing before compute."""

import math

import jax
import ml_collections as mlc
import numpy as np
import optax
import pytest
from helpers import assert_close_to_scale

from matpac_jax.train.optim import lr_schedule, make_optimizer, peak_lr


def _optim(**kw):
    base = dict(optimizer="adamw", lr=1e-2, lr_scaling="none", reference_batch=256, b1=0.9, b2=0.95, eps=1e-6,
                weight_decay=0.1, wd_exclude_bias_norm_tokens=True, schedule="warmup_cosine", warmup_steps=0,
                clip_norm=1e9, layer_decay=1.0, lr_min=0.0)  # fmt: skip
    return mlc.ConfigDict(base | kw)


def test_lr_scaling_rules():
    assert peak_lr(_optim(), 4096) == 1e-2
    assert peak_lr(_optim(lr_scaling="linear"), 4096) == pytest.approx(1e-2 * 16)
    assert peak_lr(_optim(lr_scaling="sqrt"), 4096) == pytest.approx(1e-2 * 4)
    assert peak_lr(_optim(lr_scaling="sqrt"), 64) == pytest.approx(1e-2 * 0.5)
    with pytest.raises(ValueError, match="config.optim.lr_scaling='cubic'"):
        peak_lr(_optim(lr_scaling="cubic"), 64)
    with pytest.raises(ValueError, match="config.optim.optimizer='adagrad'"):
        make_optimizer(_optim(optimizer="adagrad"), 10, {})


def _tree(rng):
    return {"dense": {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)}}


def _run(optim, steps=2):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(steps)]
    tx = make_optimizer(optim, 1_000_000, params)
    p = {k: {n: np.asarray(v, np.float32) for n, v in d.items()} for k, d in params.items()}
    state = tx.init(p)
    for g in grads:
        g32 = {k: {n: np.asarray(v, np.float32) for n, v in d.items()} for k, d in g.items()}
        updates, state = tx.update(g32, state, p)
        p = optax.apply_updates(p, updates)
    return params, grads, p


def _lr(optim, t):  # half-cosine without warm-up over 1e6 steps
    return optim.lr * 0.5 * (1 + np.cos(np.pi * t / 1_000_000))


def test_lamb_matches_numpy_reference():
    o = _optim(optimizer="lamb")
    params, grads, got = _run(o)
    for name in ("kernel", "bias"):
        p, m, v = params["dense"][name].copy(), 0.0, 0.0
        for t, g in enumerate(grads, start=1):
            g = g["dense"][name]
            m = o.b1 * m + (1 - o.b1) * g
            v = o.b2 * v + (1 - o.b2) * g * g
            u = (m / (1 - o.b1**t)) / (np.sqrt(v / (1 - o.b2**t)) + o.eps)
            if name == "kernel":  # biases are excluded from decay (and from the trust ratio: wd mask)
                u = u + o.weight_decay * p
            trust = np.linalg.norm(p) / np.linalg.norm(u)
            p = p - _lr(o, t - 1) * trust * u
        np.testing.assert_allclose(got["dense"][name], p, rtol=2e-5, atol=1e-6)


def test_lars_matches_numpy_reference():
    o = _optim(optimizer="lars", b1=0.9)
    params, grads, got = _run(o)
    for name in ("kernel", "bias"):
        p, mom = params["dense"][name].copy(), 0.0
        for t, g in enumerate(grads):
            g = g["dense"][name]
            if name == "kernel":
                g = g + o.weight_decay * p
                g = 0.001 * np.linalg.norm(p) / np.linalg.norm(g) * g  # trust ratio (coefficient 1e-3)
            mom = o.b1 * mom + _lr(o, t) * g
            p = p - mom
        np.testing.assert_allclose(got["dense"][name], p, rtol=2e-5, atol=1e-7)


def test_unknown_optimizer_in_a_run_config_is_a_config_error_before_compute(tmp_path):
    from helpers import load_config

    from matpac_jax.config_lib import ConfigError
    from matpac_jax.tasks import make_task
    from matpac_jax.train.loop import check_run

    config = load_config("pp.py", "smoke")
    config.optim.optimizer = "adagrad"
    with pytest.raises(ConfigError, match="config.optim: config.optim.optimizer='adagrad'"):
        check_run(config, str(tmp_path), make_task(config, str(tmp_path)))
    config.optim.optimizer, config.optim.lr_scaling = "lamb", "linear"
    check_run(config, str(tmp_path), make_task(config, str(tmp_path)))  # accepted


def _fairseq_adam_numpy(o, params, grads, lr_fn, mask):
    """fairseq's Adam in float64 (facebookresearch/fairseq fairseq/optim/adam.py:223-234): denom = √v + eps,
    step_size = lr · √(1 − b2ⁿ) / (1 − b1ⁿ), p ← p − lr·wd·p − step_size · m / denom; after fairseq's clipping
    (fairseq/utils.py:392-395): g · min(1, clip / (‖g‖ + 1e-6)), ‖g‖ over every tensor."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: 0.0 for k in p}
    v = {k: 0.0 for k in p}
    for n, g in enumerate(grads, start=1):
        norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
        coef = min(1.0, o.clip_norm / (norm + 1e-6))
        lr = lr_fn(n - 1)
        for k in p:
            gk = g[k] * coef
            m[k] = o.b1 * m[k] + (1 - o.b1) * gk
            v[k] = o.b2 * v[k] + (1 - o.b2) * gk * gk
            step_size = lr * np.sqrt(1 - o.b2**n) / (1 - o.b1**n)
            if mask[k]:
                p[k] = p[k] - lr * o.weight_decay * p[k]
            p[k] = p[k] - step_size * m[k] / (np.sqrt(v[k]) + o.eps)
    return p


def _run_flat(o, params, grads):
    tx = make_optimizer(o, 1_000_000, {"dense": params})
    p = {"dense": {k: np.asarray(x, np.float32) for k, x in params.items()}}
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update({"dense": {k: np.asarray(x, np.float32) for k, x in g.items()}}, state, p)
        p = optax.apply_updates(p, updates)
    return {k: np.asarray(x, np.float64) for k, x in p["dense"].items()}


def test_fairseq_adam_matches_numpy_reference_over_three_steps():
    """The recipe's optimizer ('adamw_fairseq', configs/pp.py) over 3 steps including step 1, where eps on the raw
    √v and optax's eps on √v̂ differ most; small gradients (‖g‖ ~ 1e-5, v ~ eps²) make eps matter, one step is
    clipped (clip_norm below ‖g‖)."""
    o = _optim(optimizer="adamw_fairseq", eps=1e-6, b2=0.95, clip_norm=3e-5, wd_exclude_bias_norm_tokens=True)
    rng = np.random.default_rng(1)
    params = {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)}
    grads = [{k: 1e-6 * s * rng.standard_normal(x.shape) for k, x in params.items()} for s in (1.0, 10.0, 3.0)]
    got = _run_flat(o, params, grads)
    want = _fairseq_adam_numpy(o, params, grads, lambda t: _lr(o, t), {"kernel": True, "bias": False})
    for k in params:
        step = want[k] - params[k]
        np.testing.assert_allclose(got[k] - params[k], step, rtol=0, atol=1e-4 * np.abs(step).max())
    # optax's form ('adamw', a named option) is another optimizer here: its update differs by far more than 1e-4
    optax_form = _run_flat(_optim(**(dict(o) | {"optimizer": "adamw"})), params, grads)
    assert np.abs((optax_form["kernel"] - params["kernel"]) - (want["kernel"] - params["kernel"])).max() > 0.05 * (
        np.abs(want["kernel"] - params["kernel"]).max()
    )


def test_clipping_scales_by_clip_over_norm_plus_eps():
    """g · min(1, 3 / (‖g‖ + 1e-6)) as fairseq/utils.py:392-395 (and torch's clip_grad_norm_)."""
    from matpac_jax.train.optim import clip_by_global_norm

    clip = clip_by_global_norm(3.0)
    for norm in (6.0, 3.0, 2.0, 3e-7):
        g = {"a": np.full((4,), norm / 2, np.float32)}  # ‖g‖ = norm
        out, _ = clip.update(g, clip.init(g))
        coef = min(1.0, 3.0 / (norm + 1e-6))
        np.testing.assert_allclose(np.asarray(out["a"], np.float64), g["a"] * coef, rtol=1e-6)
    # at ‖g‖ = 3 exactly fairseq still scales by 3 / (3 + 1e-6) < 1, where optax's clip_by_global_norm does not
    g = {"a": np.full((4,), 1.5, np.float32)}
    assert float(clip.update(g, clip.init(g))[0]["a"][0]) < 1.5


def test_sgd_is_torch_sgd_with_momentum_and_coupled_weight_decay():
    """'sgd' (m2d's fine-tuning: timm Lars with weight decay 0 is torch SGD, nttcslab/eval-audio-repr finetune.py:221):
    torch.optim.SGD's update, buf = momentum·buf + (g + wd·p); p ← p − lr·buf (buf = g + wd·p at the first step),
    against float64 NumPy over three steps."""
    o = _optim(optimizer="sgd", lr=0.5, b1=0.9, weight_decay=0.01, wd_exclude_bias_norm_tokens=False)
    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    tx = make_optimizer(o, 100, params)
    state, p_jax = tx.init(params), params
    p, buf = params["w"].astype(np.float64), None
    lr = lr_schedule(o, 100)  # warm-up 0, then the half-cosine
    for t in range(3):
        g = rng.normal(size=(4, 3)).astype(np.float32)
        updates, state = tx.update({"w": g}, state, p_jax)
        p_jax = optax.apply_updates(p_jax, updates)
        d = g + 0.01 * p
        buf = d if buf is None else 0.9 * buf + d
        p = p - float(lr(t)) * buf
    assert_close_to_scale(p_jax["w"], p, rtol=1e-5)


def _timm_cosine_lr(t, lr, lr_min, warmup_t, t_initial):
    """timm's CosineLRScheduler._get_lr at epoch t, float64 (huggingface/pytorch-image-models
    timm/scheduler/cosine_lr.py:81-109) with EVAR's arguments: warmup_lr_init 0, warmup_prefix False, one cycle
    (cycle_mul 1, cycle_decay 1, cycle_limit 1), k_decay 1."""
    if t < warmup_t:
        return 0.0 + t * (lr - 0.0) / warmup_t  # cosine_lr.py:76, 83
    i = math.floor(t / t_initial)  # cosine_lr.py:93-95: no warmup_prefix, so t is not shifted
    t_curr = t - t_initial * i
    if i < 1:
        return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t_curr / t_initial))  # cosine_lr.py:101-105
    return lr_min


def _evar_update_lrs(lr, lr_min, epochs, warmup_epochs, epoch_iters):
    """The lr of every update in EVAR's loop (nttcslab/eval-audio-repr finetune.py:225, 250-264): the scheduler sets
    warmup_lr_init = 0 at construction (cosine_lr.py:75-77); each iteration runs optimizer.step() at the lr in place,
    then scheduler.step(epoch + iter / epoch_iters) (timm/scheduler/scheduler.py:77-82) sets the next one."""
    current, out = 0.0, []
    for epoch in range(epochs):
        for it in range(epoch_iters):
            out.append(current)
            current = _timm_cosine_lr(epoch + it / epoch_iters, lr, lr_min, warmup_epochs, epochs)
    return np.array(out)


@pytest.mark.parametrize(
    "variant, epochs, warmup, epoch_iters, after_warmup, at_half, more_lr",
    [("as2m", 70, 15, 3125, 1.7818, 1.0000, 0.2476), ("as20k", 200, 5, 321, 0.4992, 0.2500, 0.0256)],
)
def test_finetuning_schedule_is_timm_cosine_as_evar_steps_it(variant, epochs, warmup, epoch_iters, after_warmup,
                                                             at_half, more_lr):  # fmt: skip
    """The fine-tuning recipes' lr at every update equals EVAR's (timm's formula, float64, stepped as EVAR's loop
    steps it), so at every epoch boundary and at every fractional point of the warm-up: AS2M 1.78 right after the
    15-epoch warm-up and 1.00 at epoch 35 (the cosine runs over the whole run, warm-up included), where optax's
    warmup_cosine_decay_schedule ('warmup_cosine', pretraining's) gives 2.00 and 1.42."""
    from helpers import load_config

    c = load_config("finetune_as.py", variant)
    assert (c.optim.schedule, c.optim.lr_min) == ("timm_cosine", 1e-7)
    assert (c.total_steps, c.optim.warmup_steps) == (epochs * epoch_iters, warmup * epoch_iters)
    want = _evar_update_lrs(c.optim.lr, 1e-7, epochs, warmup, epoch_iters)
    got = np.asarray(jax.vmap(lr_schedule(c.optim, c.total_steps, c.data.batch_size))(np.arange(c.total_steps)))
    assert_close_to_scale(got, want, rtol=2e-6)  # float32 against float64, relative to the peak lr
    boundaries = np.arange(epochs) * epoch_iters + 1  # the update after scheduler.step(epoch)
    want_at = [_timm_cosine_lr(e, c.optim.lr, 1e-7, warmup, epochs) for e in range(epochs)]
    assert_close_to_scale(got[boundaries], want_at, rtol=2e-6)
    fractions = np.linspace(0, warmup, 41)[1:-1]  # the warm-up at fractional epochs
    counts = np.round(fractions * epoch_iters).astype(int) + 1
    assert_close_to_scale(got[counts], c.optim.lr * (counts - 1) / (warmup * epoch_iters), rtol=2e-6)
    assert got[0] == got[1] == 0.0  # two updates at warmup_lr_init: before the first step and at step(0)
    assert got[warmup * epoch_iters] == pytest.approx(c.optim.lr * (1 - 1 / (warmup * epoch_iters)), rel=1e-6)
    assert got[warmup * epoch_iters + 1] == pytest.approx(after_warmup, abs=1e-4 * c.optim.lr)
    assert got[epochs // 2 * epoch_iters + 1] == pytest.approx(at_half, abs=1e-4 * c.optim.lr)
    # pretraining's shape (unchanged, 'warmup_cosine') is another schedule: the peak after warm-up, more lr overall
    old = lr_schedule(mlc.ConfigDict(dict(c.optim) | {"schedule": "warmup_cosine"}), c.total_steps)
    assert float(old(warmup * epoch_iters)) == pytest.approx(c.optim.lr, rel=1e-6)
    old_total = np.asarray(jax.vmap(old)(np.arange(c.total_steps)), np.float64).sum()
    assert old_total / want.sum() - 1 == pytest.approx(more_lr, abs=1e-4)  # integrated lr: +24.8 % AS2M, +2.6 % AS20K
    if variant == "as2m":
        assert float(old(35 * epoch_iters)) == pytest.approx(1.4154, abs=1e-4)


def test_timm_cosine_floors_at_lr_min_after_the_run():
    """Past t_initial timm returns lr_min (cosine_lr.py:106-107); the schedule does the same past total_steps."""
    o = _optim(schedule="timm_cosine", lr=1.0, warmup_steps=10, lr_min=1e-3)
    lr = lr_schedule(o, 100)
    assert float(lr(101)) == pytest.approx(1e-3) and float(lr(500)) == pytest.approx(1e-3)
    assert float(lr(100)) == pytest.approx(_timm_cosine_lr(99, 1.0, 1e-3, 10, 100), abs=1e-6)  # of the peak, 1
