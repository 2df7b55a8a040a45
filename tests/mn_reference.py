"""EfficientAT's mn backbone in float64 NumPy, written from the published definition, for the loading tests.

Published code read (fschmid56/EfficientAT at a425fdc):
- models/mn/model.py:115 BatchNorm2d(eps=0.001, momentum=0.01) everywhere; :122-133 the stem
  ConvNormActivation(1, 16·w, kernel 3, stride 2, Hardswish); :156-167 the last 1×1 ConvNormActivation to
  6 × last channels (Hardswish); :169 ``features`` = Sequential(stem, 15 blocks, last); :220 the embedding is
  ``adaptive_avg_pool2d(x, 1)``; :237-271 the block table (input, kernel, expanded, out, SE, RE/HS, stride) and
  ``adjust_channels = make_divisible(c · width, 8)``; :186-194 the 'mlp' classifier, keys ``classifier.{2,5}``.
- models/mn/block_types.py:21-24 one SqueezeExcitation per SE dimension ('c': squeeze to
  ``make_divisible(c // se_r, 8)``, se_r 4), ``conc_se_layers.0``; :45-83 fc1 (Linear), ReLU, fc2 (Linear),
  **Sigmoid** (:61) of the mean over frequency and time; :120-175 the block: expansion (only when expanded != input),
  depthwise (groups = channels, padding (k-1)//2), SE, projection (no activation), in ``block.{j}`` order; :177-181
  residual when stride 1 and input == output channels; models/mn/utils.py:8-21 make_divisible.
- torchvision ConvNormActivation: Sequential(Conv2d(bias=False, padding=(k-1)//2), BatchNorm2d, activation):
  keys ``.0.weight``, ``.1.{weight,bias,running_mean,running_var,num_batches_tracked}``.
"""

from __future__ import annotations

import numpy as np

# (input, kernel, expanded, out, use_se, activation, stride): EfficientAT models/mn/model.py _mobilenet_v3_conf
TABLE = [
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
]  # fmt: skip


def divisible(v: float, divisor: int = 8) -> int:
    """EfficientAT models/mn/utils.py:8-21 make_divisible."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def blocks(width: float):
    """Per block: (input, kernel, expanded, out, use_se, hardswish?, stride) at ``width``."""
    return [(divisible(i * width), k, divisible(e * width), divisible(o * width), se, act == "HS", s)
            for i, k, e, o, se, act, s in TABLE]  # fmt: skip


def _bn(sd: dict, prefix: str, c: int, rng) -> None:
    sd[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{prefix}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{prefix}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{prefix}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{prefix}.num_batches_tracked"] = np.asarray(1234.0, np.float32)


def _conv(sd: dict, prefix: str, cout: int, cin_per_group: int, k: int, rng) -> None:
    sd[f"{prefix}.0.weight"] = rng.normal(
        0, (2.0 / (cin_per_group * k * k)) ** 0.5, (cout, cin_per_group, k, k)
    ).astype(np.float32)
    _bn(sd, f"{prefix}.1", cout, rng)


def efficientat_state_dict(width: float, seed: int = 0, classes: int = 527) -> dict[str, np.ndarray]:
    """A random state dict of EfficientAT's ``get_model(width_mult=width)`` (head_type 'mlp'), classifier included."""
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    cfg = blocks(width)
    _conv(sd, "features.0", cfg[0][0], 1, 3, rng)
    for i, (cin, k, exp, out, se, _, _) in enumerate(cfg):
        p, j = f"features.{i + 1}.block", 0
        if exp != cin:
            _conv(sd, f"{p}.{j}", exp, cin, 1, rng)
            j += 1
        _conv(sd, f"{p}.{j}", exp, 1, k, rng)
        j += 1
        if se:
            sq = divisible(exp // 4)
            q = f"{p}.{j}.conc_se_layers.0"
            sd[f"{q}.fc1.weight"] = rng.normal(0, exp**-0.5, (sq, exp)).astype(np.float32)
            sd[f"{q}.fc1.bias"] = rng.normal(0, 0.1, sq).astype(np.float32)
            sd[f"{q}.fc2.weight"] = rng.normal(0, sq**-0.5, (exp, sq)).astype(np.float32)
            sd[f"{q}.fc2.bias"] = rng.normal(0, 0.5, exp).astype(np.float32)
            j += 1
        _conv(sd, f"{p}.{j}", out, exp, 1, rng)
    last = cfg[-1][3]
    _conv(sd, f"features.{len(cfg) + 1}", 6 * last, last, 1, rng)
    hidden = divisible(1280 * width)
    sd["classifier.2.weight"] = rng.normal(0, 0.01, (hidden, 6 * last)).astype(np.float32)
    sd["classifier.2.bias"] = np.zeros(hidden, np.float32)
    sd["classifier.5.weight"] = rng.normal(0, 0.01, (classes, hidden)).astype(np.float32)
    sd["classifier.5.bias"] = np.zeros(classes, np.float32)
    return sd


def _conv2d(x: np.ndarray, w: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """torch Conv2d (NCHW, padding (k-1)//2, no bias), groups 1 or = channels."""
    k = w.shape[-1]
    p = (k - 1) // 2
    x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    h = (x.shape[2] - k) // stride + 1
    v = (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], h, v))
    for a in range(k):
        for b in range(k):
            patch = x[:, :, a : a + stride * (h - 1) + 1 : stride, b : b + stride * (v - 1) + 1 : stride]
            if groups == 1:
                out += np.einsum("nchw,oc->nohw", patch, w[:, :, a, b])
            else:
                out += patch * w[None, :, 0, a, b, None, None]
    return out


def _conv_bn(sd: dict, prefix: str, x: np.ndarray, stride: int = 1, groups: int = 1, act=None) -> np.ndarray:
    g = lambda n: sd[f"{prefix}.1.{n}"].astype(np.float64)[None, :, None, None]  # noqa: E731
    y = _conv2d(x, sd[f"{prefix}.0.weight"].astype(np.float64), stride, groups)
    y = (y - g("running_mean")) / np.sqrt(g("running_var") + 1e-3) * g("weight") + g("bias")
    return act(y) if act else y


def relu(x):
    return np.maximum(x, 0.0)


def hardswish(x):
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # 1 / (1 + e^-x), without overflow


def hard_sigmoid(x):
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def forward(sd: dict, mel: np.ndarray, width: float, gate=sigmoid) -> np.ndarray:
    """mel [B, F, T] -> [B, 6 × last channels]: EfficientAT's ``MN`` features + adaptive average pooling, inference
    mode (running statistics), float64."""
    x = mel.astype(np.float64)[:, None]
    x = _conv_bn(sd, "features.0", x, 2, act=hardswish)
    for i, (cin, _, exp, out, se, hs, stride) in enumerate(blocks(width)):
        act, p, j, y = (hardswish if hs else relu), f"features.{i + 1}.block", 0, x
        if exp != cin:
            y = _conv_bn(sd, f"{p}.{j}", y, act=act)
            j += 1
        y = _conv_bn(sd, f"{p}.{j}", y, stride, groups=exp, act=act)
        j += 1
        if se:
            w1, b1, w2, b2 = (sd[f"{p}.{j}.conc_se_layers.0.{n}"].astype(np.float64)
                              for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))  # fmt: skip
            s = relu(y.mean(axis=(2, 3)) @ w1.T + b1)
            y = y * gate(s @ w2.T + b2)[:, :, None, None]
            j += 1
        y = _conv_bn(sd, f"{p}.{j}", y)
        x = x + y if stride == 1 and cin == out else y
    x = _conv_bn(sd, f"features.{len(TABLE) + 1}", x, act=hardswish)
    return x.mean(axis=(2, 3))
