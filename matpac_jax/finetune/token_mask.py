"""m2d's training-time token masking (``--training_mask 0.5`` in both AudioSet recipes), drawn as jittable arrays.

Both recipes pass ``--training_mask 0.5`` (nttcslab/m2d util/ft-as2m.sh:25, util/ft-as20k.sh:19; EVAR reads it,
eval-audio-repr finetune.py:359, into the runtime's config). ``RuntimeM2D`` then switches its encoder to
``random_structured_mask`` (m2d/runtime_audio.py:225, 248-249) and encodes with ``mask_ratio = training_mask`` while
training and ``0.0`` in evaluation (runtime_audio.py:331-333: no masking at evaluation). The encoder
(patch_m2d.diff:2904-3024, ``M2DEncoderViT``) adds the positions to the patch tokens *before* masking
(diff:2994-3004), keeps only the visible tokens (diff:2972-2973), then prepends the CLS token with its position
(diff:3007-3009): CLS always stays, every token keeps its own position. The head averages the visible tokens
(runtime_audio.py:333 drops CLS; evar/ar_m2d.py:72 takes the mean).

What ``random_structured_mask(shape=(B, F, T), mask_ratio=r)`` draws (patch_m2d.diff:2245-2266), F x T the patch
grid (5 x 62 for 992 frames):

1. NF = min(F − 1, int(F (r + 1/F) u)), one u ~ U[0, 1) for the whole batch (diff:2251-2252); then
   NT = int(T · max(r + 0.5/T − NF/F, 0)) (diff:2253-2254): the same NF and NT for every example.
2. For each example its own NF random frequency rows and NT random time columns are marked (diff:2257-2261,
   ``torch.randperm`` per example).
3. ``ids_shuffle = argsort(mark, descending=True)``, ``len_keep = (F − NF)(T − NT)`` (diff:2263-2264), and the encoder
   keeps ``ids_shuffle[:, :len_keep]`` (diff:2972-2973). The *marked* tokens sort first, so the **visible** tokens are
   the marked ones in index order (frequency-major): the first ``len_keep`` of them when there are more (NF = 3),
   followed by the lowest-index unmarked ones when there are fewer (NF = 1, 2). The code keeps what it marks; its
   "mask" name suggests the opposite, and the two readings agree only for NF = 0 (155 marked, 155 kept). Equal keys
   are taken in index order, which is what torch's sort of these short rows does on CPU (a stable sort) and, as we
   read its CUDA radix / merge sort for rows of up to 4,096 keys, on GPU (not checked against torch here). The number
   visible, ``len_keep``, is the unmarked count; the number dropped is F·T − len_keep.

For 5 x 62 at r = 0.5: NF ∈ {0, 1, 2} with probability 2/7 each and 3 with 1/7; NT = 31, 19, 6, 0; 155, 172, 168, 124
tokens visible of 310 (50.0, 44.5, 45.8, 60.0 % dropped; 48.7 % on average). ``keep_table`` gives these numbers for
any grid.

Static shapes: the visible count varies per step, so ``structured_keep`` returns the token ids padded to the largest
reachable ``len_keep`` (172 here, against 310 without masking) and the true count; the encoder attends only to the
first ``1 + len_keep`` tokens (CLS and the visible ones; ``kv_lengths``) and the head averages only the visible ones,
which is the published computation exactly (the trunk is permutation-equivariant, the mean invariant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def keep_table(grid_freq: int, grid_time: int, ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P(NF = k), NT, len_keep), each [grid_freq] indexed by NF = k, as ``random_structured_mask`` computes them
    (in Python floats, as its NumPy / Python arithmetic). Raises when the ratio can leave no token visible."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"config.finetune.training_mask={ratio}: expected a ratio in (0, 1), or 0 for no masking")
    scale = grid_freq * (ratio + 1.0 / grid_freq)  # NF = int(scale * u), u ~ U[0, 1)
    prob = np.array([max(0.0, min(1.0, (k + 1) / scale) - k / scale) for k in range(grid_freq)])
    prob[-1] += max(0.0, 1.0 - grid_freq / scale)  # NF >= F - 1 is clipped to F - 1
    nt = np.array([int(grid_time * max(ratio + 0.5 / grid_time - k / grid_freq, 0.0)) for k in range(grid_freq)])
    keep = (grid_freq - np.arange(grid_freq)) * (grid_time - nt)
    if keep[prob > 0].min() < 1:
        raise ValueError(
            f"config.finetune.training_mask={ratio} can mask every token of a {grid_freq}x{grid_time} grid"
        )
    return prob, nt, keep


def max_keep(grid_freq: int, grid_time: int, ratio: float) -> int:
    """The largest number of visible tokens a step can have: the padded length of ``structured_keep``'s ids."""
    prob, _, keep = keep_table(grid_freq, grid_time, ratio)
    return int(keep[prob > 0].max())


def _random_subset(key: jax.Array, shape: tuple[int, int], count: jax.Array) -> jax.Array:
    """[B, n] bool: per row, ``count`` entries chosen uniformly without replacement (``randperm(n)[:count]``)."""
    noise = jax.random.uniform(key, shape)
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return rank < count


def structured_mark(key: jax.Array, batch: int, grid_freq: int, grid_time: int, ratio: float):
    """(mark [B, F, T] bool: the marked rows and columns, NF int32 scalar), steps 1-2 of the module docstring."""
    _, nt_table, _ = keep_table(grid_freq, grid_time, ratio)
    k_nf, k_rows, k_cols = jax.random.split(key, 3)
    scale = grid_freq * (ratio + 1.0 / grid_freq)
    nf = jnp.minimum(grid_freq - 1, jnp.floor(scale * jax.random.uniform(k_nf, ())).astype(jnp.int32))
    nt = jnp.asarray(nt_table, jnp.int32)[nf]
    rows = _random_subset(k_rows, (batch, grid_freq), nf)
    cols = _random_subset(k_cols, (batch, grid_time), nt)
    return rows[:, :, None] | cols[:, None, :], nf


def structured_keep(key: jax.Array, batch: int, grid_freq: int, grid_time: int, ratio: float):
    """(ids [B, max_keep] int32, n_keep int32 scalar): the first ``n_keep`` ids of each row are its visible tokens
    (indices into the frequency-major F*T patch tokens) in the order m2d keeps them; the rest is padding."""
    mark, nf = structured_mark(key, batch, grid_freq, grid_time, ratio)
    _, _, keep = keep_table(grid_freq, grid_time, ratio)
    flat = mark.reshape(batch, grid_freq * grid_time).astype(jnp.int32)
    ids = jnp.argsort(-flat, axis=1, stable=True)  # marked first, ties in index order (step 3)
    return ids[:, : max_keep(grid_freq, grid_time, ratio)].astype(jnp.int32), jnp.asarray(keep, jnp.int32)[nf]


def expected_masked_fraction(grid_freq: int, grid_time: int, ratio: float) -> float:
    """E[dropped tokens / F·T] over NF."""
    prob, _, keep = keep_table(grid_freq, grid_time, ratio)
    return float(np.sum(prob * (1.0 - keep / (grid_freq * grid_time))))
