"""The grain input pipeline for pretraining: ArrayRecord shards of clip records -> batches of random int16 crops.

Pipeline (``pretrain_dataset``)::

    ArrayRecordDataSource(expand_files) -> MapDataset.source -> EpochShuffle (infinite) -> decode + random crop
      -> [process_index::process_count] -> to_iter_dataset -> skip short clips -> batch(B_local) -> mp_prefetch

Batches hold int16 PCM (``{'audio': int16 [B_local, crop]}``): half the bytes of float32 to move between worker
processes and to the device; the train step scales them to float (``/ 32767``, as ``from_int16``) on device.

Epochs and seeds: element ``i`` of the infinite stream is record ``perm_e[i % n]`` of epoch ``e = i // n``, where
``perm_e = default_rng([shuffle_seed, e]).permutation(n)`` is computed once per epoch (``EpochShuffle``; grain's own
``shuffle`` evaluates a keyed index permutation per element, which cost ~0.2 CPU-ms per record, a third of the
pipeline). The crop offset of element ``i`` comes from ``random_map``'s Philox generator keyed by ``(crop_seed, i)``,
so it differs per epoch and does not depend on the number of processes or workers. ``shuffle_seed`` and ``crop_seed``
are hashed from ``seed`` (``SeedSequence``), so runs with seeds ``s`` and ``s + 1`` share no permutation. The batch
sequence is a deterministic function of (files, seed, global_batch, crop, process_count, workers): ``mp_prefetch``
gives each worker a slice of the element stream and batches within a worker, so changing ``workers`` changes which
elements share a batch (not the crops).

Short clips: ``'pad'`` zero-pads them at the end; ``'skip'`` drops them. Dropped clips are not counted here (a count
would not survive worker processes or a restore): the number of clips shorter than a crop is a property of the data,
read from the shard manifest / headers. A process that reads as many consecutive short clips as the dataset has records
raises (every clip shorter than a crop).

Files (``expand_files``): globs, paths, or the output folder of ``python -m matpac_jax.data.prepare`` (or its
``manifest.json``), which stands for exactly the manifest's shards; every shard is checked to be a readable ArrayRecord
file before training starts. Worker processes exit when the trainer is gone, even when it was killed with SIGKILL.

tfds: instead of files, a random-access source of int16 PCM clips (``tfds_source.TfdsAudioSource``: a split of a tfds
dataset prepared in ArrayRecord format, read without TensorFlow) goes through the same shuffle, crop, process split,
batching, workers and iterator state. ``train_input(config)`` gives what ``config.data`` names: its files (source
'records') or its tfds split (source 'tfds').

Resume: the iterator's ``get_state()`` is a small JSON-able dict; ``set_state`` on a fresh iterator of the same
pipeline (same arguments, same worker count) continues with exactly the batches that would have followed.
"""

from __future__ import annotations

import ctypes
import glob
import multiprocessing
import os
import signal
import sys
import threading
import time

import grain
import numpy as np

from matpac_jax.data.prepare import manifest_shards
from matpac_jax.data.records import check_shard, decode_pcm
from matpac_jax.data.shm_batches import PooledBatch, enable_pool
from matpac_jax.data.tfds_source import TfdsAudioSource

SHORT_CLIPS = ("skip", "pad")


def _manifest_paths(pattern: str, key: str) -> list[str]:
    """The shards a prepare manifest lists (``pattern``: its folder or its ``manifest.json``), each checked to hold
    the manifest's record count; ValueError naming ``key`` and the missing or mismatched shard."""
    try:
        listed = manifest_shards(pattern)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    for path, clips in listed:
        if not os.path.isfile(path):
            raise ValueError(
                f"{key}: {path}, listed in the manifest of {pattern!r}, is missing: rerun "
                "python -m matpac_jax.data.prepare with the same flags to rebuild it"
            )
        found = check_shard(path)
        if found != clips:
            raise ValueError(
                f"{key}: {path} holds {found} records, its manifest says {clips}: the shard was replaced "
                "or the manifest is stale; rerun python -m matpac_jax.data.prepare with the same flags"
            )
    return [path for path, _ in listed]


def expand_files(files: list[str] | str, key: str = "config.data.train") -> list[str]:
    """Sorted, de-duplicated shard paths of a glob, a list of globs / paths, or a prepare output.

    An entry that is a folder, or a ``.json`` file, is a prepare manifest (``<output>`` or ``<output>/manifest.json``)
    and stands for exactly the shards it lists (not the other files of the folder), each checked to hold the record
    count the manifest says. Every path is checked to be a readable ArrayRecord file (``records.check_shard``: its
    footer and index, so a truncated or foreign file is named here rather than failing inside grain). ValueError
    naming ``key`` (the config key that gave ``files``), the pattern or the file, and what to do.
    """
    patterns = [files] if isinstance(files, str) else list(files)
    if not patterns:
        raise ValueError(f"{key}: no files given")
    paths, checked = set(), set()
    for pattern in patterns:
        if "://" in pattern:
            raise ValueError(
                f"{key}: {pattern!r} is a URL; shards are read from a filesystem path: mount the bucket "
                "(e.g. gcsfuse at /mnt/gcs) or copy the shards to local disk, and give that path's glob"
            )
        if os.path.isdir(pattern) or (pattern.endswith(".json") and os.path.isfile(pattern)):
            listed = _manifest_paths(pattern, key)
            paths.update(listed)
            checked.update(listed)
            continue
        matches = glob.glob(pattern)
        if not matches:
            raise ValueError(f"{key}: no files match {pattern!r}")
        paths.update(matches)
    for path in sorted(paths - checked):
        if not os.path.isfile(path):
            raise ValueError(f"{key}: {path} is not a file: give shard files, a glob of them or a manifest")
        try:
            check_shard(path)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return sorted(paths)


class EpochShuffle(grain.MapDataset):
    """Infinite repetition of ``parent`` in a new random order every epoch: element ``i`` is
    ``parent[perm_e[i % n]]`` with ``e = i // n`` and ``perm_e = default_rng([seed, e]).permutation(n)``.

    The permutation of the current epoch is cached (8 bytes per record: 16 MB for AudioSet's 2 M clips), so an element
    costs one array lookup; each worker process holds its own copy.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._n, self._seed = len(parent), int(seed)
        if self._n == 0:
            raise ValueError("EpochShuffle: the dataset is empty")
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, pos = divmod(int(index), self._n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            self._epoch = epoch
        return self._parent[int(self._perm[pos])]


PARENT_POLL_SECONDS = 0.5


def _exit_with_parent() -> None:
    """In a worker process: a daemon thread ends this process once its parent is gone (its parent pid changes when
    the parent dies and the worker is re-parented), so workers never outlive a killed trainer. Polling rather than
    ``prctl(PR_SET_PDEATHSIG)``: that signal follows the *thread* that started the worker, and grain starts workers
    from short-lived threads. A no-op outside a multiprocessing child."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return
    parent_pid = parent.pid

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)  # the trainer is gone: nobody reads this worker's batches

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_init(worker_index: int = 0, worker_count: int = 1) -> None:
    """Init of each grain worker process.

    1. Ignore SIGTERM: a scheduler signals the whole process group on preemption, and the trainer must still read the
       data iterator's state to save it; it stops the workers itself.
    2. Exit when the trainer is gone (``_exit_with_parent``): a trainer killed with SIGKILL (out of memory, a
       scheduler's hard kill) cannot stop its workers, and they ignore SIGTERM.
    3. Let glibc's malloc reuse freed batch-sized buffers: a fresh process maps every buffer above 128 kB (a record, a
       crop, a batch) anew and unmaps it on free, so each allocation page-faults its memory in again: measured 2x the
       CPU per crop in a grain worker (0.61 vs 0.30 CPU-ms, bench/input_pipeline.py). An mmap threshold of 64 MB and
       a trim threshold of 256 MB keep them in the heap (a no-op where ``mallopt`` is not glibc's).
    4. Send batches through a few reused shared-memory blocks (``shm_batches``), not grain's fresh block per batch.
    """
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    enable_pool()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


def multi_hot(labels, num_classes: int) -> np.ndarray:
    """Class indices -> float32 [num_classes] with ones at the clip's labels; ValueError for an index out of range."""
    out = np.zeros(num_classes, np.float32)
    labels = np.asarray(labels, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"record labels {labels.tolist()} outside 0..{num_classes - 1}: check the label index")
    out[labels] = 1.0
    return out


class _DecodeCrop:
    """``random_map`` transform: record bytes (or, ``decoded``, int16 PCM) -> ``{'audio': int16 [crop]}`` (and, with
    ``num_classes``, ``'targets'``: the record's labels multi-hot, float32 [num_classes]), or None for a short clip to
    skip."""

    def __init__(self, crop: int, pad: bool, decoded: bool = False, num_classes: int = 0):
        self.crop, self.pad, self.decoded, self.num_classes = crop, pad, decoded, num_classes

    def __call__(self, data: bytes | np.ndarray, rng: np.random.Generator) -> dict | None:
        header, pcm = (None, data) if self.decoded else decode_pcm(data)
        n = pcm.shape[0]
        if n < self.crop:
            if not self.pad:
                return None
            out = {"audio": np.pad(pcm, (0, self.crop - n))}
        else:
            start = int(rng.integers(0, n - self.crop + 1))
            out = {"audio": pcm[start : start + self.crop].copy()}  # a copy: do not keep the whole record alive
        if self.num_classes:
            out["targets"] = multi_hot(header["labels"], self.num_classes)
        return out


class _Lookup:
    """``map`` transform: a record index -> the record (a weighted order's draws)."""

    def __init__(self, source):
        self.source = source

    def __call__(self, index: int):
        return self.source[int(index)]


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


def train_input(config) -> list[str] | str | TfdsAudioSource:
    """What ``config.data`` names for ``pretrain_dataset``: ``config.data.train`` (source 'records'), or the split
    ``config.data.tfds_split`` of ``config.data.tfds_name`` under ``config.data.tfds_data_dir`` (source 'tfds'),
    checked to exist and to be at ``config.audio.sample_rate``."""
    data = config.data
    if data.source == "records":
        return data.train
    if data.source == "tfds":
        label = f"config.data.tfds_name={data.tfds_name!r}"
        return TfdsAudioSource.open(
            data.tfds_name, data.tfds_data_dir, data.tfds_split, config.audio.sample_rate, label
        )
    raise ValueError(f"config.data.source={data.source!r}: train_input reads 'records' or 'tfds'")


def pretrain_dataset(
    files: list[str] | str | TfdsAudioSource,
    *,
    global_batch: int,
    crop_samples: int,
    seed: int,
    short_clips: str = "skip",
    process_index: int | None = None,
    process_count: int | None = None,
    workers: int = 0,
    prefetch_buffer: int = 2,
    read_threads: int = 0,
    num_classes: int = 0,
    order=None,
) -> grain.IterDataset:
    """Infinite dataset of this process's batches ``{'audio': int16 [global_batch / process_count, crop_samples]}``.

    ``files``: a glob or a list of globs / paths of ArrayRecord shards of clip records, or a prepare output folder /
    its ``manifest.json`` (exactly the shards it lists; ``expand_files``); or a ``TfdsAudioSource`` (any random-access
    source of int16 PCM clips). ``workers > 0`` decodes in that many processes (``mp_prefetch``, ``prefetch_buffer``
    batches buffered per worker; each batch comes over in a reused shared-memory block, ``shm_batches``);
    ``workers=0`` reads in the calling thread, which the trainer overlaps with the device step through JAX's
    asynchronous dispatch.
    ``read_threads`` are grain's read/decode threads per process: 0 (the default) reads in the process's own thread,
    the cheapest per crop; grain's thread hand-off costs ~0.17 CPU-ms per crop, more than reading an uncompressed
    record (bench/input_pipeline.py).
    ``num_classes`` > 0 (records only): batches also hold ``'targets'`` float32 [B_local, num_classes], the records'
    labels multi-hot. ``order``: a ``MapDataset`` of record indices replacing the epoch shuffle (e.g. a weighted
    sampler drawing with replacement, ``finetune.sampler``), indexed by stream position like the shuffle.
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
    decoded = not isinstance(files, str | list | tuple)  # a source of int16 PCM clips (TfdsAudioSource)
    if decoded:
        source = files
        if len(source) == 0:
            raise ValueError(f"{source!r} holds no clips")
    else:
        paths = expand_files(files)
        source = grain.sources.ArrayRecordDataSource(paths)
        if len(source) == 0:
            raise ValueError(f"config.data.train: {len(paths)} files matching {files!r} hold no records")
    shuffle_seed, crop_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    if num_classes and decoded:
        raise ValueError("labels (num_classes > 0) are read from record shards, not from a tfds source")
    records = grain.MapDataset.source(source)
    ordered = EpochShuffle(records, shuffle_seed) if order is None else order.map(_Lookup(source))
    ds = ordered.random_map(_DecodeCrop(crop_samples, short_clips == "pad", decoded, num_classes), seed=crop_seed)
    ds = ds[process_index::process_count]
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64 if read_threads else 0)
    it = ds.to_iter_dataset(read_options=read_options, allow_nones=True).filter(_SkipShort(len(source), crop_samples))
    it = it.batch(global_batch // process_count, drop_remainder=True, batch_fn=PooledBatch() if workers else None)
    if workers > 0:
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch_buffer)
        it = it.mp_prefetch(options, worker_init_fn=worker_init)
    return it
