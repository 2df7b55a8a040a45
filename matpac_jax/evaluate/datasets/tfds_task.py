"""tfds adapter (``tfds:NAME``): a labelled tfds dataset prepared in ArrayRecord format, read without TensorFlow.

    python -m matpac_jax.probe --checkpoint=runs/pp --dataset=tfds:my_set[:1.0.0] --root=DATA_DIR

``root`` is the tfds ``data_dir`` (empty: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``); ``NAME`` is what
``tfds.data_source`` takes (``name[/config][:version]``). Records hold ``audio`` and ``label`` as
``matpac_jax.data.tfds_source`` describes (``python -m matpac_jax.data.tfds_audio`` builds such datasets).

Protocol: with the splits ``train`` and ``test`` (and optionally ``validation`` or ``valid``), a fixed split over
their records (other splits are ignored); otherwise a ``fold`` feature (every value >= 0) gives k-fold ids over the
records of every split. Classes: the ``ClassLabel`` names, or ``metadata['class_names']`` for a multi-hot label.
Clips are in split order (train, valid, test, or the dataset's split order for folds), then record order.

The probe embeds audio files, so the first load writes each clip once as a float32 WAV at the dataset's sample rate
(exact: ``int16 / 32767``, or the stored float samples; 4 bytes per sample) into ``<version dir>/probe_wav/``,
the prepared dataset's own folder (rebuilding the dataset removes it), and ``index.json`` last (labels, splits,
folds, class names). Later loads read ``index.json`` only, and export again if a file is missing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from matpac_jax.audio.io import from_int16
from matpac_jax.data.tfds_source import open_split, read_record, sample_rate_of
from matpac_jax.evaluate.datasets.common import AudioIndex, Task, multi_hot
from matpac_jax.fileio import atomic_write, atomic_write_json, unwritable_reason

__all__ = ["tfds_task"]

PREFIX = "tfds:"
EXPORT_DIR, INDEX, INDEX_VERSION = "probe_wav", "index.json", 1
SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}


def _label_kind(info, label: str) -> tuple[bool, list[str] | None]:
    """(multilabel, class names or None to number them) of the dataset's ``label`` feature."""
    features = info.features
    if "label" not in features or "audio" not in features:
        raise ValueError(f"{label}: a probe task needs 'audio' and 'label' features, it has {sorted(features)}")
    feature = features["label"]
    names = list((info.metadata or {}).get("class_names") or [])
    if hasattr(feature, "names"):  # ClassLabel
        return False, list(feature.names)
    shape = tuple(feature.shape)
    if not np.issubdtype(feature.np_dtype, np.integer) or len(shape) > 1:
        raise ValueError(f"{label}: 'label' is {feature}: expected a ClassLabel or an integer multi-hot Tensor [C]")
    if len(shape) == 1 and names and len(names) != shape[0]:
        raise ValueError(f"{label}: metadata['class_names'] has {len(names)} names for a label of {shape[0]} classes")
    return len(shape) == 1, names or None


def _export(sources: dict, splits: list[str], out: str, label: str) -> dict:
    """Write the clips of ``splits`` as float32 WAV files under ``out``; return (and write) the index."""
    info = sources[splits[0]].dataset_info
    multilabel, names = _label_kind(info, label)
    if reason := unwritable_reason(out, directory=True):
        raise ValueError(
            f"{label}: the probe embeds audio files and writes each clip once as a WAV under {out}, which cannot be "
            f"written ({reason}): copy the prepared dataset ({info.data_dir}) under a writable data_dir, give that "
            "as --root"
        )
    rate = sample_rate_of(info)
    if rate is None and "sample_rate" not in info.features:
        raise ValueError(f"{label}: no sample rate: neither metadata['sample_rate'] nor a 'sample_rate' feature")
    clips = []
    for split in splits:
        source = sources[split]
        for i in range(len(source)):
            record = read_record(source, i, f"{label} split {split!r}")
            audio = np.asarray(record["audio"])
            if audio.dtype != np.int16 and not np.issubdtype(audio.dtype, np.floating):
                raise ValueError(f"{label}: record {i} of {split!r} has {audio.dtype} audio, expected int16 or float")
            wave = from_int16(audio) if audio.dtype == np.int16 else audio.astype(np.float32)
            sr = rate or int(record["sample_rate"])
            rel = os.path.join(split, f"{i:07d}.wav")
            atomic_write(os.path.join(out, rel), lambda f, w=wave, r=sr: sf.write(f, w, r, "FLOAT", format="WAV"))
            target = np.asarray(record["label"])
            clip_label = np.flatnonzero(target).tolist() if multilabel else int(target)
            fold = int(record["fold"]) if "fold" in record else -1
            clips.append({"file": rel, "split": split, "fold": fold, "label": clip_label})
    sizes = {split: len(sources[split]) for split in splits}
    index = {"version": INDEX_VERSION, "sizes": sizes, "multilabel": multilabel, "class_names": names, "clips": clips}
    atomic_write_json(os.path.join(out, INDEX), index)
    return index


def _read_index(out: str, sizes: dict[str, int]) -> dict | None:
    """The index of a complete export of splits of ``sizes`` records whose files are all present, else None."""
    try:
        with open(os.path.join(out, INDEX), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    if index.get("version") != INDEX_VERSION or index.get("sizes") != sizes:
        return None
    present = AudioIndex().present([os.path.join(out, c["file"]) for c in index["clips"]])
    return index if present.all() else None


def tfds_task(name: str, root: str) -> Task:
    """The probe task of the tfds dataset ``name`` (``tfds:NAME`` or ``NAME``) prepared under ``root``."""
    name = name.removeprefix(PREFIX)
    if not name:
        raise ValueError("--dataset=tfds: names no dataset: give --dataset=tfds:NAME[:VERSION] --root=DATA_DIR")
    label = f"--dataset={PREFIX}{name}"
    sources = open_split(name, root, None, label)
    known = [s for s in sources if s in SPLIT_NAMES]
    fixed = "train" in known and "test" in known
    first = next(iter(sources.values())).dataset_info
    if not fixed and "fold" not in first.features:
        raise ValueError(
            f"{label}: a probe task needs the splits train and test (validation optional) or a 'fold' feature; it "
            f"has the splits {sorted(sources)} and the features {sorted(first.features)}"
        )
    splits = sorted(known, key=["train", "validation", "valid", "test"].index) if fixed else list(sources)
    out = os.path.join(first.data_dir, EXPORT_DIR)
    index = _read_index(out, {split: len(sources[split]) for split in splits}) or _export(sources, splits, out, label)
    clips = [c for c in index["clips"] if c["split"] in splits]
    folds = np.asarray([c["fold"] for c in clips], dtype=np.int64)
    if not fixed and (folds < 0).any():
        raise ValueError(
            f"{label}: without train and test splits every record needs a 'fold' >= 0, {int((folds < 0).sum())} of "
            f"{len(folds)} have none: give the CSV a fold column (tfds_audio) or a train / test split"
        )
    names, multilabel = index["class_names"], index["multilabel"]
    if multilabel:
        names = names or [str(i) for i in range(first.features["label"].shape[0])]
        labels = multi_hot([c["label"] for c in clips], len(names))
    else:
        labels = np.asarray([c["label"] for c in clips], dtype=np.int64)
        names = names or [str(i) for i in range(int(labels.max()) + 1)]
    return Task(
        name="tfds_" + name.partition(":")[0].replace("/", "_"),
        files=[os.path.join(out, c["file"]) for c in clips],
        labels=labels,
        class_names=list(names),
        multilabel=multilabel,
        metric="mAP" if multilabel else "accuracy",
        folds=None if fixed else folds,
        split=np.asarray([SPLIT_NAMES[c["split"]] for c in clips], dtype=str) if fixed else None,
    )
