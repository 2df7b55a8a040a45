"""Model tests (SPEC §2–§3): parameter counts of the paper recipe, init, and parity of every module with the
independent float64 NumPy reference in tests/reference.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from helpers import assert_close_to_scale, load_config

from matpac_jax.matpac.cls_head import ClsHead
from matpac_jax.matpac.model import MatpacModel
from matpac_jax.matpac.objective import num_visible
from matpac_jax.matpac.predictor import Predictor
from matpac_jax.models.vit import Block, Tokenizer, Transformer, sincos_pos_embed_2d, truncated_pos_embed

# --- helpers ----------------------------------------------------------------------------------------------


FAST = {"xla_backend_optimization_level": 0}


def fast(fn, *args):
    """jax.jit(fn) compiled for these args with XLA's backend optimisation off: the test programs run in
    milliseconds, and compiling them fully optimised dominates the run time on a small CPU (~3x)."""
    return jax.jit(fn).lower(*args).compile(FAST)


def run(fn, *args):
    return fast(fn, *args)(*args)


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def perturb(params, seed: int, scale: float = 0.2):
    """Add N(0, scale²) noise to every leaf (in numpy: no per-shape compiles), so that zero biases and unit
    LayerNorm scales cannot hide bugs."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + scale * rng.standard_normal(x.shape), x.dtype), params)


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def flat(params) -> dict[str, np.ndarray]:
    """{'a/b/kernel': array} view of a param tree."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {"/".join(k.key for k in path): np.asarray(x) for path, x in leaves}


def random_ids(rng: np.random.Generator, batch: int, n: int, n_vis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample random (unsorted) split of range(n) into n_vis kept and n - n_vis masked positions."""
    perms = np.stack([rng.permutation(n) for _ in range(batch)])
    return perms[:, :n_vis].astype(np.int32), perms[:, n_vis:].astype(np.int32)


@pytest.fixture(scope="module")
def smoke():
    """The smoke-config model with its (student, teacher) params."""
    model = MatpacModel.from_config(load_config())
    student, teacher = run(model.init, jax.random.key(0))
    return model, student, teacher


# --- parameter counts of the paper recipe -----------------------------------------------------------------


def test_paper_recipe_parameter_counts():
    model = MatpacModel.from_config(load_config(arg=None))
    student, teacher = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    assert count(student["encoder"]) == 85_056_000
    assert count(teacher["encoder"]) == 85_056_000
    assert count(student["tokenizer"]["proj"]) == 197_376
    assert student["tokenizer"]["cls_token"].shape == (1, 1, 768)
    pred = student["predictor"]
    heads = {k: v for k, v in pred.items() if k.startswith("heads_")}
    assert sorted(heads) == [f"heads_{k}" for k in range(5)]
    assert count(heads) == 1_969_920
    assert count({k: v for k, v in pred.items() if k not in heads}) == 25_614_336
    assert count(student["cls_head"]) == 6_822_144
    assert count(teacher["cls_head"]) == 6_822_144


def test_single_head_predictor_parameter_count():
    config = load_config(arg=None)
    config.model.mcl_heads = 1
    model = MatpacModel.from_config(config)
    student, _ = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    assert count(student["predictor"]) == 26_008_320


# --- positional embedding ---------------------------------------------------------------------------------


def test_reference_pos_embed_known_values():
    """Sanity of the reference itself: token (f, t) has sin(t), cos(t) at the first channel of each time
    quarter and sin(f), cos(f) in the freq half (ω_0 = 1); the last frequency is 10000^(-(D/4-1)/(D/4))."""
    d, gf, gt = 16, 3, 5
    pos = ref.sincos_pos_embed_2d(d, gf, gt)
    f, t = 2, 3
    row = pos[1 + f * gt + t]
    np.testing.assert_allclose(row[[0, 4, 8, 12]], [np.sin(t), np.cos(t), np.sin(f), np.cos(f)])
    np.testing.assert_allclose(row[3], np.sin(t * 10000.0 ** (-3 / 4)))


@pytest.mark.parametrize("dim", [768, 512])
def test_pos_embed_matches_reference(dim):
    ours = sincos_pos_embed_2d(dim, 5, 38)
    expected = ref.sincos_pos_embed_2d(dim, 5, 38)
    assert ours.shape == (191, dim)
    assert not ours[0].any()
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_truncated_pos_embed_keeps_first_time_columns():
    ours = truncated_pos_embed(768, 5, 38, 10)
    full = ref.sincos_pos_embed_2d(768, 5, 38)
    rows = [1 + f * 38 + t for f in range(5) for t in range(10)]
    np.testing.assert_allclose(ours, full[rows], atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        truncated_pos_embed(768, 5, 38, 39)


# --- tokenizer --------------------------------------------------------------------------------------------


TOK = Tokenizer(dim=24, patch=16, grid_freq=5, grid_time=6)  # 64 frames = 4 time patches: truncated positions


def test_tokenizer_matches_reference():
    mel = np.random.default_rng(0).standard_normal((2, 80, 64)).astype(np.float32)
    params = perturb(run(TOK.init, jax.random.key(0), mel)["params"], seed=1)
    tokens, cls = run(TOK.apply, {"params": params}, mel)
    exp_tokens, exp_cls = ref.tokenize(mel.astype(np.float64), ref.to_numpy(params), 5, 6)
    assert tokens.shape == (2, 5 * 4, 24)
    assert rel_err(tokens, exp_tokens) < 1e-5
    np.testing.assert_array_equal(cls, exp_cls)


def test_tokenizer_tokens_are_freq_major():
    mel = np.zeros((1, 80, 64), np.float32)
    params = run(TOK.init, jax.random.key(0), mel)["params"]
    bumped = mel.copy()
    bumped[0, 2 * 16 + 5, 3 * 16 + 11] = 1.0  # inside patch (f=2, t=3)
    apply = fast(TOK.apply, {"params": params}, mel)
    diff = np.abs(np.asarray(apply({"params": params}, bumped)[0] - apply({"params": params}, mel)[0]))[0]
    changed = np.flatnonzero(diff.max(axis=-1) > 0)
    np.testing.assert_array_equal(changed, [2 * 4 + 3])


# --- transformer, predictor, cls head ---------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_transformer_matches_reference(scan):
    """Also on a small-variance input, where LayerNorm's eps (1e-6) is visible. The layer scan (weights stacked,
    one lax.scan) has the same per-block parameter tree and gives the same outputs and per-layer outputs."""
    model = Transformer(dim=32, depth=3, heads=4, scan_layers=scan)
    x = np.random.default_rng(0).standard_normal((2, 7, 32)).astype(np.float32)
    params = perturb(run(model.init, jax.random.key(0), x)["params"], seed=1)
    assert sorted(params) == ["blocks_0", "blocks_1", "blocks_2", "norm"]
    apply = fast(lambda p, x: model.apply({"params": p}, x, return_layers=True), params, x)
    p64 = ref.to_numpy(params)
    for scale in (1.0, 0.01):
        out, layers = apply(params, x * np.float32(scale))
        exp, exp_layers = ref.transformer(x.astype(np.float64) * scale, p64, heads=4, return_layers=True)
        assert rel_err(out, exp) < 1e-5
        assert len(layers) == 3
        for a, b in zip(layers, exp_layers, strict=True):
            assert rel_err(a, b) < 1e-5


PRED = Predictor(dim=16, out_dim=24, depth=2, heads=4, num_heads_out=3, grid_freq=5, grid_time=4)


@pytest.fixture(scope="module")
def pred_case():
    """Perturbed predictor params, inputs with unsorted ids (placement and order must follow them), and the
    compiled apply."""
    rng = np.random.default_rng(0)
    b, n, n_vis = 2, 20, 6
    ids_keep, ids_mask = random_ids(rng, b, n, n_vis)
    latents = rng.standard_normal((b, 1 + n_vis, 24)).astype(np.float32)
    params = perturb(run(PRED.init, jax.random.key(0), latents, ids_keep, ids_mask)["params"], seed=1)
    apply = fast(PRED.apply, {"params": params}, latents, ids_keep, ids_mask)
    return params, latents, ids_keep, ids_mask, lambda *args: np.asarray(apply({"params": params}, *args))


def test_predictor_matches_reference(pred_case):
    params, latents, ids_keep, ids_mask, apply = pred_case
    out = apply(latents, ids_keep, ids_mask)
    exp = ref.predictor(latents.astype(np.float64), ids_keep, ids_mask, ref.to_numpy(params), 4, 5, 4)
    assert out.shape == (3, 2, 14, 24)
    assert rel_err(out, exp) < 1e-5


def test_predictor_follows_ids_keep_and_ids_mask(pred_case):
    """Permuting the visible latents together with ids_keep changes nothing; permuting ids_mask permutes the
    output tokens the same way."""
    _, latents, ids_keep, ids_mask, apply = pred_case
    out = apply(latents, ids_keep, ids_mask)
    pk, pm = np.random.default_rng(2).permutation(6), np.random.default_rng(3).permutation(14)
    shuffled_latents = np.concatenate([latents[:, :1], latents[:, 1:][:, pk]], axis=1)
    assert_close_to_scale(apply(shuffled_latents, ids_keep[:, pk], ids_mask), out)
    assert_close_to_scale(apply(latents, ids_keep, ids_mask[:, pm]), out[:, :, pm])


HEAD = ClsHead(hidden=32, bottleneck=8, num_prototypes=12)


def _head_case():
    x = np.random.default_rng(0).standard_normal((3, 5, 24)).astype(np.float32)
    params = perturb(run(HEAD.init, jax.random.key(0), x)["params"], seed=1)
    return params, x


def test_cls_head_matches_reference():
    params, x = _head_case()
    out = run(HEAD.apply, {"params": params}, x)
    assert out.shape == (3, 5, 12)
    assert rel_err(out, ref.cls_head(x.astype(np.float64), ref.to_numpy(params))) < 1e-5


def test_cls_head_weight_norm():
    """Logits depend on weight_v only through its direction per prototype; weight_g scales them."""
    params, x = _head_case()
    apply = fast(HEAD.apply, {"params": params}, x)
    out = np.asarray(apply({"params": params}, x))
    scaled_v = dict(params, weight_v=params["weight_v"] * 7.5)
    np.testing.assert_allclose(apply({"params": scaled_v}, x), out, rtol=1e-5, atol=1e-6)
    g_scale = np.linspace(0.5, 3.0, 12, dtype=np.float32)
    scaled_g = dict(params, weight_g=params["weight_g"] * g_scale)
    np.testing.assert_allclose(apply({"params": scaled_g}, x), out * g_scale, rtol=1e-5, atol=1e-6)


# --- init -------------------------------------------------------------------------------------------------


def test_encoder_block_init_is_xavier_with_zero_bias():
    params = flat(run(Block(768, 12).init, jax.random.key(0), jnp.zeros((1, 2, 768)))["params"])
    kernels = {k: v for k, v in params.items() if k.endswith("kernel")}
    assert sorted(kernels) == ["attn/proj/kernel", "attn/qkv/kernel", "mlp/fc1/kernel", "mlp/fc2/kernel"]
    for name, w in kernels.items():
        fan_in, fan_out = w.shape
        assert np.abs(w).max() <= math.sqrt(6 / (fan_in + fan_out)), name
    qkv = kernels["attn/qkv/kernel"]
    assert qkv.shape == (768, 2304)
    assert qkv.var() == pytest.approx(2 / (768 + 2304), rel=0.01)
    assert abs(qkv.mean()) < 1e-4
    for name, v in params.items():
        if name.endswith("bias"):
            assert not v.any(), name
        elif name.endswith("scale"):
            np.testing.assert_array_equal(v, 1.0, err_msg=name)


def test_patch_conv_and_cls_token_init():
    tok = Tokenizer(dim=768, patch=16, grid_freq=5, grid_time=1)
    params = run(tok.init, jax.random.key(0), jnp.zeros((1, 80, 16)))["params"]
    kernel = np.asarray(params["proj"]["kernel"])
    assert kernel.shape == (16, 16, 1, 768)
    view = kernel.reshape(256, 768).T  # PyTorch's [D, p·p] view
    bound = math.sqrt(6 / (256 + 768))
    assert np.abs(view).max() <= bound
    assert view.var() == pytest.approx(bound**2 / 3, rel=0.02)
    assert np.abs(np.asarray(params["proj"]["bias"])).max() <= 1 / 16  # PyTorch conv default bias init
    cls = np.asarray(params["cls_token"])
    assert cls.shape == (1, 1, 768)
    assert cls.std() == pytest.approx(0.02, rel=0.15)


def test_teacher_encoder_is_initialised_independently(smoke):
    _, student, teacher = smoke
    s, t = flat(student["encoder"]), flat(teacher["encoder"])
    assert s.keys() == t.keys()
    for name in s:
        if name.endswith("kernel"):
            assert not np.allclose(s[name], t[name]), name


def _same_cls_head_leaves(student, teacher) -> list[bool]:
    s, t = flat(student["cls_head"]), flat(teacher["cls_head"])
    return [np.array_equal(s[k], t[k]) for k in s if k.endswith("kernel") or k == "weight_v"]


def test_cls_heads_start_as_the_reference_with_copy_initial(smoke):
    """Reference (default; aurianworld/matpac training_matpac/models/cls_head.py ``Cls_Head._init_weights``,
    models/model.py ``make_cls_heads`` and ``initialize_weights``): one head is drawn with its MLP N(0, 0.02²) and
    zero biases and becomes the teacher; the student head's three MLP linears are then re-initialised xavier-uniform
    (zero biases), while the weight-normalised last layer (``weight_v``, g = 1) starts identical in both."""
    _, student, teacher = smoke
    assert load_config().model.cls_head.teacher_init == "copy_initial"
    s, t = flat(student["cls_head"]), flat(teacher["cls_head"])
    assert s.keys() == t.keys()
    np.testing.assert_array_equal(s["weight_v"], t["weight_v"])
    np.testing.assert_array_equal(s["weight_g"], 1.0)
    np.testing.assert_array_equal(t["weight_g"], 1.0)
    kernels = sorted(k for k in s if k.startswith("mlp_") and k.endswith("kernel"))
    assert len(kernels) == 3
    for name in kernels:
        ks, kt = np.asarray(s[name], np.float64), np.asarray(t[name], np.float64)
        bound = math.sqrt(6 / sum(ks.shape))  # xavier-uniform: U(-b, b), variance b² / 3
        assert np.abs(ks).max() <= bound and ks.var() == pytest.approx(bound**2 / 3, rel=0.1), name
        assert kt.std() == pytest.approx(0.02, rel=0.1), name  # the teacher keeps the first draw
        assert not np.allclose(ks, kt), name
    for name in (k for k in s if k.startswith("mlp_") and k.endswith("bias")):
        assert not np.asarray(s[name]).any() and not np.asarray(t[name]).any(), name


def test_teacher_cls_head_equal_with_copy():
    config = load_config()
    config.model.cls_head.teacher_init = "copy"
    student, teacher = run(MatpacModel.from_config(config).init, jax.random.key(0))
    assert all(_same_cls_head_leaves(student, teacher))


# --- the MATPAC forward pass ------------------------------------------------------------------------------


def test_masking_counts():
    assert num_visible(190, 0.7) == 57  # the paper recipe: 57 visible, 133 masked


def test_forward_shapes_and_targets(smoke):
    model, student, teacher = smoke
    config = load_config()
    ratio = config.objective.mask_ratio
    b, d, k = 2, config.model.encoder.dim, config.model.mcl_heads
    n = model.num_patches
    n_vis = int(n * (1 - ratio))
    assert (n, n_vis) == (40, 12)  # 5 × 8 grid of the 1.28 s smoke crops
    mel = np.random.default_rng(0).standard_normal((b, config.audio.n_mels, config.audio.crop_frames))
    mel = mel.astype(np.float32)
    forward = lambda s, t, mel, rng: model.forward(s, t, mel, rng, ratio)
    out = run(forward, student, teacher, mel, jax.random.key(1))
    assert out["preds"].shape == (k, b, n - n_vis, d)
    assert out["targets"].shape == (b, n - n_vis, d)
    ids_mask = np.asarray(out["ids_mask"])
    assert ids_mask.shape == (b, n - n_vis)
    ids_keep = np.stack([np.setdiff1d(np.arange(n), row) for row in ids_mask])
    assert ids_keep.shape == (b, n_vis)

    s, t = ref.to_numpy(student), ref.to_numpy(teacher)
    heads = config.model.encoder.heads
    tokens, cls = ref.tokenize(
        mel.astype(np.float64), s["tokenizer"], model.tokenizer.grid_freq, model.tokenizer.grid_time
    )
    targets = ref.transformer(ref.prepend_cls(cls, ref.gather(tokens, ids_mask)), t["encoder"], heads)[:, 1:]
    assert rel_err(out["targets"], targets) < 1e-5
    latents = ref.transformer(ref.prepend_cls(cls, ref.gather(tokens, ids_keep)), s["encoder"], heads)
    preds = ref.predictor(
        latents,
        ids_keep,
        ids_mask,
        s["predictor"],
        config.model.predictor.heads,
        model.tokenizer.grid_freq,
        model.tokenizer.grid_time,
    )
    assert rel_err(out["preds"], preds) < 1e-5


def test_no_gradient_through_targets(smoke):
    model, student, teacher = smoke
    config = load_config()
    shape = (2, config.audio.n_mels, config.audio.crop_frames)
    mel = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    ratio = config.objective.mask_ratio

    def target_sum(student):
        return model.forward(student, teacher, mel, jax.random.key(1), ratio)["targets"].sum()

    grads = run(jax.grad(target_sum), student)
    for name, g in flat(grads).items():
        assert not np.asarray(g).any(), name


# --- attention implementation -------------------------------------------------------------------------------------


def test_auto_attention_is_cudnn_only_where_cudnn_runs_the_shapes(monkeypatch):
    """'auto' (the configs' default) picks cuDNN's fused attention on an NVIDIA GPU for 16-bit compute and head sizes
    cuDNN takes (multiples of 8 up to 128: the recipe's 64 and 32), XLA's otherwise; 'xla' / 'cudnn' force one."""
    from matpac_jax.models import vit

    assert vit.resolve_attn_impl("auto", jnp.bfloat16, 64) == ("cudnn" if vit.cudnn_attention_available() else "xla")
    monkeypatch.setattr(vit, "cudnn_attention_available", lambda: True)
    assert vit.resolve_attn_impl("auto", jnp.bfloat16, 64) == "cudnn"
    assert vit.resolve_attn_impl("auto", jnp.float16, 32) == "cudnn"
    for dtype, head in ((jnp.float32, 64), (jnp.bfloat16, 12), (jnp.bfloat16, 256)):
        assert vit.resolve_attn_impl("auto", dtype, head) == "xla", (dtype, head)
    monkeypatch.setattr(vit, "cudnn_attention_available", lambda: False)
    assert vit.resolve_attn_impl("auto", jnp.bfloat16, 64) == "xla"
    assert vit.resolve_attn_impl("cudnn", jnp.float32, 64) == "cudnn"
    assert vit.resolve_attn_impl("xla", jnp.bfloat16, 64) == "xla"
    assert vit.resolve_attn_impl("", jnp.bfloat16, 64) is None
    with pytest.raises(ValueError, match="attn_impl='flash'"):
        vit.resolve_attn_impl("flash", jnp.bfloat16, 64)


def test_every_attention_choice_that_runs_here_computes_the_same_blocks():
    """On a CPU 'auto' is XLA's attention: the same outputs as 'xla' and jax's default ('') bit for bit, and equal to
    the float64 reference (cuDNN itself needs a GPU: the accelerator script times it, BENCHMARKS.md)."""
    x = np.random.default_rng(0).standard_normal((2, 7, 32)).astype(np.float32)
    outs = {}
    for impl in ("auto", "xla", ""):
        model = Transformer(dim=32, depth=2, heads=4, attn_impl=impl)
        params = perturb(run(model.init, jax.random.key(0), x)["params"], seed=1)
        outs[impl] = np.asarray(jax.jit(lambda p, x, m=model: m.apply({"params": p}, x))(params, x))
    np.testing.assert_array_equal(outs["auto"], outs["xla"])
    np.testing.assert_array_equal(outs["auto"], outs[""])
    exp = ref.transformer(x.astype(np.float64), ref.to_numpy(params), heads=4)
    assert rel_err(outs["auto"], exp) < 1e-5


def test_an_unknown_attention_implementation_fails_before_compute():
    from matpac_jax.config_lib import ConfigError
    from matpac_jax.tasks import check_config

    config = load_config()
    config.model.attn_impl = "flash"
    with pytest.raises(ConfigError, match=r"config\.model\.attn_impl='flash'.*'auto'"):
        check_config(config)
