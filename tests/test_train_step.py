"""The pretraining step: EMA order, center update, loss composition, optimizer recipe, learning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_config

from matpac_jax import parallel, tasks
from matpac_jax.matpac import task as pretrain
from matpac_jax.train.optim import (
    clip_by_global_norm,
    decay_mask,
    lr_schedule,
    make_optimizer,
    scale_by_fairseq_adam,
)


@pytest.fixture(scope="module")
def setup():
    config = load_config()
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    model, init_fn, step_fn, _ = pretrain.build(config, mesh)
    batches, _ = pretrain.make_input(config)
    return config, model, init_fn, step_fn, batches


@pytest.fixture(scope="module")
def history(setup):
    """(state before, state after, metrics) for the first 8 steps of the smoke config."""
    return run(setup, 8)


def run(setup, steps):
    config, _, init_fn, step_fn, batches = setup
    state = init_fn(jax.random.key(config.seed))
    history = []
    for t in range(steps):
        before = jax.device_get(state)
        state, metrics = step_fn(state, {"audio": jnp.asarray(batches(t)["audio"])}, jax.random.key(t))
        history.append((before, jax.device_get(state), jax.device_get(metrics)))
    return history


def test_total_loss_is_half_prediction_plus_half_classification(history):
    for _, _, m in history:
        np.testing.assert_allclose(m["loss"], 0.5 * m["loss_pred"] + 0.5 * m["loss_cls"], rtol=1e-6)


def test_teacher_is_untouched_at_step_zero_then_follows_the_previous_student(setup, history):
    config = setup[0]
    o = config.objective
    (b0, a0, _), (b1, a1, m1) = history[:2]
    leaf = lambda tree, part: np.asarray(tree[part]["blocks_0"]["attn"]["qkv"]["kernel"])
    np.testing.assert_array_equal(leaf(a0.teacher, "encoder"), leaf(b0.teacher, "encoder"))
    d = o.ema_start + (o.ema_end - o.ema_start) * 1 / config.total_steps
    np.testing.assert_allclose(m1["ema_decay"], d, rtol=1e-7)
    expected = d * leaf(b1.teacher, "encoder") + (1 - d) * leaf(b1.student, "encoder")
    np.testing.assert_allclose(leaf(a1.teacher, "encoder"), expected, rtol=1e-6, atol=1e-7)
    dh = o.head_ema_start + (o.head_ema_end - o.head_ema_start) / config.total_steps
    th = lambda tree: np.asarray(tree["cls_head"]["mlp_0"]["kernel"])
    np.testing.assert_allclose(th(a1.teacher), dh * th(b1.teacher) + (1 - dh) * th(b1.student), rtol=1e-6, atol=1e-7)


def test_center_moves_towards_mean_teacher_probabilities(history):
    b0, a0, _ = history[0]
    c = np.asarray(a0.center)
    # c1 = 0.9 * 0 + 0.1 * mean(p): a probability vector scaled by 0.1
    np.testing.assert_allclose(c.sum(), 0.1, rtol=1e-5)
    assert (c >= 0).all() and not np.asarray(b0.center).any()


def test_schedules_reported_in_metrics(setup, history):
    config = setup[0]
    o = config.objective
    for t, (_, _, m) in enumerate(history[:3]):
        np.testing.assert_allclose(m["mcl_temp"], o.mcl_temp_init * o.mcl_temp_decay**t, rtol=1e-5)
        assert m["teacher_temp"] == pytest.approx(
            o.teacher_temp_warmup + (o.teacher_temp - o.teacher_temp_warmup) * t / o.teacher_temp_warmup_steps, rel=1e-5
        )
        assert m["lr"] == pytest.approx(float(lr_schedule(config.optim, config.total_steps)(t)), rel=1e-6)
        assert 1 <= m["teacher_classes"] <= config.model.cls_head.prototypes
        assert 1 <= m["cls_perplexity"] <= config.model.cls_head.prototypes
        assert all(np.isfinite(v) for v in m.values())


def test_lr_schedule_warms_up_then_half_cosine_to_zero():
    config = load_config(arg=None)
    fn = lr_schedule(config.optim, config.total_steps)
    w, total, peak = config.optim.warmup_steps, config.total_steps, config.optim.lr
    assert float(fn(0)) == 0.0
    assert float(fn(w // 2)) == pytest.approx(peak / 2, rel=1e-4)
    assert float(fn(w)) == pytest.approx(peak, rel=1e-5)
    mid = (w + total) // 2
    assert float(fn(mid)) == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * (mid - w) / (total - w))), rel=1e-4)
    assert float(fn(total)) == pytest.approx(0.0, abs=1e-12)


def test_adamw_update_matches_reference_formula():
    """One step of the recipe's optimizer (fairseq's Adam, fairseq/optim/adam.py:223-234) with the paper's
    hyper-parameters after clipping (fairseq/utils.py:392-395), against a hand computation."""
    config = load_config(arg=None)
    o = config.optim
    assert o.optimizer == "adamw_fairseq"
    params = {"w": jnp.asarray([[0.5, -1.0], [2.0, 0.25]])}
    grads = {"w": jnp.asarray([[1.0, -2.0], [0.5, 0.0]])}
    tx = make_optimizer(o, config.total_steps, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    g = np.asarray(grads["w"]) * min(1.0, o.clip_norm / (np.linalg.norm(np.asarray(grads["w"])) + 1e-6))
    m, v = (1 - o.b1) * g, (1 - o.b2) * g**2
    step_size = np.sqrt(1 - o.b2) / (1 - o.b1)  # n = 1
    lr0 = 0.0  # step 0 of the warm-up
    expected = -lr0 * (step_size * m / (np.sqrt(v) + o.eps) + o.weight_decay * np.asarray(params["w"]))
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, atol=1e-12)
    # at the peak learning rate (schedule injected directly) the same formula holds with lr = 3e-4
    tx_peak = optax.chain(
        clip_by_global_norm(o.clip_norm),
        scale_by_fairseq_adam(o.b1, o.b2, o.eps),
        optax.add_decayed_weights(o.weight_decay),
        optax.scale_by_learning_rate(o.lr),
    )
    up_peak, _ = tx_peak.update(grads, tx_peak.init(params), params)
    exp_peak = -o.lr * (step_size * m / (np.sqrt(v) + o.eps) + o.weight_decay * np.asarray(params["w"]))
    np.testing.assert_allclose(np.asarray(up_peak["w"]), exp_peak, rtol=1e-5)


def test_global_norm_clipping_at_three():
    config = load_config(arg=None)
    assert config.optim.clip_norm == 3.0
    clip = clip_by_global_norm(config.optim.clip_norm)
    g = {"a": jnp.full((4,), 3.0)}  # norm 6
    out, _ = clip.update(g, clip.init(g))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["a"])), 6.0 * 3.0 / (6.0 + 1e-6), rtol=1e-6)


def test_weight_decay_switch_excludes_bias_norm_and_tokens():
    params = {
        "encoder": {"blocks_0": {"norm1": {"scale": 1, "bias": 0}, "attn": {"qkv": {"kernel": 0, "bias": 0}}}},
        "tokenizer": {"cls_token": 0},
        "predictor": {"mask_token": 0},
    }
    everything = jax.tree.leaves(decay_mask(params, False))
    assert all(everything)
    mask = decay_mask(params, True)
    assert mask["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert not any(
        [
            mask["encoder"]["blocks_0"]["norm1"]["scale"],
            mask["encoder"]["blocks_0"]["attn"]["qkv"]["bias"],
            mask["tokenizer"]["cls_token"],
            mask["predictor"]["mask_token"],
        ]
    )


def test_matpac_config_is_the_same_code_with_one_head():
    config = load_config("matpac.py", "smoke")
    assert config.model.mcl_heads == 1
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    model, init_fn, step_fn, _ = pretrain.build(config, mesh)
    batches, _ = pretrain.make_input(config)
    state, m = step_fn(init_fn(jax.random.key(0)), {"audio": jnp.asarray(batches(0)["audio"])}, jax.random.key(0))
    assert len(state.student["predictor"]) and "heads_1" not in state.student["predictor"]
    assert m["win_frac_0"] == 1.0 and np.isfinite(m["loss"])


def test_training_reduces_the_loss(history):
    losses = [m["loss"] for _, _, m in history]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2


def test_bfloat16_compute_keeps_float32_parameters_and_moments():
    config = load_config()
    config.model.dtype = "bfloat16"
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    _, init_fn, step_fn, _ = pretrain.build(config, mesh)
    batches, _ = pretrain.make_input(config)
    state, m = step_fn(init_fn(jax.random.key(0)), {"audio": jnp.asarray(batches(0)["audio"])}, jax.random.key(0))
    dtypes = {x.dtype for x in jax.tree.leaves((state.student, state.teacher, state.center)) if x.ndim}
    assert dtypes == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype("float32")}
    assert np.isfinite(float(m["loss"]))


@pytest.fixture(scope="module")
def vit_b_step():
    """The ViT-B recipe's step (bfloat16 compute) for batch 2, traced only: (jaxpr, batch)."""
    config = load_config(arg=None)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    _, _, step_fn, abstract = pretrain.build(config, mesh)
    b = 2
    audio = jax.ShapeDtypeStruct((b, 97_520), jnp.float32)
    return jax.make_jaxpr(step_fn)(abstract, {"audio": audio}, jax.random.key(0)), b


def test_vit_b_step_costs_the_reference_flops_per_sample(vit_b_step):
    """Counted matmul FLOPs of the whole step (student fwd+bwd, teacher fwd) vs the reference 93.1 GFLOP/sample."""
    from matpac_jax.flops import jaxpr_matmul_flops

    jaxpr, b = vit_b_step
    assert jaxpr_matmul_flops(jaxpr) / b / 1e9 == pytest.approx(93.1, rel=0.05)


def test_vit_b_step_runs_its_matmuls_in_bfloat16_and_moves_few_tokens(vit_b_step):
    """The mixed-precision audit of the recipe's step: >= 98 % of matmul FLOPs in bfloat16 (the rest: the
    float32 prototype layer and XLA attention's float32 logits), and no gather or scatter of the K hypotheses
    (the winner is a one-hot sum) -- every gather/scatter moves at most one [B, N, D] of tokens."""
    from matpac_jax.program_audit import audit

    jaxpr, b = vit_b_step
    r = audit(jaxpr, b, min_elements=1)
    total = sum(r["flops"].values())
    assert r["flops"]["bfloat16 x bfloat16"] / total >= 0.98
    assert max(v for (_, _, shape), v in r["moves"].items() if shape) <= b * 190 * 768
    assert not [shape for (_, _, shape) in r["moves"] if len(shape) == 4 and shape[0] == 5]


def test_gradient_accumulation_is_the_large_batch_update():
    """Two steps of batch 8 in 4 micro-batches of 2 on 2 devices: the same losses, metrics and parameters as the
    whole batch at once (float32; the sums run in another order)."""
    mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
    results = {}
    for accum in (1, 4):
        config = load_config()
        config.optim.accum_steps = accum
        _, init_fn, step_fn, _ = pretrain.build(config, mesh)
        batches, _ = pretrain.make_input(config)
        state = init_fn(jax.random.key(config.seed))
        metrics = []
        for t in range(2):
            state, m = step_fn(state, parallel.global_batch(batches(t), mesh), jax.random.key(t))
            metrics.append(jax.device_get(m))
        results[accum] = (jax.device_get(state.student), jax.device_get(state.center), metrics)
    (p1, c1, m1), (p4, c4, m4) = results[1], results[4]
    for a, b in zip(m1, m4, strict=True):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(c4, c1, rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6), p1, p4)


def test_remat_scan_and_padded_attention_change_memory_not_numbers():
    """Rematerialised blocks (remat 'full'), the layer scan with remat 'dots', attention sequences padded to a
    multiple of 64 with true key lengths (what cuDNN flash attention needs; here through XLA on CPU), and 'xla'
    attention against the default 'auto': the same parameter tree, loss and update as the straightforward step."""
    from matpac_jax.models.vit import attention

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 58, 4, 16)) for i in range(3))
    np.testing.assert_allclose(attention(q, k, v, None, 64), attention(q, k, v, None), rtol=1e-5, atol=1e-6)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    out = {}
    variants = {
        "plain": {},
        "remat": {"remat": "full"},
        "scan": {"scan_layers": True, "remat": "dots"},
        "padded": {"attn_pad_to": 64},
        "xla": {"attn_impl": "xla"},  # the default 'auto' is XLA's on a CPU: the same step
    }
    for name, overrides in variants.items():
        config = load_config()
        config.model.update(overrides)
        _, init_fn, step_fn, _ = pretrain.build(config, mesh)
        batch = {"audio": jnp.asarray(pretrain.make_input(config)[0](0)["audio"])}
        state, m = step_fn(init_fn(jax.random.key(config.seed)), batch, jax.random.key(0))
        out[name] = (jax.device_get(state.student), float(m["loss"]))
    ref_params, ref_loss = out["plain"]
    for name in ("remat", "scan", "padded", "xla"):
        params, loss = out[name]
        assert jax.tree.structure(params) == jax.tree.structure(ref_params)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), ref_params, params)


def test_batch_spec_is_what_the_input_yields(tmp_path):
    """The memory report compiles the step for the batch the loop feeds (its shapes are read from the first batch,
    demo batches are float32), or every run compiles its step twice: one program serves the report and the steps."""
    from helpers import smoke_config

    from matpac_jax.matpac import step as matpac_step

    traced = []
    real = matpac_step.make_program

    def counting(*args, **kwargs):
        program = real(*args, **kwargs)

        def prepare(state, batch, rng):
            traced.append({k: (v.shape, v.dtype) for k, v in batch.items()})
            return program.prepare(state, batch, rng)

        return dataclasses.replace(program, prepare=prepare)

    config = smoke_config(3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "make_program", counting)
        tasks.train_and_evaluate(config, str(tmp_path / "run"))
    batch = pretrain.PretrainTask(config, "/nonexistent").make_input().source(0)
    assert traced and all(t == {k: (v.shape, v.dtype) for k, v in batch.items()} for t in traced), traced
