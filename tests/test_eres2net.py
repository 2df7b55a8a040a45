"""S-SONDO's ERes2Net student (matpac_jax.models.eres2net) against S-SONDO's published definition.

Checked against MedAliAdlouni/ssondo, inference_ssondo/ssondo/models/ERes2Net/model.py (the same network as
training_ssondo/utils/student_models/ERes2Net/model.py):
  - AFF: model.py:11-30 (1×1 convs with bias, inner width channels // 4, BN, SiLU; x·(1 + tanh) + y·(1 − tanh));
  - Hardtanh(0, 20) as the blocks' ReLU: model.py:33-35; the stem's plain ReLU: model.py:299;
  - Res2Net blocks, width floor(planes × 32/64), scale 2, expansion 2, addition (stages 1-2) or AFF (stages 3-5)
    between the splits, 1×1 conv + BN shortcut where the shape changes: model.py:56-119 and 122-191;
  - stages, downsampling convs (3×3 stride 2, no bias, no BN), bottom-up fusion, fifth stage: model.py:194-272,
    283-340 (``add_layer``);
  - TSTP: pooling_layers.py:40-58 (mean, sqrt(unbiased var + 1e-8) over the last, time, axis; flattened C × F);
  - S-SONDO's arguments: training_ssondo/knowledge_distillation_training/config.py:336-340 (m_channels 16,
    feat_dim 128, num_blocks [3, 4, 6, 3, 3], TSTP, add_layer True);
  - the release's keys: inference_ssondo/ssondo/model.py:474-478 (the checkpoint's ``state_dict`` under
    ``student_model.``, the ModelWrapper holding the backbone as ``model`` and the head as ``classification_head``).
The state dicts below are built from those definitions (names, shapes), and the reference forward is float64 NumPy
on them in PyTorch's NCHW layout, independent of the Flax code.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matpac_jax.distill.published import StateDictMismatch
from matpac_jax.models.eres2net import AFF, ERes2Net, from_torch_state_dict
from matpac_jax.models.students import count_params

PLANES, STRIDES, FUSES = (1, 2, 4, 8, 2), (1, 2, 2, 2, 2), (False, False, True, True, True)


# --- the published layout ----------------------------------------------------------------------------------------


def published_state_dict(rng: np.random.Generator, m: int, blocks) -> dict[str, np.ndarray]:
    """Random weights under the keys and shapes of ssondo's ERes2Net(m_channels=m, num_blocks=blocks,
    add_layer=len(blocks) == 5), BatchNorm running statistics and counters included."""
    sd = {}

    def conv(name, cout, cin, k, bias=False):
        sd[f"{name}.weight"] = rng.normal(0.0, 1.0 / math.sqrt(cin * k * k), (cout, cin, k, k))
        if bias:
            sd[f"{name}.bias"] = rng.normal(0.0, 0.1, cout)

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
        sd[f"{name}.bias"] = rng.normal(0.0, 0.1, c)
        sd[f"{name}.running_mean"] = rng.normal(0.0, 0.1, c)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c)
        sd[f"{name}.num_batches_tracked"] = np.array(7)

    def aff(name, c):
        conv(f"{name}.local_att.0", c // 4, 2 * c, 1, bias=True)
        bn(f"{name}.local_att.1", c // 4)
        conv(f"{name}.local_att.3", c, c // 4, 1, bias=True)
        bn(f"{name}.local_att.4", c)

    conv("conv1", m, 1, 3)
    bn("bn1", m)
    cin = m
    for s, n in enumerate(blocks):
        planes = m * PLANES[s]
        width = planes * 32 // 64
        for b in range(n):
            p, stride = f"layer{s + 1}.{b}", STRIDES[s] if b == 0 else 1
            conv(f"{p}.conv1", 2 * width, cin, 1)
            bn(f"{p}.bn1", 2 * width)
            for i in range(2):
                conv(f"{p}.convs.{i}", width, width, 3)
                bn(f"{p}.bns.{i}", width)
            if FUSES[s]:
                aff(f"{p}.fuse_models.0", width)
            conv(f"{p}.conv3", 2 * planes, 2 * width, 1)
            bn(f"{p}.bn3", 2 * planes)
            if stride != 1 or cin != 2 * planes:
                conv(f"{p}.shortcut.0", 2 * planes, cin, 1)
                bn(f"{p}.shortcut.1", 2 * planes)
            cin = 2 * planes
    fused = (2 * m, 4 * m, 8 * m, 16 * m, 4 * m)
    for s in range(1, len(blocks)):
        conv(f"layer{s}_downsample", fused[s], fused[s - 1], 3)
        aff("fuse_mode" + "".join(str(k) for k in range(1, s + 2)), fused[s])
    return sd


# --- float64 NumPy forward of the published definition ------------------------------------------------------------


def conv2d(x, w, stride=1, b=None):
    """PyTorch Conv2d, padding k // 2: x [B, C, H, W], w [O, C, k, k]."""
    k = w.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    h = (x.shape[2] + 2 * p - k) // stride + 1
    wd = (x.shape[3] + 2 * p - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], h, wd))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i : i + stride * (h - 1) + 1 : stride, j : j + stride * (wd - 1) + 1 : stride]
            out += np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
    return out if b is None else out + b[None, :, None, None]


def batch_norm(x, sd, name):
    c = lambda a: sd[f"{name}.{a}"][None, :, None, None]  # noqa: E731
    return (x - c("running_mean")) / np.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")


def hardtanh(x):
    return np.clip(x, 0.0, 20.0)


def aff_ref(x, y, sd, name):
    a = conv2d(np.concatenate([x, y], 1), sd[f"{name}.local_att.0.weight"], b=sd[f"{name}.local_att.0.bias"])
    a = batch_norm(a, sd, f"{name}.local_att.1")
    a = a / (1.0 + np.exp(-a))  # SiLU
    a = conv2d(a, sd[f"{name}.local_att.3.weight"], b=sd[f"{name}.local_att.3.bias"])
    att = 1.0 + np.tanh(batch_norm(a, sd, f"{name}.local_att.4"))
    return x * att + y * (2.0 - att)


def block_ref(x, sd, p, stride, fuse):
    out = hardtanh(batch_norm(conv2d(x, sd[f"{p}.conv1.weight"], stride), sd, f"{p}.bn1"))
    width = out.shape[1] // 2
    spx, outs = [out[:, :width], out[:, width:]], []
    for i in range(2):
        if i == 0:
            sp = spx[0]
        else:
            sp = aff_ref(sp, spx[i], sd, f"{p}.fuse_models.0") if fuse else sp + spx[i]
        sp = hardtanh(batch_norm(conv2d(sp, sd[f"{p}.convs.{i}.weight"]), sd, f"{p}.bns.{i}"))
        outs.append(sp)
    out = batch_norm(conv2d(np.concatenate(outs, 1), sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
    if f"{p}.shortcut.0.weight" in sd:
        x = batch_norm(conv2d(x, sd[f"{p}.shortcut.0.weight"], stride), sd, f"{p}.shortcut.1")
    return hardtanh(out + x)


def eres2net_ref(sd, mel, blocks):
    """mel [B, F, T] (float64) -> [B, 2·C·F'] as ssondo's ERes2Net.forward on [B, 1, F, T], one segment."""
    x = mel[:, None]
    x = np.maximum(batch_norm(conv2d(x, sd["conv1.weight"]), sd, "bn1"), 0.0)
    fused = None
    for s, n in enumerate(blocks):
        for b in range(n):
            x = block_ref(x, sd, f"layer{s + 1}.{b}", STRIDES[s] if b == 0 else 1, FUSES[s])
        if fused is None:
            fused = x
        else:
            down = conv2d(fused, sd[f"layer{s}_downsample.weight"], 2)
            fused = aff_ref(x, down, sd, "fuse_mode" + "".join(str(k) for k in range(1, s + 2)))
    mean = fused.mean(-1).reshape(len(mel), -1)
    std = np.sqrt(fused.var(-1, ddof=1) + 1e-8).reshape(len(mel), -1)
    return np.concatenate([mean, std], 1)


# --- tests -------------------------------------------------------------------------------------------------------


def _shapes(channels, blocks, mel_shape=(1, 128, 64)):
    """(parameter count, output shape) of ``ERes2Net(channels, blocks)`` on a mel of ``mel_shape``, nothing compiled."""
    model = ERes2Net(channels, blocks)
    out, v = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros(mel_shape)))
    return count_params(v["params"]), out.shape


def test_parameter_count_is_the_published_one():
    """SPEC §6: 1,368,068 parameters (PyTorch's count of ssondo's ERes2Net with the published arguments, checked
    once against torch 2.13) and exactly the published state dict's weights (running statistics aside); a
    1024-d embedding of a 128-mel clip of any length."""
    count = _shapes(16, (3, 4, 6, 3, 3), (2, 128, 17))  # the shortest clip: 17 frames, 2 after the network
    assert count == (1_368_068, (2, 1024))  # 2 statistics x 64 channels x 8 mel rows
    for m, blocks, n in ((16, (3, 4, 6, 3, 3), count[0]), (8, (1, 2, 1, 1, 2), None), (8, (2, 1, 1, 1), None)):
        sd = published_state_dict(np.random.default_rng(0), m, blocks)
        weights = sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "tracked")))
        assert (n or _shapes(m, blocks)[0]) == weights, (m, blocks)


def test_published_weights_give_the_published_forward():
    """A random published-layout state dict (bare keys) -> our model equals the float64 reference within 1e-5
    (relative to the embedding's scale), on 2 clips x 64 mels x 40 frames: S-SONDO's 16 channels and five stages, two
    blocks in the first and last stage (identity shortcuts with addition and with AFF), one elsewhere, for a short
    compilation (the published depths 3-4-6-3-3 repeat the same blocks)."""
    blocks = (2, 1, 1, 1, 2)
    sd = published_state_dict(np.random.default_rng(1), 16, blocks)
    variables = from_torch_state_dict(sd, channels=16, blocks=blocks)
    mel = np.random.default_rng(2).normal(size=(2, 64, 40))
    want = eres2net_ref(sd, mel, blocks)
    got = np.asarray(jax.jit(ERes2Net(16, blocks).apply)(variables, jnp.asarray(mel, jnp.float32)), np.float64)
    assert got.shape == want.shape == (2, 2 * 64 * 4)
    assert np.all(got[:, 256:] > 0) and np.median(want[:, 256:]) > 0.05 * np.abs(want).max()  # the std half
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_release_prefix_and_the_four_stage_network():
    """The release's keys (``student_model.model.`` + the projection head, left out) load as the bare ones; a
    four-stage (3D-Speaker) ERes2Net goes through the same path and equals the reference too."""
    blocks = (1, 1, 1, 1)
    sd = published_state_dict(np.random.default_rng(3), 8, blocks)
    release = {f"student_model.model.{k}": v for k, v in sd.items()}
    release["student_model.classification_head.mlp.0.weight"] = np.zeros((1280, 2048))
    release["student_model.classification_head.mlp.3.bias"] = np.zeros(3840)
    a, b = from_torch_state_dict(sd, channels=8, blocks=blocks), from_torch_state_dict(release, channels=8,
                                                                                        blocks=blocks)  # fmt: skip
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    mel = np.random.default_rng(4).normal(size=(2, 32, 24))
    want = eres2net_ref(sd, mel, blocks)
    got = np.asarray(jax.jit(ERes2Net(8, blocks).apply)(a, jnp.asarray(mel, jnp.float32)), np.float64)
    assert got.shape == (2, 2 * 128 * 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_unknown_missing_and_misshaped_keys_fail_by_name():
    blocks = (1, 1, 1, 1, 1)
    sd = published_state_dict(np.random.default_rng(5), 8, blocks)
    bad = dict(sd, **{"layer5.0.extra.weight": np.zeros(3)})
    del bad["fuse_mode12345.local_att.4.running_var"]
    with pytest.raises(StateDictMismatch) as e:
        from_torch_state_dict(bad, channels=8, blocks=blocks)
    assert e.value.unknown == ["layer5.0.extra.weight"]
    assert e.value.missing == ["fuse_mode12345.local_att.4.running_var"]
    assert "layer5.0.extra.weight" in str(e.value) and "fuse_mode12345.local_att.4.running_var" in str(e.value)
    with pytest.raises(StateDictMismatch, match="optimizer.step"):  # outside the backbone and its head
        from_torch_state_dict({**{f"student_model.model.{k}": v for k, v in sd.items()}, "optimizer.step": 1},
                              channels=8, blocks=blocks)  # fmt: skip
    with pytest.raises(StateDictMismatch, match=r"missing keys \[.*'layer5\.1\.conv1\.weight'"):  # a deeper model
        from_torch_state_dict(sd, channels=8, blocks=(1, 1, 1, 1, 2))
    with pytest.raises(StateDictMismatch, match=r"conv1\.weight \(16, 1, 3, 3\) \(the model's: \(8, 1, 3, 3\)\)"):
        from_torch_state_dict(published_state_dict(np.random.default_rng(5), 16, blocks), channels=8, blocks=blocks)


def test_bad_arguments_and_inputs_are_named():
    with pytest.raises(ValueError, match="blocks=\\(3, 4, 6\\)"):
        ERes2Net(16, (3, 4, 6)).init(jax.random.key(0), jnp.zeros((1, 32, 40)))
    with pytest.raises(ValueError, match="channels=2"):
        ERes2Net(2).init(jax.random.key(0), jnp.zeros((1, 32, 40)))
    with pytest.raises(ValueError, match="a clip of 16 frames .* give at least 17 frames"):
        jax.eval_shape(lambda: ERes2Net().init(jax.random.key(0), jnp.zeros((1, 32, 16))))
    with pytest.raises(ValueError, match=r"\[batch, mels, frames\], got shape \(32, 40\)"):
        ERes2Net().init(jax.random.key(0), jnp.zeros((32, 40)))


def test_batchnorm_is_torch_default_and_trains():
    """BatchNorm momentum 0.1 in PyTorch terms (running = 0.9·running + 0.1·batch), and every BatchNorm sees the
    batch in training mode; initial weights are PyTorch's defaults (uniform within ±1/√fan-in)."""
    blocks = (1, 1, 1, 1, 1)
    sd = published_state_dict(np.random.default_rng(6), 4, blocks)
    v = from_torch_state_dict(sd, channels=4, blocks=blocks)
    model = ERes2Net(4, blocks)
    x = jax.random.normal(jax.random.key(1), (3, 32, 20))
    _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), v["batch_stats"], upd["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 0
    conv = jax.lax.conv_general_dilated(x[..., None], v["params"]["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    want = 0.9 * sd["bn1.running_mean"] + 0.1 * np.asarray(conv.mean((0, 1, 2)))  # the stem's BatchNorm
    np.testing.assert_allclose(upd["batch_stats"]["bn1"]["mean"], want, rtol=0, atol=1e-5 * np.abs(want).max())
    c = 8  # an AFF of two 8-channel maps: its first convolution has fan-in 16
    init = jax.jit(lambda k, x: AFF().init(k, x, x, False))(jax.random.key(0), jnp.zeros((1, 2, 2, c)))["params"]
    kernel, bias = np.asarray(init["local_att_0"]["kernel"]), np.asarray(init["local_att_0"]["bias"])
    bound = 1 / math.sqrt(2 * c)
    assert kernel.shape == (1, 1, 2 * c, c // 4)
    assert 0.5 * bound < np.abs(kernel).max() <= bound and 0 < np.abs(bias).max() <= bound
