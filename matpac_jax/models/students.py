"""S-SONDO students (SPEC §6), pure Flax: MobileNetV3 of the EfficientAT "mn" family and the projection head.

``MobileNetV3(width=1.0)`` ("mn10") is EfficientAT's "mn" backbone (models/mn: MobileNetV3-Large on a 1-channel
log-mel image) exactly: a 3×3 stride-2 stem (16 channels, hard-swish), the 15 inverted-residual blocks below (1×1
expansion when the width changes, depthwise k×k, each followed by BatchNorm and ReLU or hard-swish; then, in the
marked blocks, channel squeeze-excitation: mean over frequency and time, a biased 1×1 map to
``make_divisible(channels // 4)``, ReLU, a biased 1×1 map back and a plain **sigmoid** gate (EfficientAT's, where
torchvision has a hard-sigmoid); then a 1×1 projection with BatchNorm and no activation; a residual connection when
the stride is 1 and the channels do not change), and a 1×1 convolution to ``6 × last block channels`` (hard-swish),
then global average pooling: a 960-d embedding. Convolutions have no bias and are followed by BatchNorm (eps 1e-3,
momentum 0.01 in PyTorch terms, i.e. 0.99 here); channel counts scale with ``width`` rounded to multiples of 8. With
width 1.0 the backbone has 2,971,664 parameters (PyTorch's mobilenet_v3_large features, 2,971,952, minus the 288
weights of two missing input channels), SPEC's "2.97 M". ``distill.published`` loads EfficientAT's and S-SONDO's
PyTorch weights into it.

``ProjectionHead``: Linear(d → 1280) → Hardswish → Dropout 0.2 → Linear(1280 → 3840), trained with the student and
dropped afterwards (the student's embedding is its backbone output).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from matpac_jax.models import padding
from matpac_jax.models.dymn import DyMN
from matpac_jax.models.eres2net import ERes2Net  # S-SONDO's ERes2Net student

# (kernel, expanded, out, squeeze-excitation, activation, stride) per block, width 1.0 (MobileNetV3-Large)
LARGE = (
    (3, 16, 16, False, "relu", 1),
    (3, 64, 24, False, "relu", 2),
    (3, 72, 24, False, "relu", 1),
    (5, 72, 40, True, "relu", 2),
    (5, 120, 40, True, "relu", 1),
    (5, 120, 40, True, "relu", 1),
    (3, 240, 80, False, "hardswish", 2),
    (3, 200, 80, False, "hardswish", 1),
    (3, 184, 80, False, "hardswish", 1),
    (3, 184, 80, False, "hardswish", 1),
    (3, 480, 112, True, "hardswish", 1),
    (3, 672, 112, True, "hardswish", 1),
    (5, 672, 160, True, "hardswish", 2),
    (5, 960, 160, True, "hardswish", 1),
    (5, 960, 160, True, "hardswish", 1),
)
_ACT = {"relu": nn.relu, "hardswish": nn.hard_swish}


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never below 90 % of ``v`` (the MobileNet rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBN(nn.Module):
    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    act: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = (self.kernel - 1) // 2
        window = {"kernel_size": (self.kernel,) * 2, "strides": (self.stride,) * 2, "padding": ((pad, pad),) * 2}
        x = nn.Conv(self.features, **window, feature_group_count=self.groups, use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name="bn")(x)
        return _ACT[self.act](x) if self.act else x


class SqueezeExcite(nn.Module):
    """Channel squeeze-excitation: ``x · sigmoid(fc2(relu(fc1(mean_FT(x)))))`` (fc1/fc2 biased 1×1 convolutions);
    the mean over the real ``frames`` only (models.padding)."""

    squeeze: int

    @nn.compact
    def __call__(self, x: jax.Array, frames: jax.Array | None = None) -> jax.Array:
        s = padding.mean(x, (1, 2), frames, time_axis=2, keepdims=True)
        s = nn.relu(nn.Conv(self.squeeze, (1, 1), name="fc1")(s))
        s = nn.sigmoid(nn.Conv(x.shape[-1], (1, 1), name="fc2")(s))  # EfficientAT: Sigmoid, not hard-sigmoid
        return x * s


class InvertedResidual(nn.Module):
    kernel: int
    expanded: int
    out: int
    se: bool
    act: str
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, frames: jax.Array | None = None) -> jax.Array:
        """``frames``: the true frame count of ``x`` (None: no padding); the depthwise convolution, the block's only
        layer that mixes time steps, sees zeros past it (models.padding)."""
        inp = x.shape[-1]
        y = x
        if self.expanded != inp:
            y = ConvBN(self.expanded, 1, act=self.act, name="expand")(y, train)
        y = padding.zero_padding(y, frames)
        y = ConvBN(self.expanded, self.kernel, self.stride, self.expanded, self.act, name="depthwise")(y, train)
        if self.se:
            y = SqueezeExcite(make_divisible(self.expanded // 4), name="se")(y, padding.strided(frames, self.stride))
        y = ConvBN(self.out, 1, name="project")(y, train)
        return x + y if self.stride == 1 and inp == self.out else y


class MobileNetV3(nn.Module):
    """mel [B, F, T] -> embedding [B, 6 × last channels] (960 for width 1.0). ``frames`` [B]: each row's true frame
    count when the mel is padded past it (models.padding: the convolutions see zeros past it, the squeeze-excitation
    and global means leave it out); None: every frame is real."""

    width: float = 1.0
    min_frames = 1  # the shortest log-mel it takes

    @nn.compact
    def __call__(self, mel: jax.Array, train: bool = False, frames: jax.Array | None = None) -> jax.Array:
        x = padding.zero_padding(mel, frames)[..., None]  # [B, F, T, 1]
        x = ConvBN(make_divisible(16 * self.width), 3, 2, act="hardswish", name="stem")(x, train)
        frames = padding.strided(frames, 2)
        for i, (k, e, o, se, act, s) in enumerate(LARGE):
            expanded, out = make_divisible(e * self.width), make_divisible(o * self.width)
            x = InvertedResidual(k, expanded, out, se, act, s, name=f"block_{i}")(x, train, frames)
            frames = padding.strided(frames, s)
        x = ConvBN(6 * x.shape[-1], 1, act="hardswish", name="last")(x, train)
        return padding.mean(x, (1, 2), frames, time_axis=2)


def torch_linear(features: int, fan_in: int, name: str) -> nn.Dense:
    """A Dense initialised as torch's ``nn.Linear.reset_parameters``: ``kaiming_uniform_(weight, a=sqrt(5))``, i.e.
    U(±gain·sqrt(3 / fan_in)) with gain sqrt(2 / (1 + 5)) = U(±1 / sqrt(fan_in)), and the bias U(±1 / sqrt(fan_in))
    (Flax's Dense: lecun-normal, zero bias)."""
    bound = 1.0 / math.sqrt(fan_in)

    def bias_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # limit sqrt(3 · 1/3 / fan_in)
    return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init, name=name)


class ProjectionHead(nn.Module):
    """d -> 1280 -> Hardswish -> Dropout 0.2 -> 3840 (the teacher's clip-embedding space): S-SONDO's MLPClassifer
    (ssondo training_ssondo/utils/student_models/model_utils.py:183-188), two torch ``nn.Linear`` left at torch's
    default initialisation (:func:`torch_linear`)."""

    hidden: int = 1280
    out: int = 3840
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.hard_swish(torch_linear(self.hidden, x.shape[-1], "fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return torch_linear(self.out, self.hidden, "fc2")(x)


class Distiller(nn.Module):
    """A student backbone and its projection head: ``(embedding [B, d], projection [B, 3840])``; ``embed`` gives the
    backbone output only (what is kept after training)."""

    backbone: nn.Module
    head: ProjectionHead

    def __call__(self, mel: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        emb = self.backbone(mel, train)  # fixed-length crops: no padding to leave out
        return emb, self.head(emb, train)

    def embed(self, mel: jax.Array) -> jax.Array:
        return self.backbone(mel, False)


ARCHS = ("mobilenet", "eres2net", "dymn")


def make_student(student, out_dim: int = 3840) -> Distiller:
    """``config.student`` -> Distiller: {'arch': 'mobilenet', 'width': 1.0} (mn10) or {'arch': 'eres2net',
    'channels': 16, 'blocks': (3, 4, 6, 3, 3)} (S-SONDO's), with 'head_hidden' (1280) and 'dropout' (0.2)."""
    if student.arch == "mobilenet":
        backbone = MobileNetV3(student.width)
    elif student.arch == "eres2net":
        backbone = ERes2Net(student.channels, tuple(student.blocks))
    elif student.arch == "dymn":  # EfficientAT's DyMN: width 1.0 = dymn10, 8.64 M (models.dymn)
        backbone = DyMN(student.width)
    else:
        raise ValueError(f"config.student.arch={student.arch!r}: expected one of {', '.join(ARCHS)}")
    return Distiller(backbone, ProjectionHead(student.head_hidden, out_dim, student.dropout))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
