"""Independent float64 NumPy DyMN forward and random state dicts in EfficientAT's key layout.

Written from EfficientAT's published code (fschmid56/EfficientAT @ a425fdc: models/dymn/model.py,
models/dymn/dy_block.py, models/dymn/utils.py), not from matpac_jax: it reads the PyTorch state dict as it is (NCHW
activations, torch weight layouts), so a test comparing it with ``matpac_jax.models.dymn`` checks the key mapping
as well as the forward.
"""

from __future__ import annotations

import numpy as np

BN_EPS = 1e-3  # model.py:74 and dy_block.py:284, BatchNorm2d(eps=0.001)
K, M = 4, 2  # dyconv_k, dyrelu_k defaults (model.py get_model)

# model.py:_dymn_conf (lines 234-250): input, kernel, expanded, out, activation, stride (strides (2, 2, 2, 2))
CONF = [(16, 3, 16, 16, "RE", 1), (16, 3, 64, 24, "RE", 2), (24, 3, 72, 24, "RE", 1), (24, 5, 72, 40, "RE", 2),
        (40, 5, 120, 40, "RE", 1), (40, 5, 120, 40, "RE", 1), (40, 3, 240, 80, "HS", 2), (80, 3, 200, 80, "HS", 1),
        (80, 3, 184, 80, "HS", 1), (80, 3, 184, 80, "HS", 1), (80, 3, 480, 112, "HS", 1),
        (112, 3, 672, 112, "HS", 1), (112, 5, 672, 160, "HS", 2), (160, 5, 960, 160, "HS", 1),
        (160, 5, 960, 160, "HS", 1)]  # fmt: skip


def make_divisible(v: float, divisor: int = 8) -> int:  # utils.py:5-18
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def config(width: float) -> list[tuple]:
    """(in, kernel, exp, out, act, stride, context) per block: DynamicInvertedResidualConfig.adjust_channels and
    DY_Block.context_dim (dy_block.py:278-281)."""
    out = []
    for c, k, e, o, act, s in CONF:
        c, e, o = (make_divisible(v * width) for v in (c, e, o))
        ctx = int(np.clip(make_divisible(e // 4), make_divisible(32 * width), make_divisible(128 * width)))
        out.append((c, k, e, o, act, s, ctx))
    return out


# --- a random state dict with the published names and shapes ----------------------------------------------------


def random_state_dict(width: float, seed: int = 0, num_classes: int = 1000) -> dict[str, np.ndarray]:
    """Every key ``DyMN(...).state_dict()`` has (classifier and ``num_batches_tracked`` included), random values of
    a scale that keeps activations O(1) through the 15 blocks."""
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def conv(name, o, i, k, bias=False):
        sd[f"{name}.weight"] = rng.normal(0, np.sqrt(2.0 / (i * k * k)), (o, i, k, k))
        if bias:
            sd[f"{name}.bias"] = rng.normal(0, 0.2, o)

    def linear(name, o, i, scale=2.0):
        sd[f"{name}.weight"] = rng.normal(0, scale / np.sqrt(i), (o, i))
        sd[f"{name}.bias"] = rng.normal(0, 0.2, o)

    def bn(name, c):
        sd[f"{name}.weight"] = 1.0 + 0.2 * rng.normal(size=c)
        sd[f"{name}.bias"] = 0.2 * rng.normal(size=c)
        sd[f"{name}.running_mean"] = 0.1 * rng.normal(size=c)
        sd[f"{name}.running_var"] = 0.5 + rng.random(c)
        sd[f"{name}.num_batches_tracked"] = np.array(1000)

    def dynconv(name, o, i_per_group, k, ctx):  # dy_block.py:76-94: weight [1, att_groups=1, K, o·i·k·k]
        sd[f"{name}.weight"] = rng.normal(0, np.sqrt(2.0 / (i_per_group * k * k)), (1, 1, K, o * i_per_group * k * k))
        linear(f"{name}.residuals.0", K, ctx)

    stem = make_divisible(16 * width)
    conv("in_c.0", stem, 1, 3)
    bn("in_c.1", stem)
    for n, (c, k, e, o, _, _, ctx) in enumerate(config(width)):
        p = f"layers.{n}"
        conv(f"{p}.context_gen.joint_conv", ctx, c, 1)  # dy_block.py:219-225
        bn(f"{p}.context_gen.joint_norm", ctx)
        conv(f"{p}.context_gen.conv_f", e, ctx, 1, bias=True)
        conv(f"{p}.context_gen.conv_t", e, ctx, 1, bias=True)
        if e != c:  # dy_block.py:287: no expansion conv when expanded == input channels
            dynconv(f"{p}.exp_conv", e, c, 1, ctx)
            bn(f"{p}.exp_norm", e)
        dynconv(f"{p}.depth_conv", e, 1, k, ctx)
        bn(f"{p}.depth_norm", e)
        linear(f"{p}.depth_act.coef_net.0", 2 * M * e, ctx)  # dy_block.py:170
        sd[f"{p}.depth_act.lambdas"] = np.array([1.0] * M + [0.5] * M)  # dy_block.py:154-155 (buffers)
        sd[f"{p}.depth_act.init_v"] = np.array([1.0] + [0.0] * (2 * M - 1))
        dynconv(f"{p}.proj_conv", o, e, 1, ctx)
        bn(f"{p}.proj_norm", o)
    last_in = config(width)[-1][3]
    conv("out_c.0", 6 * last_in, last_in, 1)  # model.py:109
    bn("out_c.1", 6 * last_in)
    linear("classifier.2", make_divisible(1280 * width), 6 * last_in)
    linear("classifier.5", num_classes, make_divisible(1280 * width))
    return sd


# --- forward ----------------------------------------------------------------------------------------------------


def hardswish(x):
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def batch_norm(x, sd, name):
    shape = (1, -1, 1, 1)
    scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + BN_EPS)
    return (x - sd[f"{name}.running_mean"].reshape(shape)) * scale.reshape(shape) + sd[f"{name}.bias"].reshape(shape)


def conv2d(x, w, stride=1, depthwise=False, bias=None):
    """x [B, C, F, T], w [O, C or 1, k, k], zero padding (k−1)/2 (ConvNormActivation, dy_block.py:332)."""
    k = w.shape[-1]
    p = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    fo = (x.shape[2] + 2 * p - k) // stride + 1
    to = (x.shape[3] + 2 * p - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], fo, to))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i : i + stride * fo : stride, j : j + stride * to : stride]
            if depthwise:
                out += patch * w[None, :, 0, i, j, None, None]
            else:
                out += np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
    return out if bias is None else out + bias[None, :, None, None]


def dynamic_conv(x, sd, name, h, out_ch, k, stride, depthwise, temperature):
    """DynamicConv.forward (dy_block.py:103-131): per example, softmax(Linear(h) / τ) mixes the K kernels."""
    logits = h @ sd[f"{name}.residuals.0.weight"].T + sd[f"{name}.residuals.0.bias"]
    att = np.exp(logits / temperature - np.max(logits / temperature, axis=1, keepdims=True))
    att /= att.sum(axis=1, keepdims=True)
    cin = 1 if depthwise else x.shape[1]
    kernels = sd[f"{name}.weight"].reshape(K, out_ch, cin, k, k)
    return np.concatenate([conv2d(x[b : b + 1], np.einsum("k,koihw->oihw", att[b], kernels), stride, depthwise)
                           for b in range(x.shape[0])])  # fmt: skip


def avg_pool3(x, axis, stride):
    """nn.AvgPool2d with window 3 on ``axis``, padding 1, count_include_pad=True (dy_block.py:229-230)."""
    pad = [(0, 0)] * 4
    pad[axis] = (1, 1)
    xp = np.pad(x, pad)
    n = (x.shape[axis] - 1) // stride + 1
    take = [np.take(xp, np.arange(n) * stride + d, axis=axis) for d in range(3)]
    return sum(take) / 3.0


def dy_block(x, sd, n, cfg, temperature):
    c, k, e, o, act, s, ctx = cfg
    p = f"layers.{n}"
    # ContextGen.forward (dy_block.py:235-254)
    cf = x.mean(axis=3, keepdims=True)  # [B, C, F, 1]
    ct = x.mean(axis=2, keepdims=True).transpose(0, 1, 3, 2)  # [B, C, T, 1]
    f = cf.shape[2]
    g = np.concatenate([cf, ct], axis=2)
    g = hardswish(batch_norm(conv2d(g, sd[f"{p}.context_gen.joint_conv.weight"]), sd, f"{p}.context_gen.joint_norm"))
    h_cf, h_ct = g[:, :, :f], g[:, :, f:].transpose(0, 1, 3, 2)
    h = g.mean(axis=(2, 3))  # [B, ctx]
    if s > 1:
        h_cf, h_ct = avg_pool3(h_cf, 2, s), avg_pool3(h_ct, 3, s)
    g_cf = conv2d(h_cf, sd[f"{p}.context_gen.conv_f.weight"], bias=sd[f"{p}.context_gen.conv_f.bias"])
    g_ct = conv2d(h_ct, sd[f"{p}.context_gen.conv_t.weight"], bias=sd[f"{p}.context_gen.conv_t.bias"])
    # DY_Block.forward (dy_block.py:390-409)
    y = x
    if e != c:
        y = batch_norm(dynamic_conv(y, sd, f"{p}.exp_conv", h, e, 1, 1, False, temperature), sd, f"{p}.exp_norm")
        y = hardswish(y) if act == "HS" else np.maximum(y, 0.0)
    y = batch_norm(dynamic_conv(y, sd, f"{p}.depth_conv", h, e, k, s, True, temperature), sd, f"{p}.depth_norm")
    # DyReLUB.forward (dy_block.py:172-188)
    theta = 2.0 * sigmoid(h @ sd[f"{p}.depth_act.coef_net.0.weight"].T + sd[f"{p}.depth_act.coef_net.0.bias"]) - 1.0
    coefs = theta.reshape(-1, e, 1, 1, 2 * M) * sd[f"{p}.depth_act.lambdas"] + sd[f"{p}.depth_act.init_v"]
    y = np.max(y[..., None] * coefs[..., :M] + coefs[..., M:], axis=-1)
    y = y * sigmoid(g_cf) * sigmoid(g_ct)  # CoordAtt (dy_block.py:195-201)
    y = batch_norm(dynamic_conv(y, sd, f"{p}.proj_conv", h, o, 1, 1, False, temperature), sd, f"{p}.proj_norm")
    return x + y if s == 1 and c == o else y


def dymn_embed(x: np.ndarray, sd: dict, width: float, temperature: float) -> np.ndarray:
    """x [B, 1, F, T] -> the pooled features before the classifier, [B, 6 × last channels] (model.py:157-183)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(x, np.float64)
    x = hardswish(batch_norm(conv2d(x, sd["in_c.0.weight"], stride=2), sd, "in_c.1"))
    for n, cfg in enumerate(config(width)):
        x = dy_block(x, sd, n, cfg, temperature)
    x = hardswish(batch_norm(conv2d(x, sd["out_c.0.weight"]), sd, "out_c.1"))
    return x.mean(axis=(2, 3))
