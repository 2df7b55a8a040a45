"""S-SONDO's ERes2Net student (SPEC §6) in Flax, and its published PyTorch weights in.

The network is S-SONDO's ERes2Net (3D-Speaker's, with an added fifth stage), on a log-mel image ``mel [B, F, T]``
(frequency as height, time as width, one input channel):

- stem: 3×3 convolution 1 → ``channels`` (no bias), BatchNorm, ReLU;
- five stages of bottleneck blocks of ``planes`` = ``channels`` × (1, 2, 4, 8, 2), first strides (1, 2, 2, 2, 2),
  ``blocks`` = (3, 4, 6, 3, 3) blocks: 1×1 convolution (the stage's stride) to 2 splits of ``planes / 2`` channels,
  split j (after the first) combined with the previous split's output — plain addition in stages 1–2, attentional
  feature fusion (AFF) in stages 3–5 — then 3×3 convolution, BatchNorm, clipped ReLU; the splits concatenated,
  1×1 convolution to ``2 × planes``, BatchNorm, plus the shortcut (a 1×1 convolution and BatchNorm where the shape
  changes), clipped ReLU. The clipped ReLU is Hardtanh(0, 20);
- bottom-up fusion: the running fused map (stage 1's output at first) is downsampled by a 3×3 stride-2 convolution
  without BatchNorm to the next stage's channels and fused into its output by AFF;
- TSTP: the last fused map, ``[C, ⌈F / 16⌉, ⌈T / 16⌉]``, flattened over channel × frequency (channel-major), mean
  and standard deviation over time (unbiased variance + 1e-8), concatenated: ``2 × 4·channels × ⌈F / 16⌉`` values —
  1024 for 16 channels and 128 mels.

The published module takes ``[B, S, F, T]`` (S segments of a clip, one embedding each); S-SONDO trains on one 10-s
segment per clip, which is this module's ``[B, F, T]``.

AFF(c): ``w = tanh(BN(conv1×1(SiLU(BN(conv1×1([x, y]))))))`` with the inner width ``c // 4`` and biased 1×1
convolutions; output ``x·(1 + w) + y·(1 − w)``. BatchNorm everywhere: eps 1e-5, PyTorch momentum 0.1 (0.9 here).
(PyTorch blends the unbiased batch variance into the running one, Flax the biased one: a factor n / (n − 1) with n
= batch × frequency × frames, negligible.) Weights start as PyTorch's defaults (uniform ±1/√fan-in), BatchNorm at
scale 1 and bias 0. With the published arguments (16 channels, blocks 3-4-6-3-3) the backbone has 1,368,068
parameters, SPEC's "1.4 M". Four ``blocks`` give 3D-Speaker's four-stage ERes2Net (pooling the fourth fused map,
``2 × 16·channels × ⌈F / 8⌉`` values).

:func:`from_torch_state_dict` reads S-SONDO's weights: the backbone's own keys (``conv1.weight``,
``layer3.0.fuse_models.0.local_att.0.weight``, ``fuse_mode12.local_att.1.running_mean``, ...) or the release's
checkpoint keys, prefixed ``student_model.model.`` (the projection head there, ``student_model.classification_head.``,
is left out). Every other key fails, as does every key the model needs and the file lacks.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from matpac_jax.models import padding
from matpac_jax.state_dict_io import StateDictMismatch

BASE_WIDTH, SCALE, EXPANSION = 32, 2, 2  # Res2Net split width (planes × 32/64), splits per block, output expansion
STAGE_PLANES = (1, 2, 4, 8, 2)  # × channels
STAGE_FUSES = (False, False, True, True, True)  # AFF between the splits (stages 3-5) or plain addition (1-2)
HARDTANH_MAX = 20.0
TSTP_EPS = 1e-8
# prefixes of the backbone's keys in the files S-SONDO writes: its ModelWrapper ('model.') inside the Lightning
# system ('student_model.'), whose checkpoint holds them under 'state_dict'
PREFIXES = ("", "model.", "student_model.model.", "state_dict.student_model.model.")
HEAD = "classification_head."  # the projection head, next to the backbone in those files


def _bn(name: str, train: bool) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # ±1/√fan-in


def _conv(features: int, kernel: int, stride: int = 1, bias_fan_in: int = 0, name: str | None = None) -> nn.Conv:
    """A PyTorch ``Conv2d`` with padding ``kernel // 2``: no bias unless ``bias_fan_in`` (its initialisation bound)."""
    pad = kernel // 2
    bias_init = _uniform(1.0 / math.sqrt(bias_fan_in)) if bias_fan_in else nn.initializers.zeros
    window = {"kernel_size": (kernel, kernel), "strides": (stride, stride), "padding": ((pad, pad), (pad, pad))}
    init = {"use_bias": bias_fan_in > 0, "kernel_init": _TORCH_KERNEL_INIT, "bias_init": bias_init}
    return nn.Conv(features, **window, **init, name=name)


def clipped_relu(x: jax.Array) -> jax.Array:
    """Hardtanh(0, 20), ERes2Net's "ReLU"."""
    return jnp.clip(x, 0.0, HARDTANH_MAX)


class AFF(nn.Module):
    """Attentional feature fusion of two maps of ``c`` channels: ``x·(1 + w) + y·(1 − w)``,
    ``w = tanh(BN(conv(SiLU(BN(conv([x, y]))))))``, the inner width ``c // 4``."""

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        inner = c // 4
        if inner < 1:
            raise ValueError(f"AFF of {c} channels has no inner channel (c // 4 = 0): use at least 4 channels")
        a = _conv(inner, 1, bias_fan_in=2 * c, name="local_att_0")(jnp.concatenate([x, y], -1))
        a = nn.silu(_bn("local_att_1", train)(a))
        a = _bn("local_att_4", train)(_conv(c, 1, bias_fan_in=inner, name="local_att_3")(a))
        w = jnp.tanh(a)
        return x * (1.0 + w) + y * (1.0 - w)


class ERes2NetBlock(nn.Module):
    """Res2Net bottleneck of ERes2Net: ``[B, H, W, cin] -> [B, H / stride, W / stride, 2 × planes]``; its splits are
    combined by AFF when ``fuse`` (the published ``BasicBlockERes2Net_diff_AFF``), by addition otherwise. ``frames``:
    the true frame count after the stride (None: no padding); the 3×3 convolutions see zeros past it."""

    planes: int
    stride: int = 1
    fuse: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, frames: jax.Array | None = None) -> jax.Array:
        width = self.planes * BASE_WIDTH // 64
        out_channels = self.planes * EXPANSION
        y = clipped_relu(_bn("bn1", train)(_conv(width * SCALE, 1, self.stride, name="conv1")(x)))
        outs, sp = [], None
        for i, part in enumerate(jnp.split(y, SCALE, axis=-1)):
            if i == 0:
                sp = part
            elif self.fuse:
                sp = AFF(name=f"fuse_models_{i - 1}")(sp, part, train)
            else:
                sp = sp + part
            sp = padding.zero_padding(sp, frames)
            sp = clipped_relu(_bn(f"bns_{i}", train)(_conv(width, 3, name=f"convs_{i}")(sp)))
            outs.append(sp)
        y = _bn("bn3", train)(_conv(out_channels, 1, name="conv3")(jnp.concatenate(outs, -1)))
        if self.stride != 1 or x.shape[-1] != out_channels:
            x = _bn("shortcut_1", train)(_conv(out_channels, 1, self.stride, name="shortcut_0")(x))
        return clipped_relu(y + x)


def tstp(x: jax.Array, frames: jax.Array | None = None) -> jax.Array:
    """Temporal statistics pooling of ``[B, F, T, C]``: mean and standard deviation (unbiased variance + 1e-8) over
    time of the ``C × F`` rows in PyTorch's channel-major order: ``[B, 2·C·F]``; over each row's first ``frames``
    time steps only when given (models.padding)."""
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1, x.shape[2])  # [B, C·F, T], index c·F + f
    mean, std = padding.mean_and_std(x, frames, ddof=1, eps=TSTP_EPS)
    return jnp.concatenate([mean, std], axis=-1)


class ERes2Net(nn.Module):
    """mel ``[B, F, T]`` -> embedding ``[B, 2 × 4·channels × ⌈F / 16⌉]`` (1024 for the published 16 channels and
    128 mels). ``blocks`` has five entries (S-SONDO) or four (3D-Speaker's ERes2Net: ``[B, 2 × 16·channels ×
    ⌈F / 8⌉]``). The clip needs at least 17 frames (9 with four stages): two after the downsampling, for the standard
    deviation over time. ``frames`` [B]: each row's true frame count when the mel is padded past it (models.padding:
    the 3×3 convolutions see zeros past it, TSTP leaves it out; each row needs ``min_frames`` real ones); None: every
    frame is real."""

    channels: int = 16
    blocks: tuple[int, ...] = (3, 4, 6, 3, 3)

    @property
    def min_frames(self) -> int:
        """The shortest log-mel it takes: two time steps after the ``2^(stages - 1)``-fold downsampling."""
        return 2 ** (len(self.blocks) - 1) + 1

    def _check(self, mel: jax.Array) -> None:
        if mel.ndim != 3:
            raise ValueError(f"ERes2Net takes log-mels [batch, mels, frames], got shape {tuple(mel.shape)}")
        if len(self.blocks) not in (4, 5) or min(self.blocks) < 1:
            depths = "5 stage depths (S-SONDO, e.g. 3, 4, 6, 3, 3) or 4 (3D-Speaker), each at least 1"
            raise ValueError(f"ERes2Net blocks={tuple(self.blocks)}: give {depths}")
        if self.channels < 4:
            raise ValueError(f"ERes2Net channels={self.channels}: use at least 4 (AFF's inner width is channels // 4)")
        frames = mel.shape[2]
        for _ in range(len(self.blocks) - 1):
            frames = (frames + 1) // 2
        if frames < 2:
            factor = 2 ** (len(self.blocks) - 1)
            raise ValueError(
                f"ERes2Net: a clip of {mel.shape[2]} frames leaves {frames} after the network's {factor}x "
                f"downsampling; TSTP's standard deviation needs 2: give at least {factor + 1} frames"
            )

    @nn.compact
    def __call__(self, mel: jax.Array, train: bool = False, frames: jax.Array | None = None) -> jax.Array:
        self._check(mel)
        x = padding.zero_padding(mel, frames)[..., None]
        x = nn.relu(_bn("bn1", train)(_conv(self.channels, 3, name="conv1")(x)))
        fused = fused_frames = None
        for s, n in enumerate(self.blocks):
            planes = self.channels * STAGE_PLANES[s]
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                frames = padding.strided(frames, stride)
                x = ERes2NetBlock(planes, stride, STAGE_FUSES[s], name=f"layer{s + 1}_{b}")(x, train, frames)
            if fused is None:
                fused = x
            else:
                fused = padding.zero_padding(fused, fused_frames)
                down = _conv(x.shape[-1], 3, 2, name=f"layer{s}_downsample")(fused)
                fused = AFF(name="fuse_mode" + "".join(str(k) for k in range(1, s + 2)))(x, down, train)
            fused_frames = frames
        return tstp(fused, frames)  # the downsampled fused maps share the last stage's resolution


# --- published weights -------------------------------------------------------------------------------------------

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_key(path: Sequence[str]) -> str:
    """Our variable path -> the published key: ``('layer3_0', 'fuse_models_0', 'local_att_1', 'scale')`` ->
    ``layer3.0.fuse_models.0.local_att.1.weight`` (a module name ending in ``_N`` is a ``ModuleList`` /
    ``Sequential`` index in PyTorch)."""
    modules = [re.sub(r"^(.+)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
    return ".".join([*modules, _LEAF[path[-1]]])


@functools.lru_cache(maxsize=8)
def _expected(channels: int, blocks: tuple[int, ...]) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """published key -> (collection, our path, our shape), from the shapes of an initialisation (nothing compiled)."""
    frames = 2 ** (len(blocks) - 1) + 1
    shapes = jax.eval_shape(lambda: ERes2Net(channels, blocks).init(jax.random.key(0), jnp.zeros((1, 32, frames))))
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(shapes[collection]).items():
            out[torch_key(path)] = (collection, path, tuple(leaf.shape))
    return out


def _backbone_keys(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The backbone's keys without their prefix, and the file's keys that are neither the backbone's nor the
    projection head's next to it (``num_batches_tracked`` counters are dropped everywhere)."""
    prefix = max((p for p in PREFIXES if f"{p}conv1.weight" in sd), key=len, default="")
    head = prefix[: -len("model.")] + HEAD if prefix else None
    backbone, unknown = {}, []
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith(prefix):
            backbone[k[len(prefix) :]] = v
        elif not (head and k.startswith(head)):
            unknown.append(k)
    return backbone, unknown


def from_torch_state_dict(
    sd: Mapping[str, np.ndarray], channels: int = 16, blocks: Sequence[int] = (3, 4, 6, 3, 3)
) -> dict[str, dict]:
    """S-SONDO's ERes2Net state dict (PyTorch layout, numpy arrays) -> ``{'params', 'batch_stats'}`` of
    ``ERes2Net(channels, blocks)`` (float32 numpy arrays). Keys may carry one of the release's prefixes
    (``student_model.model.``, ``model.``, ``state_dict.student_model.model.``). Raises ``StateDictMismatch`` listing
    the file's keys the model has no place for and the model's keys the file lacks, and (with no key missing) the
    keys whose shapes differ."""
    blocks = tuple(int(b) for b in blocks)
    what = f"ERes2Net(channels={channels}, blocks={blocks})"
    expected = _expected(int(channels), blocks)
    backbone, unknown = _backbone_keys(sd)
    unknown += [k for k in backbone if k not in expected]
    missing = [k for k in expected if k not in backbone]
    if unknown or missing:
        mapping = "student_model m_channels -> channels, num_blocks -> blocks"
        detail = f"the release's training_config names the architecture: {mapping}"
        raise StateDictMismatch(what, unknown, missing, detail=detail)
    flat: dict[str, dict] = {"params": {}, "batch_stats": {}}
    wrong = []
    for key, (collection, path, shape) in expected.items():
        value = np.asarray(backbone[key], np.float32)
        if path[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.shape != shape:
            want = (shape[3], shape[2], *shape[:2]) if path[-1] == "kernel" else shape
            wrong.append(f"{key} {tuple(np.shape(backbone[key]))} (the model's: {want})")
        flat[collection][path] = value
    if wrong:
        raise StateDictMismatch(what, detail=f"keys of the wrong shape: {', '.join(wrong)}")
    return {c: traverse_util.unflatten_dict(v) for c, v in flat.items()}
