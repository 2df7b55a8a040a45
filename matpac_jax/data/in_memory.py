"""An in-memory crop batcher for small corpora (the demo): deterministic batches as a function of the step.

Batch t is drawn from epoch permutations of the clips with a seed derived from (seed, t), so a run resumed at any
step sees exactly the batches of an uninterrupted run. Each process keeps its own slice of the global batch.
"""

from __future__ import annotations

import jax
import numpy as np


class CropBatcher:
    def __init__(
        self,
        waves: np.ndarray,
        crop_samples: int,
        global_batch: int,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
        targets: np.ndarray | None = None,
    ):
        """``targets`` [clips, C] (optional): each batch also holds the rows of its clips as 'targets' (float32)."""
        if waves.ndim != 2:
            raise ValueError(f"waves must be [clips, samples], got shape {waves.shape}")
        if waves.shape[1] < crop_samples:
            raise ValueError(
                f"clips have {waves.shape[1]} samples, shorter than a crop of {crop_samples}: "
                "use longer clips or a shorter config.audio.crop_frames"
            )
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch % self.process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {self.process_count} processes")
        self.waves, self.crop, self.batch, self.seed = waves, crop_samples, global_batch, seed
        self.targets = None if targets is None else np.asarray(targets, np.float32)

    def __call__(self, step: int) -> dict:
        """This process's rows of global batch `step`: {'audio': float32 [B / processes, crop_samples]} (and
        'targets' [B / processes, C] with ``targets``)."""
        n = len(self.waves)
        first = step * self.batch
        positions = np.arange(first, first + self.batch)
        epochs, offsets = np.divmod(positions, n)
        idx = np.empty(self.batch, np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(e)]).permutation(n)
            idx[epochs == e] = perm[offsets[epochs == e]]
        starts = np.random.default_rng([self.seed, 1_000_003, step]).integers(
            0, self.waves.shape[1] - self.crop + 1, size=self.batch
        )
        local = self.batch // self.process_count
        rows = slice(self.process_index * local, (self.process_index + 1) * local)
        audio = np.stack([self.waves[i, s : s + self.crop] for i, s in zip(idx[rows], starts[rows], strict=True)])
        out = {"audio": audio.astype(np.float32)}
        if self.targets is not None:
            out["targets"] = self.targets[idx[rows]]
        return out
