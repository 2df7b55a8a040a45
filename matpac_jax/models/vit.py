"""ViT encoder pieces (SPEC §2): patch tokenizer with fixed positions (2-D sin-cos, or a stored table), pre-norm blocks.

The encoder is split in two modules because the MATPAC teacher shares the student's tokenizer (patch embedding,
positional embedding, CLS token) but owns its blocks:

  Tokenizer    log-mel [B, F, T] -> patch tokens + positions [B, N, D] (freq-major), and the CLS token [1, 1, D]
  Transformer  tokens [B, L, D] -> blocks -> final LayerNorm

Parameter names follow the published PyTorch layout (blocks_i/norm1, attn/qkv, attn/proj, mlp/fc1, ...) so that
conversion is a rename plus a transpose.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from matpac_jax.config_lib import POSITIVE, ConfigError, check_int, check_number

xavier = nn.initializers.xavier_uniform()
LN_EPS = 1e-6


def symmetric_uniform(bound: float):
    """U(-bound, bound), PyTorch's default bias init (bound = 1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def sincos_pos_embed_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[P] -> [P, dim] = [sin(p·ω), cos(p·ω)], ω_i = 10000^(-i/(dim/2)) (MAE recipe)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_freq: int, grid_time: int, cls_row: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos positions of the MAE recipe, [(1+) F*T, dim], freq-major token order.

    The first dim/2 channels encode the time index, the last dim/2 the frequency index; an optional zero row
    for the CLS token comes first.
    """
    if dim % 4:
        raise ValueError(f"positional embedding dim must be a multiple of 4, got {dim}")
    f, t = np.meshgrid(np.arange(grid_freq), np.arange(grid_time), indexing="ij")  # [F, T]
    emb = np.concatenate(
        [sincos_pos_embed_1d(dim // 2, t.reshape(-1)), sincos_pos_embed_1d(dim // 2, f.reshape(-1))], axis=1
    )
    if cls_row:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb.astype(np.float32)


def truncated_pos_embed(dim: int, grid_freq: int, grid_time: int, time_patches: int) -> np.ndarray:
    """Patch positions (no CLS row) for an input of `time_patches` <= grid_time patches: [F*time_patches, dim]."""
    if time_patches > grid_time:
        raise ValueError(f"input has {time_patches} time patches, the positional grid only {grid_time}")
    emb = sincos_pos_embed_2d(dim, grid_freq, grid_time, cls_row=False).reshape(grid_freq, grid_time, dim)
    return emb[:, :time_patches].reshape(-1, dim)


class Tokenizer(nn.Module):
    """Patch embedding (conv, kernel = stride = patch) + fixed positions, and the learned CLS token.

    The positions are the sin-cos table of the grid, or with ``stored_positions`` a table kept with the weights as
    ``pos_embed`` [F·T, D] (freq-major, no CLS row; initialised to the sin-cos table): m2d's resampled table when
    fine-tuning beyond the pretraining length (models.positions), or a published table that is not sin-cos. It is a
    constant as in m2d (``requires_grad=False``): no gradient flows into it."""

    dim: int = 768
    patch: int = 16
    grid_freq: int = 5
    grid_time: int = 38
    dtype: jnp.dtype = jnp.float32
    stored_positions: bool = False

    @nn.compact
    def __call__(self, mel: jax.Array) -> tuple[jax.Array, jax.Array]:
        """mel [B, F, T] -> (tokens + positions [B, Fp*Tp, D] freq-major, cls token [1, 1, D])."""
        b, f, t = mel.shape
        if f != self.grid_freq * self.patch:
            raise ValueError(f"expected {self.grid_freq * self.patch} mel bins, got {f}")
        if t % self.patch:
            raise ValueError(f"time frames ({t}) must be a multiple of the patch size {self.patch}")
        # PyTorch inits this conv with xavier-uniform on its [D, p*p] view: fan_in = p*p, fan_out = D.
        conv_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
        proj = nn.Conv(
            self.dim,
            (self.patch, self.patch),
            strides=(self.patch, self.patch),
            padding="VALID",
            kernel_init=conv_init,
            bias_init=symmetric_uniform(1.0 / self.patch),
            dtype=self.dtype,
            name="proj",
        )
        x = proj(mel[..., None].astype(self.dtype))  # [B, Fp, Tp, D]
        x = x.reshape(b, -1, self.dim)
        if self.stored_positions:
            if t // self.patch > self.grid_time:
                raise ValueError(f"input has {t // self.patch} time patches, the positional grid only {self.grid_time}")
            sincos = sincos_pos_embed_2d(self.dim, self.grid_freq, self.grid_time, cls_row=False)
            table = self.param("pos_embed", lambda _, shape: jnp.asarray(sincos.reshape(shape)), sincos.shape)
            grid = jax.lax.stop_gradient(table).reshape(self.grid_freq, self.grid_time, self.dim)
            pos = grid[:, : t // self.patch].reshape(-1, self.dim)
        else:
            pos = jnp.asarray(truncated_pos_embed(self.dim, self.grid_freq, self.grid_time, t // self.patch))
        x = x + pos.astype(x.dtype)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.dim))
        return x, cls


def dense(features: int, name: str, dtype, use_bias: bool = True) -> nn.Dense:
    """Linear layer with the reference init: xavier-uniform weight, zero bias."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=xavier, dtype=dtype, name=name)


def layer_norm(name: str, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


CUDNN_SEQ_MULTIPLE = 64  # cuDNN's fused attention wants sequence lengths it supports: pad to a multiple of this
ATTN_IMPLS = ("auto", "xla", "cudnn", "")  # config.model.attn_impl; '' = jax's default (XLA's), as 'xla'


@functools.cache
def cudnn_attention_available() -> bool:
    """True on an NVIDIA GPU of compute capability >= 8.0 with a cuDNN that jax's fused attention accepts (its own
    version check, run on a tiny abstract call: nothing is compiled)."""
    device = jax.devices()[0]
    if device.platform != "gpu" or "nvidia" not in device.device_kind.lower():
        return False
    if float(getattr(device, "compute_capability", "0")) < 8.0:
        return False
    x = jax.ShapeDtypeStruct((1, CUDNN_SEQ_MULTIPLE, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(lambda q: jax.nn.dot_product_attention(q, q, q, implementation="cudnn"), x)
    except Exception:  # noqa: BLE001 -- any refusal (no cuDNN, an old one) means XLA's attention
        return False
    return True


def resolve_attn_impl(implementation: str | None, dtype, head_dim: int) -> str | None:
    """The ``jax.nn.dot_product_attention`` implementation for ``config.model.attn_impl``: 'auto' (the default) is
    cuDNN's fused flash attention where it runs these shapes -- an NVIDIA GPU (``cudnn_attention_available``), 16-bit
    compute, a head size that is a multiple of 8 up to 128 -- and XLA's everywhere else (CPU, TPU, float32); 'cudnn'
    and 'xla' force one; '' / None leave the choice to jax (XLA's). On an H200 the recipe step ran 1.28x faster with
    cuDNN (BENCHMARKS.md); both compute the same attention (tests/test_models.py)."""
    if implementation not in ATTN_IMPLS and implementation is not None:
        raise ValueError(f"config.model.attn_impl={implementation!r}: expected one of {ATTN_IMPLS}")
    if implementation != "auto":
        return implementation or None
    fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fits and cudnn_attention_available() else "xla"


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None, pad_to: int = 0, kv_lengths=None
) -> jax.Array:
    """``jax.nn.dot_product_attention`` on [B, N, H, hd] with ``resolve_attn_impl``'s implementation; with ``pad_to``
    (automatic 64 for cuDNN) the sequence is zero-padded to a multiple of it and the true length passed as
    ``key_value_seq_lengths``, so padded keys get no weight; padded query rows are dropped. The result equals the
    unpadded attention. ``kv_lengths`` [B] (optional): only the first ``kv_lengths[b]`` tokens of example b are
    attended to (padding tokens at the end get no weight)."""
    implementation = resolve_attn_impl(implementation, q.dtype, q.shape[-1])
    n = q.shape[1]
    multiple = pad_to or (CUDNN_SEQ_MULTIPLE if implementation == "cudnn" else 0)
    if not multiple or n % multiple == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation, key_value_seq_lengths=kv_lengths)
    pad = ((0, 0), (0, -n % multiple), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
    lengths = jnp.full((q.shape[0],), n, jnp.int32) if kv_lengths is None else kv_lengths
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation, key_value_seq_lengths=lengths)[:, :n]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (output channels ordered q; k; v, then heads)."""

    dim: int
    heads: int
    dtype: jnp.dtype = jnp.float32
    implementation: str | None = None  # config.model.attn_impl (see resolve_attn_impl; None = XLA's)
    pad_to: int = 0  # see attention()

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths=None) -> jax.Array:
        b, n, _ = x.shape
        qkv = dense(3 * self.dim, "qkv", self.dtype)(x).reshape(b, n, 3, self.heads, self.dim // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, hd]
        out = attention(q, k, v, self.implementation, self.pad_to, kv_lengths)
        return dense(self.dim, "proj", self.dtype)(out.reshape(b, n, self.dim))


class Mlp(nn.Module):
    dim: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(dense(self.hidden, "fc1", self.dtype)(x), approximate=False)  # exact (erf) GELU
        return dense(self.dim, "fc2", self.dtype)(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + mlp(LN(x)). No dropout, drop-path or layer-scale."""

    dim: int
    heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    attn_impl: str | None = None
    attn_pad_to: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths=None) -> jax.Array:
        x = x + Attention(self.dim, self.heads, self.dtype, self.attn_impl, self.attn_pad_to, name="attn")(
            layer_norm("norm1", self.dtype)(x), kv_lengths
        )
        return x + Mlp(self.dim, int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(
            layer_norm("norm2", self.dtype)(x)
        )


REMAT_POLICIES = {
    "": None,  # keep every activation for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute each block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


class Transformer(nn.Module):
    """`depth` pre-norm blocks followed by a final LayerNorm (eps 1e-6).

    ``remat`` ('', 'full', 'dots') rematerialises each block in the backward pass with that ``REMAT_POLICIES``
    policy: less activation memory for more compute. ``scan_layers`` runs the blocks as one ``lax.scan`` over their
    stacked weights: the step compiles one block instead of ``depth``, and XLA schedules one loop body. The
    parameters keep their per-block layout (``blocks_i``), so checkpoints, sharding rules and the converter do not
    change; the price is a stacked copy of the block weights (and of their gradients) per step, +1.2 GiB for the
    ViT-B recipe's trunks in float32 (BENCHMARKS.md). Every option gives the same numbers and parameter tree."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    attn_impl: str | None = None
    remat: str = ""
    attn_pad_to: int = 0
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, return_layers: bool = False, kv_lengths=None):
        """x [B, L, D] -> [B, L, D] after the final norm; with return_layers also the list of every block's
        output (the last one after the final norm), as the embedding extractor needs. ``kv_lengths`` [B]: tokens from
        ``kv_lengths[b]`` on are padding that no token attends to (see ``attention``)."""
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"config.model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.scan_layers and not self.is_initializing():
            x, layers = self._scan(x, return_layers, kv_lengths)
        else:
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat]) if self.remat else Block
            layers = []
            for i in range(self.depth):
                x = block(self.dim, self.heads, self.mlp_ratio, self.dtype, self.attn_impl, self.attn_pad_to,
                          name=f"blocks_{i}")(x, kv_lengths)  # fmt: skip
                layers.append(x)
        x = layer_norm("norm", self.dtype)(x)
        if return_layers:
            return x, layers[:-1] + [x]
        return x

    def _scan(self, x: jax.Array, return_layers: bool, kv_lengths=None) -> tuple[jax.Array, list[jax.Array]]:
        """The blocks as one scan over their weights stacked on a leading [depth] axis."""
        params = self.variables["params"]
        stacked = jax.tree.map(lambda *w: jnp.stack(w), *(params[f"blocks_{i}"] for i in range(self.depth)))
        # Unbound (parent=None): applied to each layer's weights inside the scan, registers no submodule.
        block = Block(self.dim, self.heads, self.mlp_ratio, self.dtype, self.attn_impl, self.attn_pad_to, parent=None)

        def body(h, w):
            h = block.apply({"params": w}, h, kv_lengths)
            return h, (h if return_layers else None)

        if self.remat:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        x, ys = jax.lax.scan(body, x, stacked)
        return x, ([ys[i] for i in range(self.depth)] if return_layers else [])


# How the ViT runs, not what it computes (the parameters and the step stay the same): may change when a run resumes.
RESUME_MAY_CHANGE = ("model.attn_impl", "model.remat", "model.attn_pad_to", "model.scan_layers")


def check_vit_config(config) -> None:
    """ConfigError naming the key when ``config.model`` / ``config.audio`` cannot make a ViT: the patch, mel bins and
    crop a multiple of it, widths divisible by the heads (``encoder`` and, where present, ``predictor``), a known
    attention implementation."""
    m, a = config.model, config.audio
    if m.attn_impl not in ATTN_IMPLS:
        raise ConfigError(f"config.model.attn_impl={m.attn_impl!r}: choose one of {', '.join(map(repr, ATTN_IMPLS))}")
    check_int(config, "model.patch", 1)
    for key in ("n_mels", "crop_frames"):
        if a[key] < m.patch or a[key] % m.patch:
            raise ConfigError(
                f"config.audio.{key}={a[key]}: must be a positive multiple of config.model.patch={m.patch} (the "
                "log-mel is cut into patch x patch tokens)"
            )
    for trunk in ("encoder", "predictor"):
        if trunk not in m:
            continue
        for key in ("dim", "depth", "heads"):
            check_int(config, f"model.{trunk}.{key}", 1)
        t = m[trunk]
        if t.dim % t.heads:
            raise ConfigError(
                f"config.model.{trunk}.heads={t.heads} does not divide config.model.{trunk}.dim={t.dim}: choose a "
                "divisor of the width"
            )
        check_number(config, f"model.{trunk}.mlp_ratio", *POSITIVE)
