"""Predictor (SPEC §3): student latents of visible tokens -> predictions for the masked positions.

Linear D->d, learned mask token, fixed 2-D sin-cos positions (d-dim), `depth` blocks, final LayerNorm, then
K linear heads d->D. K = 1 is the MATPAC head; K = 5 the MATPAC++ Multiple Choice Learning hypotheses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from matpac_jax.models.vit import Transformer, dense, sincos_pos_embed_2d


class Predictor(nn.Module):
    dim: int = 512
    out_dim: int = 768
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0
    num_heads_out: int = 5  # K hypotheses (1 = MATPAC)
    grid_freq: int = 5
    grid_time: int = 38
    dtype: jnp.dtype = jnp.float32
    attn_impl: str | None = None
    remat: str = ""  # see vit.Transformer
    attn_pad_to: int = 0  # see vit.attention
    scan_layers: bool = False  # see vit.Transformer

    @nn.compact
    def __call__(self, latents: jax.Array, ids_keep: jax.Array, ids_mask: jax.Array) -> jax.Array:
        """latents [B, 1+Nv, D] (CLS first); ids_keep [B, Nv], ids_mask [B, Nm] index the N = F*T positions.

        Returns the K hypotheses for the masked positions, in the order of ids_mask: [K, B, Nm, out_dim].
        """
        b, n_vis = ids_keep.shape
        n = self.grid_freq * self.grid_time
        x = dense(self.dim, "embed", self.dtype)(latents)  # [B, 1+Nv, d]
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.dim))
        # Put the visible latents back in place; every other position holds the mask token.
        full = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n, self.dim))
        full = full.at[jnp.arange(b)[:, None], ids_keep].set(x[:, 1:])
        seq = jnp.concatenate([x[:, :1], full], axis=1)  # [B, 1+N, d]
        seq = seq + jnp.asarray(sincos_pos_embed_2d(self.dim, self.grid_freq, self.grid_time), seq.dtype)
        seq = Transformer(
            self.dim,
            self.depth,
            self.heads,
            self.mlp_ratio,
            self.dtype,
            self.attn_impl,
            self.remat,
            self.attn_pad_to,
            self.scan_layers,
            name="trunk",
        )(seq)
        masked = jnp.take_along_axis(seq[:, 1:], ids_mask[..., None], axis=1)  # [B, Nm, d]
        return jnp.stack([dense(self.out_dim, f"heads_{k}", self.dtype)(masked) for k in range(self.num_heads_out)])
