"""Labelled input of the fine-tuning task: training batches with multi-hot targets, and the evaluation set.

Training (``train_input``): the demo's labelled clips (``CropBatcher`` with one-hot targets), or record shards of
clips with labels (``data.prepare`` stores AudioSet's, or any CSV's, class indices) through the grain pipeline of
pretraining with ``num_classes`` (random crops of ``config.audio.crop_frames`` frames, ``'targets'`` multi-hot); with
``config.finetune.balanced`` the records are drawn by their label-frequency weights (``finetune.sampler``, the
AudioSet-2M recipe): ``config.finetune.draws_per_epoch`` distinct clips per epoch (EVAR's), or with replacement when
it is 0; without ``balanced``, in a new random order every epoch. The records' labels, which the weighted sampler
needs, are read once and cached in ``WORKDIR/train_labels.npz`` (sparse, keyed by the shards' names, sizes and
modification times): one pass over the corpus, like the teacher pass of S-SONDO, with or without ``balanced``.

Labels checked before compute (``check_labels``, from the task's ``make_input``): every label of both sets within
``0..config.finetune.num_classes - 1``, a training set with some labelled record, an evaluation set with every
record labelled; a ConfigError names the key (``config.data.train`` or ``config.finetune.eval``), the shard and the
record, so a bad record is refused at start rather than failing the pipeline whenever it is drawn.

Label order (``check_label_order``): label ``k`` trains unit ``k``, so the records must hold head units. ``prepare``
stores AudioSet labels in the published head's order (mid-sorted, ``data.audioset_classes``) and says so in its
manifest (``label_order: 'mid'``); shards whose manifest (``manifest.json`` in their folder) predates that hold the
ontology ``index`` column and are refused, naming the fix (run the same ``prepare`` command again). Shards without a
manifest beside them (e.g. the demo's ``write_records``) are read as written.

Evaluation (``eval_clips`` -> ``EvalSet``): every clip of the evaluation set, in a fixed order (shards in name order,
records in shard order), each cut to the first ``crop_frames`` frames (zero-padded when shorter, as the published
fine-tuning pads its input), process ``p`` of ``P`` taking clips ``p, p + P, ...``; the labels are held, the audio is
read a batch at a time at each evaluation.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from matpac_jax.audio.frontend import LogMelConfig, num_samples_for_frames
from matpac_jax.config_lib import ConfigError
from matpac_jax.data.demo import demo_splits
from matpac_jax.data.in_memory import CropBatcher
from matpac_jax.data.pipeline import expand_files, pretrain_dataset
from matpac_jax.data.prepare import LABEL_ORDERS, MANIFEST, label_order
from matpac_jax.data.records import decode_header, decode_pcm
from matpac_jax.fileio import atomic_save_npz, sha256_bytes
from matpac_jax.finetune.sampler import LabelWeightedEpochs, LabelWeightedIndices


def crop_samples(config) -> int:
    return num_samples_for_frames(config.audio.crop_frames, LogMelConfig.from_audio_config(config.audio))


def demo_data(config) -> tuple[dict, dict]:
    """The demo's train and test splits with one-hot 'targets' [N, classes]."""
    d = config.data.demo
    train, test = demo_splits(d.num_train, d.num_test, d.seconds, d.seed)
    if len(train["class_names"]) > config.finetune.num_classes:
        raise ConfigError(
            f"config.finetune.num_classes={config.finetune.num_classes}: the demo corpus has "
            f"{len(train['class_names'])} classes (labels 0..{len(train['class_names']) - 1}): set it to that"
        )
    for split in (train, test):
        split["targets"] = np.eye(config.finetune.num_classes, dtype=np.float32)[split["labels"]]
    return train, test


def check_label_order(paths: list[str], setting: str) -> None:
    """ConfigError naming ``setting`` when the prepare manifest in a shard's folder says its label ids are not head
    units: AudioSet labels of a manifest written before ``label_order`` was recorded (``'index'``), or an order this
    code does not know."""
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        if not os.path.isfile(os.path.join(folder, MANIFEST)):
            continue  # not prepare's output: labels as written
        try:
            order = label_order(folder)
        except ValueError as e:
            raise ConfigError(f"{setting}: {e}") from None
        if order == "index":
            raise ConfigError(
                f"{setting}: {os.path.join(folder, MANIFEST)} has no 'label_order': an older prepare wrote these "
                "shards with the 'index' column of class_labels_indices.csv (ontology order) as AudioSet labels, but "
                "unit i of an AudioSet head is the i-th class sorted by mid (as published), so every class would "
                "train another class's unit. Run the same python -m matpac_jax.data.prepare command again: it "
                "rebuilds the shards with mid-sorted labels and records label_order 'mid'"
            )
        if order not in LABEL_ORDERS.values():
            raise ConfigError(
                f"{setting}: {os.path.join(folder, MANIFEST)} says label_order={order!r}, not one of "
                f"{sorted(LABEL_ORDERS.values())}: rebuild the shards with python -m matpac_jax.data.prepare"
            )


LABEL_READ_BATCH = 256  # records per read: a batch of 10-s pcm16 records is ~80 MB, not a whole shard


class RecordLabels(NamedTuple):
    """Every record's labels, sparse, in the pipeline's order (shards in name order, records in shard order):
    record ``i`` holds ``flat[starts[i]:starts[i] + counts[i]]`` (``starts``: the cumulative sum of ``counts``)."""

    paths: tuple[str, ...]
    records: np.ndarray  # [S] int64: records per shard
    counts: np.ndarray  # [N] int64: labels per record
    flat: np.ndarray  # [sum(counts)] int64: the labels, record after record

    def where(self, record: int) -> str:
        """``record 7 of /data/x.arrayrecord (clip key 'k')``: the shard and the index in it of a record."""
        ends = np.cumsum(self.records)
        shard = int(np.searchsorted(ends, record, side="right"))
        index = record - int(ends[shard] - self.records[shard])
        reader = ArrayRecordReader(self.paths[shard])
        try:
            clip = decode_header(reader.read([index])[0])["key"]
        finally:
            reader.close()
        return f"record {index} of {self.paths[shard]} (clip key {clip!r})"

    def record(self, i: int) -> list[int]:
        start = int(self.counts[:i].sum())
        return self.flat[start : start + int(self.counts[i])].tolist()

    def multi_hot(self, num_classes: int) -> np.ndarray:
        """bool [N, num_classes]; the labels checked first (``check_labels``)."""
        out = np.zeros((len(self.counts), num_classes), bool)
        out[np.repeat(np.arange(len(self.counts)), self.counts), self.flat] = True
        return out


def read_labels(paths: list[str], setting: str) -> RecordLabels:
    """The labels of every record of ``paths`` (one pass, ``LABEL_READ_BATCH`` records per read: the whole record is
    read, its header decoded: measured 23 s per 100k 10-s pcm16 records from the page cache on one CPU core, ~8 min
    for AudioSet-2M). ConfigError naming ``setting``, the shard and the record for a record that does not decode."""
    records, counts, flat = [], [], []
    for path in paths:
        reader = ArrayRecordReader(path)
        try:
            n = int(reader.num_records())
            for begin in range(0, n, LABEL_READ_BATCH):
                for i, data in enumerate(reader.read(begin, min(begin + LABEL_READ_BATCH, n)), begin):
                    try:
                        labels = decode_header(data)["labels"]
                    except ValueError as e:
                        raise ConfigError(
                            f"{setting}: record {i} of {path} does not decode ({e}): rebuild the shard with "
                            "python -m matpac_jax.data.prepare or leave it out"
                        ) from None
                    counts.append(len(labels))
                    flat.extend(labels)
        finally:
            reader.close()
        records.append(n)
    return RecordLabels(tuple(paths), *(np.asarray(x, np.int64) for x in (records, counts, flat)))


def cached_labels(paths: list[str], cache: str, setting: str) -> RecordLabels:
    """``read_labels`` once per corpus: kept in ``cache`` (an .npz keyed by the shards' names, sizes and modification
    times), so a resume or a second run on the same workdir reads a few MB instead of the corpus."""
    stats = [[os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]
    key = sha256_bytes(json.dumps(stats).encode())
    try:
        with np.load(cache, allow_pickle=False) as data:
            if str(data["key"]) == key:
                return RecordLabels(tuple(paths), data["records"], data["counts"], data["flat"])
    except (OSError, ValueError, KeyError, EOFError):
        pass  # absent, unreadable, an older format or another corpus: read it again
    labels = read_labels(paths, setting)
    atomic_save_npz(cache, records=labels.records, counts=labels.counts, flat=labels.flat, key=np.array(key))
    return labels


def check_labels(labels: RecordLabels, num_classes: int, setting: str, every_record: bool) -> None:
    """ConfigError naming ``setting``, the shard and the record: a label outside ``0..num_classes - 1``, a set whose
    records hold no label at all, or (``every_record``: an evaluation set, scored against its labels) a record
    without labels."""
    classes = "config.finetune.num_classes"
    if labels.flat.size and (labels.flat.min() < 0 or labels.flat.max() >= num_classes):
        bad = int(np.flatnonzero((labels.flat < 0) | (labels.flat >= num_classes))[0])
        record = int(np.searchsorted(np.cumsum(labels.counts), bad, side="right"))
        raise ConfigError(
            f"{setting}: {labels.where(record)} has labels {labels.record(record)}, outside 0..{num_classes - 1} "
            f"({classes}={num_classes}): set {classes} to the number of classes the shards were prepared with, or "
            "rebuild the shards with python -m matpac_jax.data.prepare and the right --labels file"
        )
    empty = np.flatnonzero(labels.counts == 0)
    if empty.size == len(labels.counts) or (every_record and empty.size):
        if empty.size == len(labels.counts):
            which = f"no record of its {len(labels.paths)} shard(s) holds a label (e.g. {labels.where(0)})"
        else:
            first = labels.where(int(empty[0]))
            which = f"{empty.size} of {len(labels.counts)} records hold no label (the first: {first})"
        raise ConfigError(
            f"{setting}: {which}: fine-tuning trains and scores against each clip's labels; prepare the set with them "
            "(python -m matpac_jax.data.prepare --labels=class_labels_indices.csv for AudioSet segment CSVs, or a "
            "'labels' column in a CSV of paths)"
        )


def record_labels(paths: list[str], num_classes: int, cache: str, setting: str = "config.data.train") -> np.ndarray:
    """Multi-hot labels [N, C] (bool) of every record of ``paths`` in the pipeline's order, checked against
    ``num_classes`` (``check_labels``), read once and cached in ``cache`` (``cached_labels``)."""
    labels = cached_labels(paths, cache, setting)
    check_labels(labels, num_classes, setting, every_record=False)
    return labels.multi_hot(num_classes)


def train_input(config, workdir: str):
    """(source for the trainer, demo splits or None)."""
    c, f = config, config.finetune
    if c.data.source == "demo":
        train, test = demo_data(c)
        return CropBatcher(train["waves"], crop_samples(c), c.data.batch_size, c.seed, targets=train["targets"]), (
            train,
            test,
        )
    paths = expand_files(c.data.train, "config.data.train")
    check_label_order(paths, "config.data.train")
    labels = record_labels(paths, f.num_classes, os.path.join(workdir, "train_labels.npz"))  # checked, balanced or not
    order = None
    if f.balanced:
        draws = int(f.draws_per_epoch)
        order = LabelWeightedEpochs(labels, c.seed, draws) if draws else LabelWeightedIndices(labels, seed=c.seed)
    batches = {"global_batch": c.data.batch_size, "crop_samples": crop_samples(c), "seed": c.seed, "short_clips": "pad"}
    dataset = pretrain_dataset(paths, **batches, workers=c.data.workers, num_classes=f.num_classes, order=order)
    return dataset, None


def fit(pcm: np.ndarray, samples: int) -> np.ndarray:
    """The first ``samples`` of a clip, zero-padded when shorter."""
    return np.pad(pcm[:samples], (0, max(samples - pcm.shape[0], 0)))


class EvalSet:
    """This process's share of the evaluation set: ``targets`` [n, C] float32, held; the audio read ``batch`` clips at
    a time (``batches``), from memory (the demo) or from the record shards (each evaluation reads them again, so a
    host holds one batch of audio, not the set: AudioSet's ≈ 20 k eval clips at 992 frames are ≈ 6.3 GB of int16)."""

    def __init__(self, samples: int, targets: np.ndarray, audio: np.ndarray | None = None, source=None, indices=()):
        self.samples, self.targets, self.audio, self.source = samples, targets, audio, source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.targets)

    def batches(self, batch: int):
        for start in range(0, len(self), batch):
            if self.audio is not None:
                yield self.audio[start : start + batch]
            else:
                idx = self.indices[start : start + batch]
                yield np.stack([fit(decode_pcm(self.source[i])[1], self.samples) for i in idx])


def eval_clips(config, splits, process_index: int = 0, process_count: int = 1) -> EvalSet:
    """This process's share of the evaluation set: clips ``process_index``, ``process_index + process_count``, ..."""
    samples = crop_samples(config)
    if splits is not None:  # the demo: its held-out split
        test = splits[1]
        audio = np.stack([fit(w, samples) for w in test["waves"]])[process_index::process_count]
        return EvalSet(samples, test["targets"][process_index::process_count], audio=audio)
    setting, num_classes = "config.finetune.eval", config.finetune.num_classes
    paths = expand_files(config.finetune.eval, setting)
    check_label_order(paths, setting)
    labels = read_labels(paths, setting)  # every process reads every record's labels: all refuse the same set
    check_labels(labels, num_classes, setting, every_record=True)
    source = grain.sources.ArrayRecordDataSource(paths)
    indices = range(process_index, len(source), process_count)
    if not indices:
        raise ConfigError(f"{setting}={config.finetune.eval!r}: no clips for process {process_index}")
    targets = labels.multi_hot(num_classes)[process_index::process_count].astype(np.float32)
    return EvalSet(samples, targets, source=source, indices=indices)
