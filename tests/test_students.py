"""S-SONDO students: MobileNetV3 "mn" backbones and the projection head; parameter counts against published and
hand-computed figures, shapes, BatchNorm statistics in training mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matpac_jax.models.students import (
    MobileNetV3,
    ProjectionHead,
    count_params,
    make_divisible,
    make_student,
)


def _init(model, x):
    return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)


def test_mn10_backbone_is_mobilenet_v3_large_features_on_one_channel():
    variables = jax.eval_shape(lambda: _init(MobileNetV3(1.0), jnp.zeros((1, 128, 200))))
    # torchvision mobilenet_v3_large: 5,483,032 parameters, of which the classifier holds 960*1280 + 1280 +
    # 1280*1000 + 1000 = 2,511,080; the features take 3-channel images: one input channel has 2 x 16*3*3 fewer weights
    assert count_params(variables["params"]) == 5_483_032 - 2_511_080 - 2 * 16 * 3 * 3 == 2_971_664
    assert {"mean", "var"} <= {k for v in jax.tree_util.tree_leaves_with_path(variables["batch_stats"]) for k in
                               [str(v[0][-1].key)]}  # fmt: skip


def test_width_scales_channels_and_output_is_six_times_the_last_block():
    for width, out in ((1.0, 960), (0.5, 480), (2.0, 1920)):
        model = MobileNetV3(width)
        x = jax.ShapeDtypeStruct((2, 128, 64), jnp.float32)
        y = jax.eval_shape(
            lambda v, x, m=model: m.apply(v, x), jax.eval_shape(lambda m=model: _init(m, jnp.zeros((1, 128, 64)))), x
        )
        assert y.shape == (2, out) == (2, 6 * make_divisible(160 * width))


def test_batchnorm_statistics_move_only_in_training():
    model = MobileNetV3(0.4)
    v = jax.jit(lambda: _init(model, jnp.zeros((1, 128, 32))))()
    x = jax.random.normal(jax.random.key(2), (4, 128, 32))
    y_train, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert y_train.shape == (4, 6 * make_divisible(160 * 0.4))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), v["batch_stats"], updates["batch_stats"])
    assert max(jax.tree.leaves(moved)) > 0


def test_projection_head():
    head = ProjectionHead()
    v = _init(head, jnp.zeros((1, 960)))
    assert count_params(v["params"]) == 960 * 1280 + 1280 + 1280 * 3840 + 3840
    x = jnp.ones((3, 960))
    a = head.apply(v, x)
    b = head.apply(v, x, train=True, rngs={"dropout": jax.random.key(5)})
    assert a.shape == (3, 3840) and not np.allclose(a, b)  # dropout only when training
    np.testing.assert_array_equal(a, head.apply(v, x))


def test_projection_head_is_initialised_as_torch_linear():
    """torch's nn.Linear.reset_parameters: weight kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)), bias
    U(±1/sqrt(fan_in)); by hand: fan_in 960 -> bound 0.03227486, variance bound²/3 = 1/(3·960) = 3.4722e-4; fan_in
    1280 -> bound 0.02795085, variance 2.6042e-4 (S-SONDO's MLPClassifer, model_utils.py:183-188)."""
    params = _init(ProjectionHead(), jnp.zeros((1, 960)))["params"]
    for layer, fan_in, bound in (("fc1", 960, 0.03227486), ("fc2", 1280, 0.02795085)):
        for name in ("kernel", "bias"):
            w = np.asarray(params[layer][name], np.float64)
            assert np.max(np.abs(w)) <= bound * (1 + 1e-6)  # inside U(±bound), up to float32 rounding
            assert np.max(np.abs(w)) > 0.99 * bound  # and filling it (1.2 M / 1280+ draws)
            n = w.size
            var = 1.0 / (3.0 * fan_in)
            # the sample variance of n uniform draws has standard deviation var·sqrt(4/5 / n): 5 of them
            assert abs(np.mean(w**2) - var) < 5 * var * np.sqrt(0.8 / n), (layer, name)
            assert abs(np.mean(w)) < 5 * np.sqrt(var / n), (layer, name)
    assert np.any(np.asarray(params["fc1"]["bias"]) != 0)  # not Flax's zero bias


def test_make_student_distiller_embed_is_the_backbone_output():
    import ml_collections as mlc

    cfg = mlc.ConfigDict(dict(arch="eres2net", channels=4, blocks=(1, 1, 1, 1, 1), head_hidden=16, dropout=0.2))
    model = make_student(cfg, out_dim=48)
    v = _init(model, jnp.zeros((1, 32, 20)))
    assert set(v["params"]) == {"backbone", "head"}
    x = jax.random.normal(jax.random.key(4), (2, 32, 20))
    emb, proj = jax.jit(model.apply)(v, x)
    assert emb.shape == (2, 2 * 4 * 4 * 32 // 16) and proj.shape == (2, 48)  # ERes2Net's TSTP: 2 x 16 x 2
    np.testing.assert_allclose(jax.jit(lambda v, x: model.apply(v, x, method=model.embed))(v, x), emb, rtol=1e-6,
                               atol=1e-6 * float(np.abs(emb).max()))  # fmt: skip
    cfg.arch = "resnet"
    with pytest.raises(ValueError, match="config.student.arch='resnet'"):
        make_student(cfg)


def test_squeeze_excitation_gate_is_a_plain_sigmoid():
    """EfficientAT models/mn/block_types.py:61 (a425fdc): ``scale_activation = torch.nn.Sigmoid`` (torchvision's
    MobileNetV3 has a hard-sigmoid); :73-79 the gate is computed from the mean over frequency and time."""
    from matpac_jax.models.students import SqueezeExcite

    x = jax.random.normal(jax.random.key(7), (2, 3, 5, 16))
    se = SqueezeExcite(8)
    v = se.init(jax.random.key(8), x)
    p = jax.tree.map(np.asarray, v["params"])
    s = np.maximum(np.asarray(x).mean(axis=(1, 2)) @ p["fc1"]["kernel"][0, 0] + p["fc1"]["bias"], 0)
    z = s @ p["fc2"]["kernel"][0, 0] + p["fc2"]["bias"]
    want = np.asarray(x) / (1 + np.exp(-z))[:, None, None]
    np.testing.assert_allclose(se.apply(v, x), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.abs(np.clip(z + 3, 0, 6) / 6 - 1 / (1 + np.exp(-z))).max() > 1e-3  # the two gates differ here
