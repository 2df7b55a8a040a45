"""DyMN ("dymn10" at width 1.0), the dynamic MobileNet of EfficientAT, as an S-SONDO student (SPEC §6), pure Flax.

Architecture (EfficientAT ``models/dymn``): a 3×3 stride-2 stem (16 channels, BatchNorm, hard-swish), the 15
MobileNetV3-Large inverted-residual positions of ``SETTING`` all replaced by dynamic blocks, and a 1×1 convolution to
``6 × 160 = 960`` channels (BatchNorm, hard-swish). The embedding is the global average of that last feature map:
what EfficientAT returns as ``embed`` beside its logits and what S-SONDO's DyMN returns (the classifier is not part
of the student; a checkpoint's ``classifier.*`` keys are dropped). Every BatchNorm has eps 1e-3 and PyTorch momentum
0.01 (0.99 here); channel counts are ``make_divisible(c × width, 8)``.

A dynamic block on an input ``x`` (C channels, expanded width E, output O, context size
``H = clip(make_divisible(E // 4), make_divisible(32·width), make_divisible(128·width))``):

* context: ``x`` is averaged over time (a frequency sequence) and over frequency (a time sequence); both sequences
  go through one shared 1×1 convolution C→H without bias, BatchNorm and hard-swish; the mean over both sequences
  is the context vector ``h`` [B, H]; each sequence, average-pooled (window 3, padding 1, padded zeros counted,
  stride = the block's stride; no pooling at stride 1), is mapped by its own 1×1 convolution H→E with bias.
* dynamic convolutions (K = 4 kernels) for the expansion (1×1, only when E ≠ C), the depthwise k×k (stride, padding
  (k−1)/2) and the projection (1×1): attention ``softmax(Linear_H→K(h) / τ)`` mixes the K kernels per example.
* expansion → BatchNorm → ReLU or hard-swish; depthwise → BatchNorm → dynamic ReLU (DY-ReLU-B, M = 2): per example
  and channel ``θ = 2·sigmoid(Linear_H→2M·E(h)) − 1``, slopes ``a_m = 1 + θ_m`` (m = 0) or ``θ_m`` (m = 1), offsets
  ``b_m = 0.5·θ_{M+m}``, output ``max_m(a_m·x + b_m)``; coordinate attention ``x · sigmoid(g_f) · sigmoid(g_t)``
  with the two pooled sequences; projection → BatchNorm; residual when stride 1 and C = O.

Temperature τ of the kernel attention: EfficientAT trains from scratch with τ annealed from 30 to 1
(``DynamicConv.update_params(epoch)``); a model built from ImageNet weights starts at ``pretrain_final_temp`` = 30,
and S-SONDO builds dymn10_im with ``pretrain_final_temp=30`` and never calls ``update_params``, so τ = 30 in its
training and at inference: the default here. τ is a static attribute (changing it means a new module, not new
parameters). ``train=True`` only switches BatchNorm to batch statistics (and updates ``batch_stats``).

Input: a 1-channel log-mel, [B, F, T] or [B, 1, F, T]; output [B, 6 × last block channels] (960 at width 1.0).
With width 1.0 the backbone has 8,643,312 parameters, the published DyMN's count without its classifier (with the
ImageNet classifier: 11,154,392); tests/test_dymn.py derives it from the layer shapes. SPEC §6 quotes "8.7 M".
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from matpac_jax.models import padding
from matpac_jax.state_dict_io import StateDictMismatch

# (kernel, expanded, out, activation, stride index or None) per block at width 1.0; the 4 strided positions take
# their stride from ``DyMN.strides`` (EfficientAT's ``strides=(2, 2, 2, 2)``).
SETTING = (
    (3, 16, 16, "relu", None),
    (3, 64, 24, "relu", 0),
    (3, 72, 24, "relu", None),
    (5, 72, 40, "relu", 1),
    (5, 120, 40, "relu", None),
    (5, 120, 40, "relu", None),
    (3, 240, 80, "hardswish", 2),
    (3, 200, 80, "hardswish", None),
    (3, 184, 80, "hardswish", None),
    (3, 184, 80, "hardswish", None),
    (3, 480, 112, "hardswish", None),
    (3, 672, 112, "hardswish", None),
    (5, 672, 160, "hardswish", 3),
    (5, 960, 160, "hardswish", None),
    (5, 960, 160, "hardswish", None),
)
_ACT = {"relu": nn.relu, "hardswish": nn.hard_swish}


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never below 90 % of ``v`` (the MobileNet rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def block_shapes(
    width: float = 1.0, strides=(2, 2, 2, 2), context_ratio: int = 4, min_context: int = 32, max_context: int = 128
) -> list[dict]:
    """Per block: ``in, kernel, expanded, out, context, act, stride`` at ``width`` (EfficientAT's config rules)."""
    out, c_in = [], make_divisible(16 * width)
    for k, e, o, act, si in SETTING:
        e, o = make_divisible(e * width), make_divisible(o * width)
        low, high = make_divisible(min_context * width), make_divisible(max_context * width)
        ctx = int(np.clip(make_divisible(e // context_ratio), low, high))
        out.append(dict(cin=c_in, kernel=k, exp=e, out=o, ctx=ctx, act=act, stride=1 if si is None else strides[si]))
        c_in = o
    return out


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name=name)


def _conv1x1(features: int, bias: bool, name: str) -> nn.Conv:
    return nn.Conv(features, (1, 1), use_bias=bias, name=name)


def _avg_pool3(x: jax.Array, axis: int, stride: int) -> jax.Array:
    """Average pool of window 3 along ``axis`` with one zero of padding each side, counted in the mean."""
    window, strides = [1] * x.ndim, [1] * x.ndim
    window[axis], strides[axis] = 3, stride
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad) / 3.0


class ConvBNAct(nn.Module):
    """k×k convolution (no bias, padding (k−1)/2) → BatchNorm → hard-swish: EfficientAT's stem and last layer."""

    features: int
    kernel: int = 1
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        p = (self.kernel - 1) // 2
        window = {"kernel_size": (self.kernel,) * 2, "strides": (self.stride,) * 2, "padding": ((p, p), (p, p))}
        x = nn.Conv(self.features, **window, use_bias=False, name="conv")(x)
        return nn.hard_swish(_bn(train, "bn")(x))


class DynamicConv(nn.Module):
    """K kernels mixed per example by ``softmax(Linear(h) / temperature)``; ``groups`` = 1 or = channels
    (depthwise). Kernels are stored [K, kh, kw, in/groups, out]."""

    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    k: int = 4
    temperature: float = 30.0

    @nn.compact
    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        shape = (self.k, self.kernel, self.kernel, cin // self.groups, self.features)
        init = nn.initializers.variance_scaling(2.0, "fan_out", "normal", -2, -1, batch_axis=(0,))
        kernels = self.param("kernels", init, shape)
        att = jax.nn.softmax(nn.Dense(self.k, name="residuals")(h) / self.temperature, axis=-1)  # [B, K]
        w = jnp.einsum("bk,khwio->bhwio", att, kernels.astype(x.dtype))
        if self.kernel == 1 and self.stride == 1 and self.groups == 1:
            return jnp.einsum("bfti,bio->bfto", x, w[:, 0, 0])
        if self.groups != cin or cin != self.features:
            raise ValueError(
                f"DynamicConv: {self.kernel}x{self.kernel} kernels are depthwise only (DyMN's), got "
                f"groups={self.groups} for {cin} -> {self.features} channels"
            )
        return depthwise_per_example(x, w[:, :, :, 0, :], self.stride)


def depthwise_per_example(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """Depthwise k×k convolution with a kernel per example, zero padding (k−1)/2: x [B, H, W, C], w [B, k, k, C] ->
    [B, H', W', C], written as the sum over the k² taps of a strided slice of the padded input times its weight.
    The obvious form, a ``vmap`` of ``conv_general_dilated``, becomes one convolution of B·C groups that onnxruntime
    1.32 evaluates wrongly for B > 1 (off by 0.1 on a tiny DyMN, right at B = 1): the ONNX export of dymn10 gave wrong
    embeddings for batches. This form exports as slices, products and sums, and equals the convolution up to the
    order of the additions (tests/test_dymn.py, tests/test_export.py)."""
    k = w.shape[1]
    p = (k - 1) // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho, wo = (x.shape[1] + 2 * p - k) // stride + 1, (x.shape[2] + 2 * p - k) // stride + 1
    out = None
    for i in range(k):
        for j in range(k):
            tap = xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
            term = tap * w[:, i, j][:, None, None, :]
            out = term if out is None else out + term
    return out


class DyReLUB(nn.Module):
    """Dynamic ReLU, type B (per-channel): ``max_m(a_m·x + b_m)`` with coefficients from the context ``h``."""

    m: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        c = x.shape[-1]
        theta = 2.0 * jax.nn.sigmoid(nn.Dense(2 * self.m * c, name="coef_net")(h)) - 1.0
        lambdas = jnp.array([1.0] * self.m + [0.5] * self.m, x.dtype)
        init_v = jnp.array([1.0] + [0.0] * (2 * self.m - 1), x.dtype)
        coefs = theta.reshape(-1, 1, 1, c, 2 * self.m) * lambdas + init_v  # [B, 1, 1, C, 2M]
        mapped = x[..., None] * coefs[..., : self.m] + coefs[..., self.m :]
        return jnp.max(mapped, axis=-1)


class ContextGen(nn.Module):
    """Block input [B, F, T, C] -> (context h [B, H], frequency gate logits [B, F', 1, E], time gate logits
    [B, 1, T', E]). With ``frames`` (each row's true frame count), the means over time and the context's mean over
    the frequency and time sequences leave the padding frames out (models.padding)."""

    context: int
    expanded: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, frames: jax.Array | None = None) -> tuple[jax.Array, ...]:
        f = x.shape[1]
        over_time = padding.mean(x, (2,), frames, time_axis=2)
        seq = jnp.concatenate([over_time, jnp.mean(x, axis=1)], axis=1)[:, :, None]  # [B, F+T, 1, C]
        seq = nn.hard_swish(_bn(train, "joint_norm")(_conv1x1(self.context, False, "joint_conv")(seq)))
        real = None if frames is None else f + frames  # the F frequency steps, then the real time steps: a prefix
        h = padding.mean(seq, (1, 2), real, time_axis=1)
        h_f, h_t = seq[:, :f], jnp.swapaxes(seq[:, f:], 1, 2)  # [B, F, 1, H], [B, 1, T, H]
        if self.stride > 1:  # the window-3 pooling over time sees zeros past the real steps, as unpadded
            h_f, h_t = _avg_pool3(h_f, 1, self.stride), _avg_pool3(padding.zero_padding(h_t, frames), 2, self.stride)
        return h, _conv1x1(self.expanded, True, "conv_f")(h_f), _conv1x1(self.expanded, True, "conv_t")(h_t)


class DyBlock(nn.Module):
    """EfficientAT's ``DY_Block`` (see the module docstring)."""

    kernel: int
    expanded: int
    out: int
    context: int
    act: str
    stride: int = 1
    dyconv_k: int = 4
    dyrelu_m: int = 2
    temperature: float = 30.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, frames: jax.Array | None = None) -> jax.Array:
        """``frames``: the true frame count of ``x`` (before this block's stride; None: no padding)."""
        cin = x.shape[-1]
        dyn = dict(k=self.dyconv_k, temperature=self.temperature)
        h, g_f, g_t = ContextGen(self.context, self.expanded, self.stride, name="context_gen")(x, train, frames)
        y = x
        if self.expanded != cin:
            y = DynamicConv(self.expanded, name="exp_conv", **dyn)(y, h)
            y = _ACT[self.act](_bn(train, "exp_norm")(y))
        y = padding.zero_padding(y, frames)  # the depthwise k×k: the block's one convolution across time steps
        y = DynamicConv(self.expanded, self.kernel, self.stride, self.expanded, name="depth_conv", **dyn)(y, h)
        y = DyReLUB(self.dyrelu_m, name="depth_act")(_bn(train, "depth_norm")(y), h)
        y = y * jax.nn.sigmoid(g_f) * jax.nn.sigmoid(g_t)
        y = _bn(train, "proj_norm")(DynamicConv(self.out, name="proj_conv", **dyn)(y, h))
        return x + y if self.stride == 1 and cin == self.out else y


class DyMN(nn.Module):
    """mel [B, F, T] or [B, 1, F, T] -> embedding [B, 6 × last block channels] (960 for width 1.0, "dymn10").
    ``frames`` [B]: each row's true frame count when the mel is padded past it (models.padding: the k×k convolutions
    and the context's pooling over time see zeros past it, the context means and the global mean leave it out);
    None: every frame is real."""

    width: float = 1.0
    strides: tuple[int, int, int, int] = (2, 2, 2, 2)
    temperature: float = 30.0
    context_ratio: int = 4
    min_context: int = 32
    max_context: int = 128
    dyconv_k: int = 4
    dyrelu_m: int = 2
    min_frames = 1  # the shortest log-mel it takes

    def blocks(self) -> list[dict]:
        return block_shapes(self.width, self.strides, self.context_ratio, self.min_context, self.max_context)

    @nn.compact
    def __call__(self, mel: jax.Array, train: bool = False, frames: jax.Array | None = None) -> jax.Array:
        if mel.ndim == 4 and mel.shape[1] == 1:
            mel = mel[:, 0]
        if mel.ndim != 3:
            raise ValueError(f"DyMN takes a log-mel [B, F, T] or [B, 1, F, T], got shape {tuple(mel.shape)}")
        mel = padding.zero_padding(mel, frames)
        x = ConvBNAct(make_divisible(16 * self.width), 3, 2, name="in_c")(mel[..., None], train)
        frames = padding.strided(frames, 2)
        dynamic = (self.dyconv_k, self.dyrelu_m, self.temperature)
        for i, b in enumerate(self.blocks()):
            shape = (b["kernel"], b["exp"], b["out"], b["ctx"], b["act"], b["stride"])
            x = DyBlock(*shape, *dynamic, name=f"layers_{i}")(x, train, frames)
            frames = padding.strided(frames, b["stride"])
        x = ConvBNAct(6 * x.shape[-1], 1, name="out_c")(x, train)
        return padding.mean(x, (1, 2), frames, time_axis=2)


# --- EfficientAT state dict (``dymn10_im.pt`` layout) -> Flax variables ---------------------------------------------


def _conv_w(w):  # torch Conv2d [out, in, kh, kw] -> flax [kh, kw, in, out]
    return np.transpose(w, (2, 3, 1, 0))


def _linear_w(w):  # torch Linear [out, in] -> flax [in, out]
    return np.transpose(w)


def _bn_keys(prefix: str, path: tuple) -> list:
    return [
        (f"{prefix}.weight", "params", (*path, "scale"), None),
        (f"{prefix}.bias", "params", (*path, "bias"), None),
        (f"{prefix}.running_mean", "batch_stats", (*path, "mean"), None),
        (f"{prefix}.running_var", "batch_stats", (*path, "var"), None),
    ]


def _dynconv_keys(prefix: str, path: tuple, shape: tuple) -> list:
    k, kh, kw, cin, cout = shape

    def kernels(w):  # [1, 1, K, out·in·kh·kw], each row one [out, in, kh, kw] kernel
        return np.transpose(np.reshape(w, (k, cout, cin, kh, kw)), (0, 3, 4, 2, 1))

    return [
        (f"{prefix}.weight", "params", (*path, "kernels"), kernels),
        (f"{prefix}.residuals.0.weight", "params", (*path, "residuals", "kernel"), _linear_w),
        (f"{prefix}.residuals.0.bias", "params", (*path, "residuals", "bias"), None),
    ]


def _key_map(model: DyMN) -> list:
    """(torch key, collection, flax path, converter) for every weight of ``model``."""
    out = [("in_c.0.weight", "params", ("in_c", "conv", "kernel"), _conv_w), *_bn_keys("in_c.1", ("in_c", "bn"))]
    for i, b in enumerate(model.blocks()):
        t, f = f"layers.{i}", f"layers_{i}"
        cg = (f, "context_gen")
        out += [
            (f"{t}.context_gen.joint_conv.weight", "params", (*cg, "joint_conv", "kernel"), _conv_w),
            *_bn_keys(f"{t}.context_gen.joint_norm", (*cg, "joint_norm")),
        ]
        for conv in ("conv_f", "conv_t"):
            out += [
                (f"{t}.context_gen.{conv}.weight", "params", (*cg, conv, "kernel"), _conv_w),
                (f"{t}.context_gen.{conv}.bias", "params", (*cg, conv, "bias"), None),
            ]
        kk = model.dyconv_k
        if b["exp"] != b["cin"]:
            out += [
                *_dynconv_keys(f"{t}.exp_conv", (f, "exp_conv"), (kk, 1, 1, b["cin"], b["exp"])),
                *_bn_keys(f"{t}.exp_norm", (f, "exp_norm")),
            ]
        out += [
            *_dynconv_keys(f"{t}.depth_conv", (f, "depth_conv"), (kk, b["kernel"], b["kernel"], 1, b["exp"])),
            *_bn_keys(f"{t}.depth_norm", (f, "depth_norm")),
            (f"{t}.depth_act.coef_net.0.weight", "params", (f, "depth_act", "coef_net", "kernel"), _linear_w),
            (f"{t}.depth_act.coef_net.0.bias", "params", (f, "depth_act", "coef_net", "bias"), None),
            (f"{t}.depth_act.lambdas", None, None, None),
            (f"{t}.depth_act.init_v", None, None, None),
            *_dynconv_keys(f"{t}.proj_conv", (f, "proj_conv"), (kk, 1, 1, b["exp"], b["out"])),
            *_bn_keys(f"{t}.proj_norm", (f, "proj_norm")),
        ]
    return out + [
        ("out_c.0.weight", "params", ("out_c", "conv", "kernel"), _conv_w),
        *_bn_keys("out_c.1", ("out_c", "bn")),
    ]


def _leaf(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def abstract_variables(model: DyMN) -> dict:
    """Shapes of ``model``'s variables (``jax.eval_shape``: nothing is computed or compiled); cached per
    architecture."""
    context, dynamic = (model.context_ratio, model.min_context, model.max_context), (model.dyconv_k, model.dyrelu_m)
    return _abstract_variables(model.width, tuple(model.strides), model.temperature, *context, *dynamic)


@functools.lru_cache(maxsize=8)
def _abstract_variables(*arch) -> dict:
    model = DyMN(*arch)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64), jnp.float32)))


def from_torch_state_dict(
    sd: dict[str, np.ndarray],
    width: float = 1.0,
    strides=(2, 2, 2, 2),
    temperature: float = 30.0,
    context_ratio: int = 4,
    min_context: int = 32,
    max_context: int = 128,
    dyconv_k: int = 4,
    dyrelu_m: int = 2,
) -> dict:
    """EfficientAT DyMN state dict (the ``dymn10_im.pt`` key layout, arrays as numpy) -> ``{'params',
    'batch_stats'}`` of ``DyMN`` with these attributes, float32. An S-SONDO DyMN student's backbone has the same
    keys (its DyMN has no classifier).

    ``classifier.*`` keys (the ImageNet/AudioSet head) and ``*.num_batches_tracked`` are ignored. Any other key the
    model has no place for, or any key it needs that ``sd`` lacks, raises ``StateDictMismatch`` naming them; a weight
    of the wrong shape, or DY-ReLU constants (``lambdas``, ``init_v``) other than the published ones, raise it too.
    """
    model = DyMN(width, tuple(strides), temperature, context_ratio, min_context, max_context, dyconv_k, dyrelu_m)
    kmap = _key_map(model)
    given = {k for k in sd if not k.startswith("classifier.") and not k.endswith(".num_batches_tracked")}
    wanted = {k for k, *_ in kmap}
    what = f"DyMN(width={model.width}) from an EfficientAT state dict"
    if given != wanted:
        raise StateDictMismatch(
            what,
            unknown=given - wanted,
            missing=wanted - given,
            detail="expected EfficientAT's models/dymn layout (e.g. dymn10_im.pt) at this width",
        )
    m = model.dyrelu_m
    consts = {"lambdas": np.array([1.0] * m + [0.5] * m), "init_v": np.array([1.0] + [0.0] * (2 * m - 1))}
    bad_values = []
    for key, coll, _, _ in kmap:
        if coll is None:  # DY-ReLU constants (buffers in the file): fixed by the architecture, not learned
            v, c = np.asarray(sd[key]), consts[key.rsplit(".", 1)[1]]
            if v.shape != c.shape or not np.allclose(v, c):
                bad_values.append(f"{key}={v.tolist()} (expected {c.tolist()})")
    if bad_values:
        raise StateDictMismatch(what, detail="wrong DY-ReLU constants: " + "; ".join(bad_values))
    shapes = abstract_variables(model)
    out: dict = {"params": {}, "batch_stats": {}}
    bad_shapes = []
    for key, coll, path, conv in kmap:
        if coll is None:
            continue
        v = np.asarray(sd[key], np.float32)
        want = tuple(_leaf(shapes[coll], path).shape)
        try:
            v = conv(v) if conv else v
        except ValueError:  # a dynamic convolution's flat kernels of another size
            pass
        if v.shape != want:
            bad_shapes.append(f"{key} {tuple(np.shape(sd[key]))}")
            continue
        _set(out[coll], path, v)
    if bad_shapes:
        shown = ", ".join(bad_shapes[:6]) + (f" and {len(bad_shapes) - 6} more" if len(bad_shapes) > 6 else "")
        raise StateDictMismatch(what, detail=f"wrong shapes: {shown}; is the state dict of another width?")
    return out
