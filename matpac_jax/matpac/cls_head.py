"""DINO-style unsupervised classification head (SPEC §3).

MLP D->h->h->b with exact GELU, L2-normalise, then a weight-normalised linear b->P without bias whose norm scale g
is trainable (init 1): w_j = g_j · v_j / ||v_j||.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from matpac_jax.models.vit import symmetric_uniform

# timm normal_002_(std=.02) truncates at ±2 in absolute units: effectively an untruncated N(0, 0.02²).
normal_002 = nn.initializers.normal(0.02)


class ClsHead(nn.Module):
    hidden: int = 2048
    bottleneck: int = 256
    num_prototypes: int = 2048
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> logits [..., P] (before the temperature)."""
        for i, width in enumerate((self.hidden, self.hidden)):
            x = nn.Dense(width, kernel_init=normal_002, dtype=self.dtype, name=f"mlp_{2 * i}")(x)
            x = nn.gelu(x, approximate=False)
        x = nn.Dense(self.bottleneck, kernel_init=normal_002, dtype=self.dtype, name="mlp_4")(x)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
        v = self.param(
            "weight_v",
            symmetric_uniform(self.bottleneck**-0.5),  # torch Linear default init
            (self.bottleneck, self.num_prototypes),
        )
        g = self.param("weight_g", nn.initializers.ones, (self.num_prototypes,))
        w = v * (g / jnp.linalg.norm(v, axis=0))
        return x @ w
