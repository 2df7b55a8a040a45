"""The grain input pipeline for pretraining: ArrayRecord shards of clip records -> batches of random crops.

Pipeline (``pretrain_dataset``)::

    ArrayRecordDataSource(sorted files) -> MapDataset.source -> shuffle -> repeat() -> decode + random crop
      -> [process_index::process_count] -> to_iter_dataset -> skip short clips -> batch(B_local) -> mp_prefetch

Epochs and seeds (grain 0.2.x): ``shuffle`` before an infinite ``repeat`` reshuffles every epoch, epoch ``e`` using the
permutation seed ``shuffle_seed + e``; the crop offset of element ``i`` of the repeated stream comes from
``random_map``'s Philox generator keyed by ``(crop_seed, i)``, so it differs per epoch and does not depend on the
number of processes or workers. ``shuffle_seed`` and ``crop_seed`` are hashed from ``seed`` (``SeedSequence``), so runs
with seeds ``s`` and ``s + 1`` do not share epoch permutations. The batch sequence is a deterministic function of
(files, seed, global_batch, crop, process_count, workers): ``mp_prefetch`` gives each worker a slice of the element
stream and batches within a worker, so changing ``workers`` changes which elements share a batch (not the crops).

Short clips: ``'pad'`` zero-pads them at the end; ``'skip'`` drops them. Dropped clips are not counted here (a count
would not survive worker processes or a restore): the number of clips shorter than a crop is a property of the data,
read from the shard manifest / headers. A process that reads as many consecutive short clips as the dataset has records
raises (every clip shorter than a crop).

Resume: the iterator's ``get_state()`` is a small JSON-able dict; ``set_state`` on a fresh iterator of the same
pipeline (same arguments, same worker count) continues with exactly the batches that would have followed.
"""

from __future__ import annotations

import glob

import grain
import numpy as np

from matpac_jax.audio.io import from_int16
from matpac_jax.data.records import decode_pcm

SHORT_CLIPS = ("skip", "pad")


def expand_files(files: list[str] | str) -> list[str]:
    """Sorted, de-duplicated paths matching a glob or a list of globs / paths; ValueError naming an empty pattern."""
    patterns = [files] if isinstance(files, str) else list(files)
    if not patterns:
        raise ValueError("config.data.train: no files given")
    paths = set()
    for pattern in patterns:
        matches = glob.glob(pattern)
        if not matches:
            raise ValueError(f"config.data.train: no files match {pattern!r}")
        paths.update(matches)
    return sorted(paths)


class _DecodeCrop:
    """``random_map`` transform: record bytes -> ``{'audio': float32 [crop]}``, or None for a short clip to skip."""

    def __init__(self, crop: int, pad: bool):
        self.crop, self.pad = crop, pad

    def __call__(self, data: bytes, rng: np.random.Generator) -> dict | None:
        pcm = decode_pcm(data)[1]  # int16: crop first, convert only the crop
        n = pcm.shape[0]
        if n < self.crop:
            if not self.pad:
                return None
            return {"audio": from_int16(np.pad(pcm, (0, self.crop - n)))}
        start = int(rng.integers(0, n - self.crop + 1))
        return {"audio": from_int16(pcm[start : start + self.crop])}


class _SkipShort:
    """Filter dropping skipped (None) clips; raises after ``limit`` consecutive ones (every clip too short)."""

    def __init__(self, limit: int, crop: int):
        self.limit, self.crop, self.run = limit, crop, 0

    def __call__(self, element: dict | None) -> bool:
        if element is not None:
            self.run = 0
            return True
        self.run += 1
        if self.run >= self.limit:
            raise ValueError(
                f"short_clips='skip': {self.run} consecutive clips are shorter than a crop of {self.crop} samples "
                "(every clip shorter than a crop?): use short_clips='pad' or a shorter config.audio.crop_frames"
            )
        return False


def pretrain_dataset(
    files: list[str] | str,
    *,
    global_batch: int,
    crop_samples: int,
    seed: int,
    short_clips: str = "skip",
    process_index: int | None = None,
    process_count: int | None = None,
    workers: int = 0,
    prefetch_buffer: int = 2,
    read_threads: int | None = None,
) -> grain.IterDataset:
    """Infinite dataset of this process's batches ``{'audio': float32 [global_batch / process_count, crop_samples]}``.

    ``files``: a glob or a list of globs / paths of ArrayRecord shards of clip records. ``workers > 0`` decodes in
    that many processes (``mp_prefetch``, ``prefetch_buffer`` batches buffered per worker). ``read_threads`` are
    grain's per-process read/decode threads: by default 0 with worker processes (the processes give the parallelism)
    and 1 without. grain's default of 16 threads costs ~2x the CPU per crop (bench/input_pipeline.py).
    """
    if short_clips not in SHORT_CLIPS:
        raise ValueError(f"short_clips={short_clips!r}: expected one of {', '.join(SHORT_CLIPS)}")
    if crop_samples < 1 or global_batch < 1 or workers < 0 or prefetch_buffer < 1:
        raise ValueError(f"bad {crop_samples=}, {global_batch=}, {workers=} or {prefetch_buffer=}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} out of range for process_count={process_count}")
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    paths = expand_files(files)
    source = grain.sources.ArrayRecordDataSource(paths)
    if len(source) == 0:
        raise ValueError(f"config.data.train: {len(paths)} files matching {files!r} hold no records")
    shuffle_seed, crop_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    ds = (
        grain.MapDataset.source(source)
        .shuffle(seed=shuffle_seed)
        .repeat()
        .random_map(_DecodeCrop(crop_samples, short_clips == "pad"), seed=crop_seed)
    )
    ds = ds[process_index::process_count]
    if read_threads is None:
        read_threads = 0 if workers > 0 else 1
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64 if read_threads else 0)
    it = ds.to_iter_dataset(read_options=read_options, allow_nones=True).filter(_SkipShort(len(source), crop_samples))
    it = it.batch(global_batch // process_count, drop_remainder=True)
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch_buffer))
    return it
