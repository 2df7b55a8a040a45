"""Independent float64 NumPy reference for the encoder, predictor and cls head (SPEC §2–§3).

Written from SPEC.md alone, not from matpac_jax, so that tests comparing the two catch bugs in either.
Parameters are Flax param dicts converted with `to_numpy`: Dense kernels are [in, out], the patch conv kernel
is [p, p, 1, D] over (freq, time), LayerNorm holds 'scale' and 'bias'. Token order is freq-major
(index = f·T + t) and every sequence that carries a CLS token has it first.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.special import erf

LN_EPS = 1e-6


def to_numpy(tree):
    """Nested mapping of arrays -> nested dict of float64 numpy arrays."""
    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


# --- positions ------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[P] -> [P, dim] = [sin(p·ω), cos(p·ω)], ω_i = 10000^(-i/(dim/2)), i < dim/2."""
    omega = 10000.0 ** (-np.arange(dim // 2) / (dim // 2))
    angles = np.outer(np.asarray(positions, np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_f: int, grid_t: int) -> np.ndarray:
    """[1 + F·T, dim]: a zero CLS row, then per token (f, t) = divmod(index, T) the time code (first dim/2)
    and the freq code (last dim/2), each with ω_i = 10000^(-i/(dim/4))."""
    f, t = np.divmod(np.arange(grid_f * grid_t), grid_t)
    emb = np.concatenate([sincos_1d(dim // 2, t), sincos_1d(dim // 2, f)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def patch_positions(dim: int, grid_f: int, grid_t: int, time_patches: int) -> np.ndarray:
    """Patch-token positions (no CLS row) of an input truncated to `time_patches`: [F·time_patches, dim]."""
    pos = sincos_pos_embed_2d(dim, grid_f, grid_t)[1:].reshape(grid_f, grid_t, dim)
    return pos[:, :time_patches].reshape(-1, dim)


# --- layers ---------------------------------------------------------------------------------------------


def dense(x: np.ndarray, p: Mapping) -> np.ndarray:
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _ln(x: np.ndarray, p: Mapping) -> np.ndarray:
    return layer_norm(x, p["scale"], p["bias"])


def gelu_exact(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(x, qkv_w, qkv_b, proj_w, proj_b, heads: int) -> np.ndarray:
    """Multi-head self-attention; qkv output channels ordered [3 (q, k, v), heads, head_dim]."""
    b, n, d = x.shape
    hd = d // heads
    qkv = (x @ qkv_w + qkv_b).reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
    q, k, v = qkv
    weights = softmax(q @ k.transpose(0, 1, 3, 2) * hd**-0.5)  # [B, H, N, N]
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, d)  # heads concatenated
    return out @ proj_w + proj_b


def block(x: np.ndarray, p: Mapping, heads: int) -> np.ndarray:
    """Pre-norm block: x + attn(LN(x)); x + fc2(gelu(fc1(LN(x))))."""
    a = p["attn"]
    x = x + attention(
        _ln(x, p["norm1"]), a["qkv"]["kernel"], a["qkv"]["bias"], a["proj"]["kernel"], a["proj"]["bias"], heads
    )
    return x + dense(gelu_exact(dense(_ln(x, p["norm2"]), p["mlp"]["fc1"])), p["mlp"]["fc2"])


def transformer(x: np.ndarray, p: Mapping, heads: int, depth: int | None = None, return_layers: bool = False):
    """`depth` blocks (default: all blocks_i in p) then the final LayerNorm 'norm'. With return_layers also
    every block's output, the last one after the final norm."""
    depth = sum(k.startswith("blocks_") for k in p) if depth is None else depth
    layers = []
    for i in range(depth):
        x = block(x, p[f"blocks_{i}"], heads)
        layers.append(x)
    x = _ln(x, p["norm"])
    return (x, layers[:-1] + [x]) if return_layers else x


# --- model pieces ---------------------------------------------------------------------------------------


def patch_embed(mel: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """mel [B, F, T] -> [B, (F/p)·(T/p), D]: each p×p patch flattened in (freq, time) order times the kernel
    viewed as [p·p, D]; tokens freq-major."""
    b, f, t = mel.shape
    p, d = kernel.shape[0], kernel.shape[-1]
    patches = mel.reshape(b, f // p, p, t // p, p).transpose(0, 1, 3, 2, 4).reshape(b, -1, p * p)
    return patches @ kernel.reshape(p * p, d) + bias


def tokenize(mel: np.ndarray, p: Mapping, grid_f: int, grid_t: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizer params {'proj', 'cls_token'} -> (patch tokens + positions [B, N, D], cls token [1, 1, D])."""
    kernel = p["proj"]["kernel"]
    tokens = patch_embed(mel, kernel, p["proj"]["bias"])
    pos = patch_positions(kernel.shape[-1], grid_f, grid_t, mel.shape[2] // kernel.shape[0])
    return tokens + pos, p["cls_token"]


def prepend_cls(cls: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    return np.concatenate([np.broadcast_to(cls, (tokens.shape[0], 1, tokens.shape[2])), tokens], axis=1)


def gather(tokens: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """tokens [B, N, D], ids [B, n] -> [B, n, D]."""
    return np.stack([tokens[i, ids[i]] for i in range(tokens.shape[0])])


def cls_head(x: np.ndarray, p: Mapping) -> np.ndarray:
    """MLP D->h (GELU) ->h (GELU) ->b, L2-normalise, weight-normalised linear b->P without bias:
    w_j = g_j · v_j / ||v_j||, the norm over the input dim per prototype."""
    h = gelu_exact(dense(x, p["mlp_0"]))
    h = gelu_exact(dense(h, p["mlp_2"]))
    h = dense(h, p["mlp_4"])
    h = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    v = p["weight_v"]  # [b, P]
    return h @ (v * p["weight_g"] / np.linalg.norm(v, axis=0))


def predictor(
    latents: np.ndarray, ids_keep: np.ndarray, ids_mask: np.ndarray, p: Mapping, heads: int, grid_f: int, grid_t: int
) -> np.ndarray:
    """latents [B, 1+Nv, D] (CLS first) -> [K, B, Nm, D_out] for the positions ids_mask, in that order."""
    x = dense(latents, p["embed"])  # [B, 1+Nv, d]
    b, d = x.shape[0], x.shape[-1]
    full = np.tile(p["mask_token"].reshape(1, 1, d), (b, grid_f * grid_t, 1))
    for i in range(b):
        full[i, ids_keep[i]] = x[i, 1:]
    seq = np.concatenate([x[:, :1], full], axis=1) + sincos_pos_embed_2d(d, grid_f, grid_t)
    seq = transformer(seq, p["trunk"], heads)
    masked = gather(seq[:, 1:], ids_mask)
    k = sum(name.startswith("heads_") for name in p)
    return np.stack([dense(masked, p[f"heads_{j}"]) for j in range(k)])
