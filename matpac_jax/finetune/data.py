"""Labelled input of the fine-tuning task: training batches with multi-hot targets, and the evaluation set.

Training (``train_input``): the demo's labelled clips (``CropBatcher`` with one-hot targets), or record shards of
clips with labels (``data.prepare`` stores AudioSet's, or any CSV's, class indices) through the grain pipeline of
pretraining with ``num_classes`` (random crops of ``config.audio.crop_frames`` frames, ``'targets'`` multi-hot); with
``config.finetune.balanced`` the records are drawn by their label-frequency weights (``finetune.sampler``, the
AudioSet-2M recipe): ``config.finetune.draws_per_epoch`` distinct clips per epoch (EVAR's), or with replacement when
it is 0; without ``balanced``, in a new random order every epoch. The records' labels, which
the weighted sampler needs, are read once and cached in ``WORKDIR/train_labels.npz`` (keyed by the shards' names,
sizes and modification times): one pass over the corpus, like the teacher pass of S-SONDO.

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

import grain
import numpy as np

from matpac_jax.audio.frontend import LogMelConfig, num_samples_for_frames
from matpac_jax.config_lib import ConfigError
from matpac_jax.data.demo import demo_splits
from matpac_jax.data.in_memory import CropBatcher
from matpac_jax.data.pipeline import expand_files, multi_hot, pretrain_dataset
from matpac_jax.data.prepare import LABEL_ORDERS, MANIFEST, label_order
from matpac_jax.data.records import decode_header, decode_pcm, read_shard
from matpac_jax.fileio import atomic_save_npz, sha256_bytes
from matpac_jax.finetune.sampler import LabelWeightedEpochs, LabelWeightedIndices


def crop_samples(config) -> int:
    return num_samples_for_frames(config.audio.crop_frames, LogMelConfig.from_audio_config(config.audio))


def demo_data(config) -> tuple[dict, dict]:
    """The demo's train and test splits with one-hot 'targets' [N, classes]."""
    d = config.data.demo
    train, test = demo_splits(d.num_train, d.num_test, d.seconds, d.seed)
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


def record_labels(paths: list[str], num_classes: int, cache: str) -> np.ndarray:
    """Multi-hot labels [N, C] (bool) of every record of ``paths`` in the pipeline's order, cached in ``cache``."""
    stats = [[os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]
    key = sha256_bytes(json.dumps([stats, num_classes]).encode())
    try:
        with np.load(cache, allow_pickle=False) as data:
            if str(data["key"]) == key:
                return data["labels"]
    except (OSError, ValueError, KeyError, EOFError):
        pass  # absent, unreadable or another corpus: read it again
    labels = np.stack([multi_hot(decode_header(r)["labels"], num_classes) > 0 for p in paths for r in read_shard(p)])
    atomic_save_npz(cache, labels=labels, key=np.array(key))
    return labels


def train_input(config, workdir: str):
    """(source for the trainer, demo splits or None)."""
    c, f = config, config.finetune
    if c.data.source == "demo":
        train, test = demo_data(c)
        return CropBatcher(train["waves"], crop_samples(c), c.data.batch_size, c.seed, targets=train["targets"]), (
            train,
            test,
        )
    paths = expand_files(c.data.train)
    check_label_order(paths, "config.data.train")
    order = None
    if f.balanced:
        labels = record_labels(paths, f.num_classes, os.path.join(workdir, "train_labels.npz"))
        draws = int(f.draws_per_epoch)
        order = LabelWeightedEpochs(labels, c.seed, draws) if draws else LabelWeightedIndices(labels, seed=c.seed)
    dataset = pretrain_dataset(paths, global_batch=c.data.batch_size, crop_samples=crop_samples(c), seed=c.seed,
                               short_clips="pad", workers=c.data.workers, num_classes=f.num_classes,
                               order=order)  # fmt: skip
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
    paths = expand_files(config.finetune.eval)
    check_label_order(paths, "config.finetune.eval")
    source = grain.sources.ArrayRecordDataSource(paths)
    indices = range(process_index, len(source), process_count)
    if not indices:
        raise ValueError(f"config.finetune.eval={config.finetune.eval!r}: no clips for process {process_index}")
    targets = np.stack([multi_hot(decode_header(source[i])["labels"], config.finetune.num_classes) for i in indices])
    return EvalSet(samples, targets, source=source, indices=indices)
