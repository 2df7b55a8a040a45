"""S-SONDO students (SPEC §6), pure Flax: MobileNetV3 of the EfficientAT "mn" family and the projection head.

``MobileNetV3(width=1.0)`` ("mn10") is the MobileNetV3-Large feature extractor on a 1-channel log-mel image: a 3×3
stride-2 stem (16 channels, hard-swish), the 15 inverted-residual blocks below (depthwise k×k, optional
squeeze-excitation with hard-sigmoid gate, ReLU or hard-swish), and a 1×1 convolution to 960 channels (hard-swish),
then global average pooling: a 960-d embedding. Convolutions have no bias and are followed by BatchNorm (eps 1e-3,
momentum 0.01 in PyTorch terms, i.e. 0.99 here); channel counts scale with ``width`` rounded to multiples of 8 (the
last convolution keeps ``6 × last block channels``). With width 1.0 the backbone has 2,971,664 parameters (PyTorch's
mobilenet_v3_large features, 2,971,952, minus the 288 weights of two missing input channels), SPEC's "2.97 M".

``ProjectionHead``: Linear(d → 1280) → Hardswish → Dropout 0.2 → Linear(1280 → 3840), trained with the student and
dropped afterwards (the student's embedding is its backbone output).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

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
        x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride), padding=((pad, pad),) * 2,
                    feature_group_count=self.groups, use_bias=False, name="conv")(x)  # fmt: skip
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name="bn")(x)
        return _ACT[self.act](x) if self.act else x


class SqueezeExcite(nn.Module):
    squeeze: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(nn.Conv(self.squeeze, (1, 1), name="fc1")(s))
        s = nn.hard_sigmoid(nn.Conv(x.shape[-1], (1, 1), name="fc2")(s))
        return x * s


class InvertedResidual(nn.Module):
    kernel: int
    expanded: int
    out: int
    se: bool
    act: str
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        inp = x.shape[-1]
        y = x
        if self.expanded != inp:
            y = ConvBN(self.expanded, 1, act=self.act, name="expand")(y, train)
        y = ConvBN(self.expanded, self.kernel, self.stride, self.expanded, self.act, name="depthwise")(y, train)
        if self.se:
            y = SqueezeExcite(make_divisible(self.expanded // 4), name="se")(y)
        y = ConvBN(self.out, 1, name="project")(y, train)
        return x + y if self.stride == 1 and inp == self.out else y


class MobileNetV3(nn.Module):
    """mel [B, F, T] -> embedding [B, 6 × last channels] (960 for width 1.0)."""

    width: float = 1.0

    @nn.compact
    def __call__(self, mel: jax.Array, train: bool = False) -> jax.Array:
        x = mel[..., None]  # [B, F, T, 1]
        x = ConvBN(make_divisible(16 * self.width), 3, 2, act="hardswish", name="stem")(x, train)
        for i, (k, e, o, se, act, s) in enumerate(LARGE):
            x = InvertedResidual(k, make_divisible(e * self.width), make_divisible(o * self.width), se, act, s,
                                 name=f"block_{i}")(x, train)  # fmt: skip
        x = ConvBN(6 * x.shape[-1], 1, act="hardswish", name="last")(x, train)
        return jnp.mean(x, axis=(1, 2))


class AFF(nn.Module):
    """Attentional feature fusion (ERes2Net): ``w = tanh(BN(conv(SiLU(BN(conv([x, y]))))))``,
    output ``x·(1 + w) + y·(1 − w)``."""

    reduction: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        a = nn.Conv(max(c // self.reduction, 8), (1, 1), name="fc1")(jnp.concatenate([x, y], -1))
        a = nn.silu(nn.BatchNorm(use_running_average=not train, name="bn1")(a))
        a = nn.BatchNorm(use_running_average=not train, name="bn2")(nn.Conv(c, (1, 1), name="fc2")(a))
        w = jnp.tanh(a)
        return x * (1.0 + w) + y * (1.0 - w)


def _bn(name: str, train: bool) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class ERes2NetBlock(nn.Module):
    """Res2Net bottleneck with local attentional fusion: 1×1 conv (stride) to ``scale`` splits of ``width``; split j
    is fused with the previous split's output (AFF) and convolved 3×3; concat -> 1×1 conv to ``planes × expansion``."""

    planes: int
    stride: int = 1
    scale: int = 2
    base_width: int = 32
    expansion: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = self.planes * self.base_width // 64
        s = (self.stride, self.stride)
        y = nn.relu(_bn("bn1", train)(nn.Conv(width * self.scale, (1, 1), s, use_bias=False, name="conv1")(x)))
        outs, sp = [], None
        for j, part in enumerate(jnp.split(y, self.scale, axis=-1)):
            sp = part if j == 0 else AFF(name=f"fuse_{j}")(sp, part, train)
            sp = nn.relu(
                _bn(f"bn2_{j}", train)(nn.Conv(width, (3, 3), padding=1, use_bias=False, name=f"conv2_{j}")(sp))
            )
            outs.append(sp)
        y = _bn("bn3", train)(nn.Conv(self.planes * self.expansion, (1, 1), use_bias=False, name="conv3")(
            jnp.concatenate(outs, -1)))  # fmt: skip
        if self.stride != 1 or x.shape[-1] != y.shape[-1]:
            x = _bn("bn_skip", train)(nn.Conv(y.shape[-1], (1, 1), s, use_bias=False, name="skip")(x))
        return nn.relu(x + y)


class ERes2Net(nn.Module):
    """ERes2Net-style student: mel [B, F, T] -> embedding [B, 2 × 8 × channels × expansion] (1024 by default).

    A 3×3 stem, four stages of ``ERes2NetBlock`` (planes ``channels × (1, 2, 4, 8)``, strides 1, 2, 2, 2), global
    (bottom-up) attentional fusion of the stage outputs (each fused map is downsampled by a stride-2 3×3 convolution
    and fused into the next stage's output), then temporal statistics pooling (TSTP): the mean over frequency, then
    the mean and the standard deviation over time, concatenated. Randomly initialised in the paper (SPEC §6:
    ≈ 1.4 M parameters, 1024-d); the default (channels 32, blocks 1-1-2-1) has 1,429,248.

    Global fusion downsamples with a strided 1×1 convolution (a 3×3 one, as in the speaker-verification original,
    would cost 1.2 M parameters in the last stage alone).
    """

    channels: int = 32
    blocks: tuple[int, ...] = (1, 1, 2, 1)
    scale: int = 2
    expansion: int = 2

    @nn.compact
    def __call__(self, mel: jax.Array, train: bool = False) -> jax.Array:
        x = mel[..., None]
        x = nn.relu(_bn("stem_bn", train)(nn.Conv(self.channels, (3, 3), padding=1, use_bias=False, name="stem")(x)))
        fused = None
        for i, n in enumerate(self.blocks):
            for b in range(n):
                stride = 2 if i > 0 and b == 0 else 1
                x = ERes2NetBlock(self.channels * 2**i, stride, self.scale, expansion=self.expansion,
                                  name=f"stage{i}_block{b}")(x, train)  # fmt: skip
            if fused is None:
                fused = x
            else:
                down = nn.Conv(x.shape[-1], (1, 1), (2, 2), use_bias=False, name=f"down_{i}")(fused)
                fused = AFF(name=f"global_fuse_{i}")(x, _bn(f"down_bn_{i}", train)(down), train)
        frames = jnp.mean(fused, axis=1)  # [B, T', C]
        mean = jnp.mean(frames, axis=1)
        std = jnp.sqrt(jnp.var(frames, axis=1) + 1e-5)
        return jnp.concatenate([mean, std], -1)


class ProjectionHead(nn.Module):
    """d -> 1280 -> Hardswish -> Dropout 0.2 -> 3840 (the teacher's clip-embedding space)."""

    hidden: int = 1280
    out: int = 3840
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.hard_swish(nn.Dense(self.hidden, name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.out, name="fc2")(x)


class Distiller(nn.Module):
    """A student backbone and its projection head: ``(embedding [B, d], projection [B, 3840])``; ``embed`` gives the
    backbone output only (what is kept after training)."""

    backbone: nn.Module
    head: ProjectionHead

    def __call__(self, mel: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        emb = self.backbone(mel, train)
        return emb, self.head(emb, train)

    def embed(self, mel: jax.Array) -> jax.Array:
        return self.backbone(mel, False)


ARCHS = ("mobilenet", "eres2net")


def make_student(student, out_dim: int = 3840) -> Distiller:
    """``config.student`` -> Distiller: {'arch': 'mobilenet', 'width': 1.0} (mn10) or {'arch': 'eres2net',
    'channels': 32, 'blocks': (1, 1, 2, 1)}, with 'head_hidden' (1280) and 'dropout' (0.2)."""
    if student.arch == "mobilenet":
        backbone = MobileNetV3(student.width)
    elif student.arch == "eres2net":
        backbone = ERes2Net(student.channels, tuple(student.blocks))
    else:
        raise ValueError(f"config.student.arch={student.arch!r}: expected one of {', '.join(ARCHS)}")
    return Distiller(backbone, ProjectionHead(student.head_hidden, out_dim, student.dropout))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
