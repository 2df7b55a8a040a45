"""The S-SONDO student's input: clips of the corpus the teacher pass embedded, each with its teacher embedding.

Pipeline (``distill_dataset``)::

    indices: BalancedIndices(k-means assignments, seed)   (P(i) ∝ 1 / |cluster(i)|, with replacement)
          or EpochShuffle(range(N), seed)                  (every clip once per epoch)
      -> load record i, check its key against the teacher pass's keys.json, first ``seconds`` (zero-padded),
         resampled to the student's rate -> {'audio': int16 [samples], 'target': [D] (the pass's dtype)}
      -> [process_index::process_count] -> batch(B_local) -> mp_prefetch (workers > 0)

The student reads the record corpus the teacher pass read (``config.data.train``, same shards in the same order:
record ``i`` is row ``i`` of ``embeddings.npy``), so no key lookup is needed; the keys are still compared on every
read, and a mismatch (another corpus, re-ordered shards) stops with both keys named. A corpus at the student's rate
(32 kHz) is read as is; another rate is resampled on the host (soxr HQ). The sequence depends only on the seed and
the element's position, so grain's iterator state (in every checkpoint) resumes it exactly.
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np

from matpac_jax.audio.io import to_int16
from matpac_jax.data.pipeline import EpochShuffle, expand_files, worker_init
from matpac_jax.data.records import decode_pcm
from matpac_jax.distill.sampler import BalancedIndices
from matpac_jax.distill.teacher_pass import fit_clip


def load_targets(teacher_dir: str, balanced: bool) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """(keys, embeddings [N, D] memmap, k-means assignments [N] or None) of a finished teacher pass."""
    paths = {name: os.path.join(teacher_dir, name) for name in ("keys.json", "embeddings.npy", "clusters.npz")}
    needed = ("keys.json", "embeddings.npy", "clusters.npz") if balanced else ("keys.json", "embeddings.npy")
    missing = [name for name in needed if not os.path.exists(paths[name])]
    if missing:
        raise ValueError(
            f"config.teacher.embeddings={teacher_dir!r} lacks {', '.join(missing)}: run the teacher pass into it "
            "(python -m matpac_jax.main --config=configs/ssondo.py:teacher_pass --workdir=DIR ...)"
            + ("" if "clusters.npz" not in missing or len(missing) > 1 else " with clusters, or set distill.balanced")
        )
    with open(paths["keys.json"]) as f:
        keys = json.load(f)
    emb = np.load(paths["embeddings.npy"], mmap_mode="r")
    assignments = np.load(paths["clusters.npz"])["assignments"] if balanced else None
    if len(keys) != len(emb) or (assignments is not None and len(assignments) != len(emb)):
        raise ValueError(f"{teacher_dir}: {len(keys)} keys, {len(emb)} embeddings, assignments do not match")
    return keys, emb, assignments


class _LoadClip:
    """``map`` transform: record index -> {'audio': int16 [samples], 'target': [D]}; opens its files lazily (once per
    worker process)."""

    def __init__(self, paths: list[str], teacher_dir: str, rate: int, seconds: float):
        self.paths, self.teacher_dir, self.rate, self.seconds = paths, teacher_dir, rate, seconds
        self._open = None  # (source, keys, embeddings), set at once on first use

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open = None

    def __call__(self, index: int) -> dict:
        if self._open is None:
            keys, emb, _ = load_targets(self.teacher_dir, balanced=False)
            self._open = (grain.sources.ArrayRecordDataSource(self.paths), keys, emb)
        source, keys, emb = self._open
        header, pcm = decode_pcm(source[index])
        if header["key"] != keys[index]:
            raise ValueError(
                f"record {index} of config.data.train is {header['key']!r}, the teacher pass embedded "
                f"{keys[index]!r} there: give the corpus (same shards) the teacher pass read"
            )
        wave = fit_clip(pcm, header["sample_rate"], self.rate, self.seconds)
        return {"audio": to_int16(wave), "target": np.asarray(emb[index])}


def distill_dataset(
    files: list[str] | str,
    teacher_dir: str,
    *,
    global_batch: int,
    sample_rate: int,
    seconds: float,
    seed: int,
    balanced: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    workers: int = 0,
    prefetch_buffer: int = 2,
) -> grain.IterDataset:
    """Infinite dataset of this process's batches {'audio': int16 [B_local, seconds × rate], 'target': [B_local, D]}."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    paths = expand_files(files)
    keys, _, assignments = load_targets(teacher_dir, balanced)
    n = len(grain.sources.ArrayRecordDataSource(paths))
    if n != len(keys):
        raise ValueError(
            f"config.data.train holds {n} records, the teacher pass in {teacher_dir} embedded {len(keys)}: give the "
            "corpus the teacher pass read"
        )
    if balanced:
        indices = BalancedIndices(assignments, seed)
    else:
        indices = EpochShuffle(grain.MapDataset.range(n), seed)
    ds = indices.map(_LoadClip(paths, teacher_dir, sample_rate, seconds))[process_index::process_count]
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # see data.pipeline: threads cost more
    it = ds.to_iter_dataset(read_options=read_options).batch(global_batch // process_count, drop_remainder=True)
    if workers > 0:
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch_buffer)
        it = it.mp_prefetch(options, worker_init_fn=worker_init)
    return it
