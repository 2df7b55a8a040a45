"""S-SONDO students: MobileNetV3 "mn" backbones and the projection head; parameter counts against published and
hand-computed figures, shapes, BatchNorm statistics in training mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matpac_jax.distill.students import (
    ERes2Net,
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


def _eres2net_count(channels=32, blocks=(1, 1, 2, 1), scale=2, expansion=2) -> int:
    """Parameter count of ERes2Net by hand: conv k×k (no bias) = k²·cin·cout, BatchNorm = 2c, AFF(c) = 1×1 convs
    2c -> r -> c with biases (r = max(c // 4, 8)) and two BatchNorms."""

    def aff(c):
        r = max(c // 4, 8)
        return 2 * c * r + r + 2 * r + r * c + c + 2 * c

    total = 9 * channels + 2 * channels  # stem
    cin, fused = channels, None
    for i, n in enumerate(blocks):
        planes = channels * 2**i
        for b in range(n):
            stride = 2 if i > 0 and b == 0 else 1
            w, out = planes // 2, planes * expansion
            total += cin * w * scale + 2 * w * scale  # conv1 + bn1
            total += scale * (9 * w * w + 2 * w) + (scale - 1) * aff(w)  # 3x3 convs + local fusions
            total += w * scale * out + 2 * out  # conv3 + bn3
            if stride != 1 or cin != out:
                total += cin * out + 2 * out
            cin = out
        if fused is not None:
            total += fused * cin + 2 * cin + aff(cin)  # 1x1 stride-2 downsampling + global fusion
        fused = cin
    return total


def test_eres2net_parameter_count_and_tstp_embedding():
    model = ERes2Net()
    variables = jax.eval_shape(lambda: _init(model, jnp.zeros((1, 128, 100))))
    n = count_params(variables["params"])
    assert n == _eres2net_count() == 1_429_248  # SPEC §6: "ERes2Net 1.4M"
    assert count_params(jax.eval_shape(lambda: _init(ERes2Net(16, (2, 2, 2, 2)), jnp.zeros((1, 64, 32))))["params"]) \
        == _eres2net_count(16, (2, 2, 2, 2))  # fmt: skip
    small = ERes2Net(8, (1, 1, 1, 1))
    v = jax.jit(lambda: _init(small, jnp.zeros((1, 128, 40))))()
    x = jax.random.normal(jax.random.key(3), (2, 128, 40))
    y = jax.jit(small.apply)(v, x)
    assert y.shape == (2, 2 * 8 * 8 * 2)  # mean and std over time of 8·8·2 channels
    assert np.all(np.asarray(y[:, 128:]) > 0)  # the std half
    assert jax.eval_shape(small.apply, v, x[:, :, :24]).shape == (2, 256)  # any clip length
    _, updates = jax.jit(lambda v, x: small.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), v["batch_stats"], updates["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 0  # every BatchNorm sees the batch


def test_make_student_distiller_embed_is_the_backbone_output():
    import ml_collections as mlc

    cfg = mlc.ConfigDict(dict(arch="eres2net", channels=8, blocks=(1, 1, 1, 1), head_hidden=64, dropout=0.2))
    model = make_student(cfg, out_dim=48)
    v = _init(model, jnp.zeros((1, 128, 40)))
    assert set(v["params"]) == {"backbone", "head"}
    x = jax.random.normal(jax.random.key(4), (2, 128, 40))
    emb, proj = model.apply(v, x)
    assert emb.shape == (2, 256) and proj.shape == (2, 48)
    np.testing.assert_array_equal(model.apply(v, x, method=model.embed), emb)
    cfg.arch = "resnet"
    with pytest.raises(ValueError, match="config.student.arch='resnet'"):
        make_student(cfg)
