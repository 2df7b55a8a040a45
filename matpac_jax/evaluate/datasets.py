"""Dataset adapters for the linear-probe evaluation harness (the MATPAC downstream protocol).

Each adapter reads a dataset's *official* metadata from a local folder (nothing is downloaded) and returns a
:class:`Task`: one absolute audio path per clip, its labels, the class names and the evaluation protocol (k-fold
ids or a fixed train / valid / test split). Adapters only read metadata and list directories; audio is never
decoded here.

=========  ===============  ======================================================  ==========================
name       dataset          layout under ``root``                                   labels / protocol
=========  ===============  ======================================================  ==========================
esc50      ESC-50           ``meta/esc50.csv``, ``audio/<filename>``                50 classes, accuracy,
                                                                                    folds 1..5
us8k       UrbanSound8K     ``metadata/UrbanSound8K.csv``,                          10 classes, accuracy,
                            ``audio/fold<fold>/<slice_file_name>``                  folds 1..10
gtzan      GTZAN (fault-    ``{train,valid,test}_filtered.txt``,                    10 genres, accuracy,
           filtered split)  ``genres/<genre>/<file>`` (.wav or the original .au)    train / valid / test
nsynth     NSynth           ``nsynth-{train,valid,test}/examples.json``,            11 instrument families,
                            ``nsynth-<part>/audio/<note_str>.wav``                  accuracy, train/valid/test
openmic    OpenMIC-2018     ``openmic-2018-aggregated-labels.csv``,                 20 instruments, mAP with a
                            ``class-map.json``, ``partitions/split01_{train,        known-label mask,
                            test}.csv``, ``audio/<key[:3]>/<key>.ogg``              train / test
fsd50k     FSD50K           ``FSD50K.ground_truth/{dev,eval,vocabulary}.csv``,      200 classes, mAP,
                            ``FSD50K.{dev,eval}_audio/<fname>.wav``                 train / valid / test
mtt        MagnaTagATune    ``annotations_final.csv`` (tab-separated),              top-50 tags, mAP,
           (top-50)         ``mp3/<mp3_path>``                                      train / valid / test
folder     any              ``labels.csv`` (``path``, ``labels``, ``split`` or      single- or multi-label,
                            ``fold``), audio paths relative to ``root``             split or folds
=========  ===============  ======================================================  ==========================

Common behaviour:

* A missing metadata file raises :class:`FileNotFoundError` naming the dataset, the exact expected path and the
  layout the folder should have.
* An audio file listed in the metadata but absent on disk is skipped; one :func:`warnings.warn` per load reports
  how many were skipped and names up to five. If *every* listed file is missing, a :class:`FileNotFoundError`
  naming the audio folder is raised instead (the audio was most likely not extracted where expected).
* Class names and their order always come from the full metadata, so label ids do not depend on which audio files
  happen to be present.
* OpenMIC-2018 defines no validation split (``split`` is only train / test): the harness draws validation clips
  from train. Its ``mask`` marks the (clip, instrument) pairs that were annotated.
* Existence checks list each audio directory once (no per-file ``stat``), so 300k-clip NSynth loads quickly.

Use :func:`load_task` (``load_task("esc50", "/data/ESC-50-master")``) or the :data:`ADAPTERS` registry.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "ADAPTERS",
    "NSYNTH_FAMILIES",
    "SPLITS",
    "Task",
    "esc50",
    "folder",
    "fsd50k",
    "gtzan",
    "load_task",
    "mtt",
    "nsynth",
    "openmic",
    "us8k",
]

SPLITS = ("train", "valid", "test")

#: NSynth instrument families, index = ``instrument_family``.
NSYNTH_FAMILIES = (
    "bass",
    "brass",
    "flute",
    "guitar",
    "keyboard",
    "mallet",
    "organ",
    "reed",
    "string",
    "synth_lead",
    "vocal",
)

_MAX_NAMED_MISSING = 5


@dataclasses.dataclass(frozen=True)
class Task:
    """One downstream task: clips, labels and the evaluation protocol.

    Attributes:
      name: adapter name, e.g. ``"esc50"``.
      files: absolute audio paths, one per clip, in a deterministic order (documented per adapter).
      labels: single-label: int64 ``[N]`` class indices; multi-label: float32 ``[N, C]`` in {0, 1}.
      class_names: ``C`` names; index = label id.
      multilabel: whether ``labels`` is a multi-hot matrix.
      metric: ``"accuracy"`` (single-label) or ``"mAP"`` (multi-label).
      folds: int64 ``[N]`` fold ids for k-fold datasets, else None.
      split: numpy str array ``[N]`` of ``"train"`` / ``"valid"`` / ``"test"`` for fixed-split datasets, else None.
      mask: multi-label only, optional float32 ``[N, C]``: 1 where the label is known (OpenMIC), else None.
    """

    name: str
    files: list[str]
    labels: np.ndarray
    class_names: list[str]
    multilabel: bool
    metric: str
    folds: np.ndarray | None
    split: np.ndarray | None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, c = len(self.files), len(self.class_names)
        if (self.folds is None) == (self.split is None):
            raise ValueError(f"Task {self.name!r}: exactly one of folds / split must be set")
        expected_metric = "mAP" if self.multilabel else "accuracy"
        if self.metric != expected_metric:
            raise ValueError(f"Task {self.name!r}: metric must be {expected_metric!r}, got {self.metric!r}")
        want_shape = (n, c) if self.multilabel else (n,)
        if self.labels.shape != want_shape:
            raise ValueError(f"Task {self.name!r}: labels have shape {self.labels.shape}, expected {want_shape}")
        if self.folds is not None and self.folds.shape != (n,):
            raise ValueError(f"Task {self.name!r}: folds have shape {self.folds.shape}, expected {(n,)}")
        if self.split is not None:
            if self.split.shape != (n,):
                raise ValueError(f"Task {self.name!r}: split has shape {self.split.shape}, expected {(n,)}")
            bad = sorted(set(self.split.tolist()) - set(SPLITS))
            if bad:
                raise ValueError(f"Task {self.name!r}: split values must be in {SPLITS}, got {bad}")
        if self.mask is not None:
            if not self.multilabel:
                raise ValueError(f"Task {self.name!r}: a label mask is only meaningful for multi-label tasks")
            if self.mask.shape != want_shape:
                raise ValueError(f"Task {self.name!r}: mask has shape {self.mask.shape}, expected {want_shape}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def _expand(root: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def _need(path: str, dataset: str, layout: str) -> str:
    """Raise a FileNotFoundError that says what the dataset folder should contain if ``path`` is not a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: expected the metadata file {path} ({layout})")
    return path


def _read_csv(path: str, dataset: str, required: Sequence[str], delimiter: str = ",") -> tuple[list[str], list[dict]]:
    """Read a headed CSV; header names are whitespace-stripped; missing required columns -> ValueError."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = [(name or "").strip() for name in (reader.fieldnames or [])]
        reader.fieldnames = fields
        missing = [col for col in required if col not in fields]
        if missing:
            raise ValueError(f"{dataset}: {path} lacks the required column(s) {missing}; its header is {fields}")
        rows = [row for row in reader if any((v or "").strip() for v in row.values() if isinstance(v, str))]
    if not rows:
        raise ValueError(f"{dataset}: {path} lists no clips")
    return fields, rows


def _field(row: dict, column: str) -> str:
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def _int_column(rows: Sequence[dict], column: str, path: str, dataset: str) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        value = _field(row, column)
        try:
            out[i] = int(value)
        except ValueError:
            raise ValueError(
                f"{dataset}: {path} row {i + 2}: column {column!r} must be an integer, got {value!r}"
            ) from None
    return out


def _names_by_index(ids: np.ndarray, names: Sequence[str], path: str, dataset: str) -> list[str]:
    """Class names indexed by integer id; ids must cover 0..max without gaps and map to one name each."""
    mapping: dict[int, str] = {}
    for cid, name in zip(ids.tolist(), names, strict=True):
        if cid < 0:
            raise ValueError(f"{dataset}: {path}: negative class id {cid}")
        if mapping.setdefault(cid, name) != name:
            raise ValueError(f"{dataset}: {path}: class id {cid} is named both {mapping[cid]!r} and {name!r}")
    num_classes = max(mapping) + 1
    gaps = [i for i in range(num_classes) if i not in mapping]
    if gaps:
        raise ValueError(f"{dataset}: {path}: class ids are not contiguous, no clip has id(s) {gaps[:10]}")
    return [mapping[i] for i in range(num_classes)]


class _AudioIndex:
    """Existence checks through one cached ``os.listdir`` per directory."""

    def __init__(self) -> None:
        self._dirs: dict[str, frozenset[str]] = {}

    def _listing(self, directory: str) -> frozenset[str]:
        names = self._dirs.get(directory)
        if names is None:
            try:
                names = frozenset(os.listdir(directory))
            except (FileNotFoundError, NotADirectoryError):
                names = frozenset()
            self._dirs[directory] = names
        return names

    def exists(self, path: str) -> bool:
        directory, base = os.path.split(path)
        return base in self._listing(directory)

    def present(self, paths: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.exists(p) for p in paths), dtype=bool, count=len(paths))


def _finish(
    name: str,
    dataset: str,
    root: str,
    audio_hint: str,
    paths: Sequence[str],
    present: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    multilabel: bool,
    folds: np.ndarray | None = None,
    split: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> Task:
    """Drop clips whose audio is missing (one warning), then build the Task."""
    n = len(paths)
    keep = np.flatnonzero(present)
    if n and keep.size == 0:
        raise FileNotFoundError(
            f"{dataset}: none of the {n} audio files listed in the metadata exist (e.g. {paths[0]}); "
            f"expected the audio at {audio_hint}"
        )
    if keep.size < n:
        missing = [os.path.relpath(paths[i], root) for i in np.flatnonzero(~present)[:_MAX_NAMED_MISSING]]
        more = ", ..." if n - keep.size > len(missing) else ""
        warnings.warn(
            f"{dataset}: {n - keep.size} of {n} audio files listed in the metadata are missing under {root} "
            f"and were skipped: {', '.join(missing)}{more}",
            UserWarning,
            stacklevel=3,
        )
    return Task(
        name=name,
        files=[paths[i] for i in keep],
        labels=labels[keep],
        class_names=list(class_names),
        multilabel=multilabel,
        metric="mAP" if multilabel else "accuracy",
        folds=None if folds is None else np.asarray(folds, dtype=np.int64)[keep],
        split=None if split is None else np.asarray(split, dtype=str)[keep],
        mask=None if mask is None else mask[keep],
    )


def _multi_hot(rows: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    out = np.zeros((len(rows), num_classes), dtype=np.float32)
    for i, ids in enumerate(rows):
        out[i, list(ids)] = 1.0
    return out


# ----------------------------------------------------------------------------------------------------------------
# ESC-50
# ----------------------------------------------------------------------------------------------------------------

_ESC50_LAYOUT = "the ESC-50 repository layout: meta/esc50.csv and audio/*.wav"


def esc50(root: str) -> Task:
    """ESC-50 (Piczak 2015), 5-fold cross-validation, accuracy.

    Layout (the GitHub repository ``karolpiczak/ESC-50`` as downloaded)::

        root/meta/esc50.csv    header: filename,fold,target,category,esc10,src_file,take
        root/audio/<filename>  e.g. audio/1-100032-A-0.wav

    Clips are in metadata order. Class index = ``target`` (0..49); ``class_names[target]`` = ``category``.
    ``folds`` = ``fold`` (1..5).
    """
    root, dataset = _expand(root), "ESC-50"
    meta = _need(os.path.join(root, "meta", "esc50.csv"), dataset, _ESC50_LAYOUT)
    _, rows = _read_csv(meta, dataset, ("filename", "fold", "target", "category"))
    targets = _int_column(rows, "target", meta, dataset)
    class_names = _names_by_index(targets, [_field(r, "category") for r in rows], meta, dataset)
    paths = [os.path.join(root, "audio", _field(r, "filename")) for r in rows]
    return _finish(
        "esc50",
        dataset,
        root,
        os.path.join(root, "audio"),
        paths,
        _AudioIndex().present(paths),
        targets,
        class_names,
        multilabel=False,
        folds=_int_column(rows, "fold", meta, dataset),
    )


# ----------------------------------------------------------------------------------------------------------------
# UrbanSound8K
# ----------------------------------------------------------------------------------------------------------------

_US8K_LAYOUT = "the UrbanSound8K archive layout: metadata/UrbanSound8K.csv and audio/fold1..fold10/*.wav"


def us8k(root: str) -> Task:
    """UrbanSound8K (Salamon et al. 2014), 10-fold cross-validation, accuracy.

    Layout (the official ``UrbanSound8K`` archive, extracted)::

        root/metadata/UrbanSound8K.csv   header: slice_file_name,fsID,start,end,salience,fold,classID,class
        root/audio/fold<fold>/<slice_file_name>

    Clips are in metadata order. Class index = ``classID`` (0..9); ``class_names[classID]`` = ``class``.
    ``folds`` = ``fold`` (1..10).
    """
    root, dataset = _expand(root), "UrbanSound8K"
    meta = _need(os.path.join(root, "metadata", "UrbanSound8K.csv"), dataset, _US8K_LAYOUT)
    _, rows = _read_csv(meta, dataset, ("slice_file_name", "fold", "classID", "class"))
    class_ids = _int_column(rows, "classID", meta, dataset)
    folds = _int_column(rows, "fold", meta, dataset)
    class_names = _names_by_index(class_ids, [_field(r, "class") for r in rows], meta, dataset)
    paths = [
        os.path.join(root, "audio", f"fold{fold}", _field(r, "slice_file_name"))
        for r, fold in zip(rows, folds.tolist(), strict=True)
    ]
    return _finish(
        "us8k",
        dataset,
        root,
        os.path.join(root, "audio", "fold<k>"),
        paths,
        _AudioIndex().present(paths),
        class_ids,
        class_names,
        multilabel=False,
        folds=folds,
    )


# ----------------------------------------------------------------------------------------------------------------
# GTZAN (fault-filtered split)
# ----------------------------------------------------------------------------------------------------------------

_GTZAN_LAYOUT = (
    "the fault-filtered GTZAN split layout: train_filtered.txt, valid_filtered.txt, test_filtered.txt with lines "
    "like blues/blues.00029.wav, and the audio under genres/<genre>/ as .wav or the original .au"
)
_GTZAN_LISTS = (("train", "train_filtered.txt"), ("valid", "valid_filtered.txt"), ("test", "test_filtered.txt"))


def gtzan(root: str) -> Task:
    """GTZAN genre classification with the fault-filtered split (Kereliuk, Sturm & Larsen 2015), accuracy.

    Layout (split lists as distributed with ``jordipons/sklearn-audio-transfer-learning``, next to the
    extracted ``genres`` folder of the original archive)::

        root/train_filtered.txt    one clip per line, e.g. blues/blues.00029.wav
        root/valid_filtered.txt
        root/test_filtered.txt
        root/genres/<genre>/<file> the listed name, or the same stem with .au (original archive) or .wav

    Only the first whitespace-separated token of a line is used; the genre is the token's parent directory (or, for
    a bare file name, the part before the first dot). Clips are in list order: train, then valid, then test.
    Classes = the genres found in the lists, sorted alphabetically (blues, classical, country, disco, hiphop, jazz,
    metal, pop, reggae, rock). ``split`` = the list a clip comes from.
    """
    root, dataset = _expand(root), "GTZAN"
    lists = [(split, _need(os.path.join(root, fname), dataset, _GTZAN_LAYOUT)) for split, fname in _GTZAN_LISTS]
    entries: list[tuple[str, str, str]] = []  # (split, genre, file name)
    for split, path in lists:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                tokens = line.split()
                if not tokens:
                    continue
                parts = [p for p in tokens[0].replace("\\", "/").split("/") if p]
                fname = parts[-1]
                genre = parts[-2] if len(parts) > 1 else fname.split(".")[0]
                entries.append((split, genre, fname))
    if not entries:
        raise ValueError(f"{dataset}: the split lists in {root} list no clips")
    class_names = sorted({genre for _, genre, _ in entries})
    class_index = {g: i for i, g in enumerate(class_names)}
    index = _AudioIndex()
    paths, present = [], []
    for _, genre, fname in entries:
        directory = os.path.join(root, "genres", genre)
        stem = os.path.splitext(fname)[0]
        candidates = [os.path.join(directory, c) for c in dict.fromkeys((fname, stem + ".au", stem + ".wav"))]
        found = next((c for c in candidates if index.exists(c)), None)
        paths.append(found or candidates[0])
        present.append(found is not None)
    return _finish(
        "gtzan",
        dataset,
        root,
        os.path.join(root, "genres", "<genre>"),
        paths,
        np.asarray(present, dtype=bool),
        np.asarray([class_index[g] for _, g, _ in entries], dtype=np.int64),
        class_names,
        multilabel=False,
        split=np.asarray([s for s, _, _ in entries], dtype=str),
    )


# ----------------------------------------------------------------------------------------------------------------
# NSynth
# ----------------------------------------------------------------------------------------------------------------

_NSYNTH_LAYOUT = (
    "the NSynth json/wav layout: nsynth-train/, nsynth-valid/ and nsynth-test/, each with examples.json and audio/*.wav"
)


def nsynth(root: str) -> Task:
    """NSynth instrument-family classification (Engel et al. 2017), accuracy.

    Layout (the three official ``nsynth-*.jsonwav.tar.gz`` archives extracted side by side)::

        root/nsynth-{train,valid,test}/examples.json        {note_str: {"instrument_family": int,
                                                                        "instrument_family_str": str, ...}}
        root/nsynth-{train,valid,test}/audio/<note_str>.wav

    Clips: train, then valid, then test; within a part sorted by ``note_str``. Class index = ``instrument_family``
    with the fixed 11 names of :data:`NSYNTH_FAMILIES` (a conflicting ``instrument_family_str`` is an error).
    ``split`` = the part. Each JSON is read once and each audio folder listed once (no per-file ``stat``).
    """
    root, dataset = _expand(root), "NSynth"
    metas = [
        (split, _need(os.path.join(root, f"nsynth-{split}", "examples.json"), dataset, _NSYNTH_LAYOUT))
        for split in SPLITS
    ]
    index = _AudioIndex()
    paths: list[str] = []
    families: list[int] = []
    splits: list[str] = []
    for split, meta in metas:
        with open(meta, encoding="utf-8") as f:
            examples = json.load(f)
        if not isinstance(examples, dict):
            raise ValueError(f"{dataset}: {meta} must hold a JSON object note_str -> example")
        audio_dir = os.path.join(root, f"nsynth-{split}", "audio")
        for note in sorted(examples):
            example = examples[note]
            try:
                family = int(example["instrument_family"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{dataset}: {meta}: example {note!r} has no integer 'instrument_family'") from None
            if not 0 <= family < len(NSYNTH_FAMILIES):
                raise ValueError(f"{dataset}: {meta}: example {note!r} has instrument_family {family} out of 0..10")
            family_str = example.get("instrument_family_str")
            if family_str is not None and family_str != NSYNTH_FAMILIES[family]:
                raise ValueError(
                    f"{dataset}: {meta}: example {note!r} has instrument_family {family} "
                    f"({NSYNTH_FAMILIES[family]!r}) but instrument_family_str {family_str!r}"
                )
            paths.append(os.path.join(audio_dir, f"{note}.wav"))
            families.append(family)
            splits.append(split)
    if not paths:
        raise ValueError(f"{dataset}: the examples.json files under {root} list no clips")
    return _finish(
        "nsynth",
        dataset,
        root,
        os.path.join(root, "nsynth-<part>", "audio"),
        paths,
        index.present(paths),
        np.asarray(families, dtype=np.int64),
        NSYNTH_FAMILIES,
        multilabel=False,
        split=np.asarray(splits, dtype=str),
    )


# ----------------------------------------------------------------------------------------------------------------
# OpenMIC-2018
# ----------------------------------------------------------------------------------------------------------------

_OPENMIC_LAYOUT = (
    "the OpenMIC-2018 archive layout: openmic-2018-aggregated-labels.csv, class-map.json, "
    "partitions/split01_train.csv, partitions/split01_test.csv and audio/<key[:3]>/<key>.ogg"
)


def _read_keys(path: str) -> list[str]:
    keys: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            key = line.strip().split(",")[0].strip()
            if key and key != "sample_key":
                keys.append(key)
    return list(dict.fromkeys(keys))


def openmic(root: str) -> Task:
    """OpenMIC-2018 instrument recognition (Humphrey et al. 2018), multi-label with partial labels, mAP.

    Layout (the official ``openmic-2018-v1.0.0`` archive, extracted)::

        root/openmic-2018-aggregated-labels.csv  header: sample_key,instrument,relevance,num_responses
        root/class-map.json                      {instrument: index}, 20 instruments
        root/partitions/split01_train.csv        one sample_key per line, no header
        root/partitions/split01_test.csv
        root/audio/<sample_key[:3]>/<sample_key>.ogg

    Clips: the train partition in file order, then the test partition (clips listed in neither are ignored).
    Class index = ``class-map.json`` value. ``labels[i, c]`` = 1 if ``relevance >= 0.5`` else 0, and
    ``mask[i, c]`` = 1 only for (clip, instrument) pairs present in the labels CSV; all other pairs are unknown
    (mask 0, label 0) and must be excluded from the loss and the metric. The dataset defines no validation split:
    ``split`` holds only ``"train"`` / ``"test"`` and the harness draws validation clips from train.
    """
    root, dataset = _expand(root), "OpenMIC-2018"
    labels_csv = _need(os.path.join(root, "openmic-2018-aggregated-labels.csv"), dataset, _OPENMIC_LAYOUT)
    class_map_path = _need(os.path.join(root, "class-map.json"), dataset, _OPENMIC_LAYOUT)
    partitions = [
        (split, _need(os.path.join(root, "partitions", f"split01_{split}.csv"), dataset, _OPENMIC_LAYOUT))
        for split in ("train", "test")
    ]
    with open(class_map_path, encoding="utf-8") as f:
        class_map = json.load(f)
    if not isinstance(class_map, dict) or not class_map:
        raise ValueError(f"{dataset}: {class_map_path} must hold a JSON object instrument -> index")
    class_names = [name for name, _ in sorted(class_map.items(), key=lambda item: int(item[1]))]
    if sorted(int(v) for v in class_map.values()) != list(range(len(class_map))):
        raise ValueError(f"{dataset}: {class_map_path}: indices must be 0..{len(class_map) - 1}, each once")
    class_index = {name: int(i) for name, i in class_map.items()}

    _, rows = _read_csv(labels_csv, dataset, ("sample_key", "instrument", "relevance"))
    known: dict[str, list[tuple[int, float]]] = {}
    for line_no, row in enumerate(rows, start=2):
        instrument = _field(row, "instrument")
        if instrument not in class_index:
            raise ValueError(f"{dataset}: {labels_csv} row {line_no}: instrument {instrument!r} not in class-map.json")
        try:
            relevance = float(_field(row, "relevance"))
        except ValueError:
            raise ValueError(f"{dataset}: {labels_csv} row {line_no}: relevance must be a number") from None
        known.setdefault(_field(row, "sample_key"), []).append((class_index[instrument], relevance))

    keys: list[str] = []
    splits: list[str] = []
    seen: dict[str, str] = {}
    for split, path in partitions:
        for key in _read_keys(path):
            if key in seen:
                raise ValueError(f"{dataset}: sample_key {key!r} is in both the {seen[key]} and {split} partitions")
            seen[key] = split
            keys.append(key)
            splits.append(split)
    if not keys:
        raise ValueError(f"{dataset}: the partition files under {os.path.join(root, 'partitions')} list no clips")

    num_classes = len(class_names)
    labels = np.zeros((len(keys), num_classes), dtype=np.float32)
    mask = np.zeros((len(keys), num_classes), dtype=np.float32)
    for i, key in enumerate(keys):
        for cls, relevance in known.get(key, ()):
            labels[i, cls] = 1.0 if relevance >= 0.5 else 0.0
            mask[i, cls] = 1.0
    paths = [os.path.join(root, "audio", key[:3], f"{key}.ogg") for key in keys]
    return _finish(
        "openmic",
        dataset,
        root,
        os.path.join(root, "audio", "<key[:3]>"),
        paths,
        _AudioIndex().present(paths),
        labels,
        class_names,
        multilabel=True,
        split=np.asarray(splits, dtype=str),
        mask=mask,
    )


# ----------------------------------------------------------------------------------------------------------------
# FSD50K
# ----------------------------------------------------------------------------------------------------------------

_FSD50K_LAYOUT = (
    "the FSD50K Zenodo layout: FSD50K.ground_truth/{dev,eval,vocabulary}.csv, FSD50K.dev_audio/*.wav and "
    "FSD50K.eval_audio/*.wav"
)


def _fsd50k_vocabulary(path: str, dataset: str) -> list[str]:
    entries: list[tuple[int, str]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            try:
                idx = int(row[0])
            except ValueError:
                if line_no == 1:  # tolerate a header line although the official file has none
                    continue
                raise ValueError(f"{dataset}: {path} line {line_no}: expected 'index,name,mid', got {row}") from None
            if len(row) < 2:
                raise ValueError(f"{dataset}: {path} line {line_no}: expected 'index,name,mid', got {row}")
            entries.append((idx, row[1].strip()))
    entries.sort()
    if [i for i, _ in entries] != list(range(len(entries))) or not entries:
        raise ValueError(f"{dataset}: {path}: indices must be 0..N-1, each once")
    names = [name for _, name in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{dataset}: {path}: class names are not unique")
    return names


def fsd50k(root: str) -> Task:
    """FSD50K (Fonseca et al. 2022), 200-class multi-label, mAP.

    Layout (the Zenodo archives, extracted)::

        root/FSD50K.ground_truth/dev.csv         header: fname,labels,mids,split  (split: train | val)
        root/FSD50K.ground_truth/eval.csv        header: fname,labels,mids
        root/FSD50K.ground_truth/vocabulary.csv  no header: index,name,mid (200 rows)
        root/FSD50K.dev_audio/<fname>.wav
        root/FSD50K.eval_audio/<fname>.wav

    ``labels`` is a quoted, comma-separated list of vocabulary names. Clips: dev.csv order, then eval.csv order.
    Class index = vocabulary index. ``split``: dev ``train`` -> ``"train"``, dev ``val`` -> ``"valid"``,
    eval -> ``"test"``.
    """
    root, dataset = _expand(root), "FSD50K"
    gt = os.path.join(root, "FSD50K.ground_truth")
    dev_csv = _need(os.path.join(gt, "dev.csv"), dataset, _FSD50K_LAYOUT)
    eval_csv = _need(os.path.join(gt, "eval.csv"), dataset, _FSD50K_LAYOUT)
    vocab_csv = _need(os.path.join(gt, "vocabulary.csv"), dataset, _FSD50K_LAYOUT)
    class_names = _fsd50k_vocabulary(vocab_csv, dataset)
    class_index = {name: i for i, name in enumerate(class_names)}

    paths: list[str] = []
    label_ids: list[list[int]] = []
    splits: list[str] = []

    def add(row: dict, line_no: int, path: str, audio_dir: str, split: str) -> None:
        ids = []
        for name in _field(row, "labels").split(","):
            name = name.strip()
            if not name:
                continue
            if name not in class_index:
                raise ValueError(f"{dataset}: {path} row {line_no}: label {name!r} is not in vocabulary.csv")
            ids.append(class_index[name])
        paths.append(os.path.join(audio_dir, f"{_field(row, 'fname')}.wav"))
        label_ids.append(ids)
        splits.append(split)

    _, dev_rows = _read_csv(dev_csv, dataset, ("fname", "labels", "split"))
    for line_no, row in enumerate(dev_rows, start=2):
        split = {"train": "train", "val": "valid"}.get(_field(row, "split"))
        if split is None:
            raise ValueError(f"{dataset}: {dev_csv} row {line_no}: split must be 'train' or 'val'")
        add(row, line_no, dev_csv, os.path.join(root, "FSD50K.dev_audio"), split)
    _, eval_rows = _read_csv(eval_csv, dataset, ("fname", "labels"))
    for line_no, row in enumerate(eval_rows, start=2):
        add(row, line_no, eval_csv, os.path.join(root, "FSD50K.eval_audio"), "test")

    return _finish(
        "fsd50k",
        dataset,
        root,
        os.path.join(root, "FSD50K.{dev,eval}_audio"),
        paths,
        _AudioIndex().present(paths),
        _multi_hot(label_ids, len(class_names)),
        class_names,
        multilabel=True,
        split=np.asarray(splits, dtype=str),
    )


# ----------------------------------------------------------------------------------------------------------------
# MagnaTagATune (top-50)
# ----------------------------------------------------------------------------------------------------------------

_MTT_LAYOUT = (
    "the MagnaTagATune layout: annotations_final.csv (tab-separated: clip_id, 188 tag columns, mp3_path) and "
    "mp3/<0-f>/*.mp3"
)
_MTT_SPLIT = {**{c: "train" for c in "0123456789ab"}, "c": "valid", **{c: "test" for c in "def"}}


def mtt(root: str, top_k: int = 50) -> Task:
    """MagnaTagATune top-50 tagging (Law et al. 2009), multi-label, mAP.

    Layout (``annotations_final.csv`` next to the extracted ``mp3.zip.00[1-3]`` parts)::

        root/annotations_final.csv   TAB-separated, fields may be double-quoted;
                                     header: clip_id, 188 tag columns (0/1), mp3_path
        root/mp3/<mp3_path>          e.g. mp3/f/american_bach_soloists-...-01-bwv54__i_aria-30-59.mp3

    Tags = every column except ``clip_id`` and ``mp3_path``. The ``top_k`` (50) tags with the most positive clips
    over the whole file are kept; class order = descending count, ties broken by column order. All clips are kept,
    including those with no positive top-50 tag. Clips are in file order. ``split`` by the first character of the
    ``mp3_path`` directory: ``0``-``b`` train, ``c`` valid, ``d``-``f`` test (the common 12:1:3 split).
    """
    root, dataset = _expand(root), "MagnaTagATune"
    meta = _need(os.path.join(root, "annotations_final.csv"), dataset, _MTT_LAYOUT)
    fields, rows = _read_csv(meta, dataset, ("clip_id", "mp3_path"), delimiter="\t")
    tags = [f for f in fields if f and f not in ("clip_id", "mp3_path")]
    if not tags:
        raise ValueError(f"{dataset}: {meta} has no tag columns")
    matrix = np.zeros((len(rows), len(tags)), dtype=np.float32)
    paths: list[str] = []
    splits: list[str] = []
    for i, row in enumerate(rows):
        line_no = i + 2
        for j, tag in enumerate(tags):
            value = _field(row, tag)
            try:
                matrix[i, j] = 1.0 if int(value) else 0.0
            except ValueError:
                raise ValueError(
                    f"{dataset}: {meta} row {line_no}: tag {tag!r} must be 0 or 1, got {value!r}"
                ) from None
        mp3_path = _field(row, "mp3_path").replace("\\", "/")
        split = _MTT_SPLIT.get(mp3_path.split("/")[0][:1].lower())
        if split is None:
            raise ValueError(f"{dataset}: {meta} row {line_no}: mp3_path {mp3_path!r} must start with a directory 0..f")
        paths.append(os.path.join(root, "mp3", *mp3_path.split("/")))
        splits.append(split)
    counts = matrix.sum(axis=0)
    order = sorted(range(len(tags)), key=lambda j: (-counts[j], j))[:top_k]
    return _finish(
        "mtt",
        dataset,
        root,
        os.path.join(root, "mp3", "<0-f>"),
        paths,
        _AudioIndex().present(paths),
        matrix[:, order],
        [tags[j] for j in order],
        multilabel=True,
        split=np.asarray(splits, dtype=str),
    )


# ----------------------------------------------------------------------------------------------------------------
# Generic folder + CSV
# ----------------------------------------------------------------------------------------------------------------

_FOLDER_LAYOUT = (
    "a folder with labels.csv whose header has path, labels and either split (train/valid/test) or fold (integer); "
    "labels are class names separated by ';' and paths are relative to the folder or absolute"
)


def folder(root: str) -> Task:
    """Any dataset described by one CSV.

    Layout::

        root/labels.csv  header with: path, labels, and split (train | valid | test) or fold (integer)
        root/<path>      or an absolute path

    ``labels`` holds one class name or several separated by ``;`` (surrounding spaces ignored, duplicates merged).
    The task is multi-label (mAP) if any row has a number of labels other than one, else single-label (accuracy).
    Classes = the sorted unique names over all rows. Clips are in CSV order. A missing ``path`` / ``labels``
    column, neither or both of ``split`` / ``fold``, or an unknown split value raises ValueError.
    """
    root, dataset = _expand(root), "folder"
    meta = _need(os.path.join(root, "labels.csv"), dataset, _FOLDER_LAYOUT)
    fields, rows = _read_csv(meta, dataset, ("path", "labels"))
    has_split, has_fold = "split" in fields, "fold" in fields
    if has_split == has_fold:
        which = "both" if has_split else "neither"
        raise ValueError(f"{dataset}: {meta} must have exactly one of the columns 'split' or 'fold', it has {which}")
    row_labels = [list(dict.fromkeys(n.strip() for n in _field(r, "labels").split(";") if n.strip())) for r in rows]
    multilabel = any(len(names) != 1 for names in row_labels)
    class_names = sorted({n for names in row_labels for n in names})
    if not class_names:
        raise ValueError(f"{dataset}: {meta}: no row has a label")
    class_index = {n: i for i, n in enumerate(class_names)}
    if multilabel:
        labels = _multi_hot([[class_index[n] for n in names] for names in row_labels], len(class_names))
    else:
        labels = np.asarray([class_index[names[0]] for names in row_labels], dtype=np.int64)
    folds = split = None
    if has_fold:
        folds = _int_column(rows, "fold", meta, dataset)
    else:
        split = np.asarray([_field(r, "split") for r in rows], dtype=str)
        bad = sorted(set(split.tolist()) - set(SPLITS))
        if bad:
            raise ValueError(f"{dataset}: {meta}: split values must be one of {list(SPLITS)}, got {bad}")
    paths = [os.path.normpath(os.path.join(root, _field(r, "path"))) for r in rows]
    return _finish(
        "folder",
        dataset,
        root,
        root,
        paths,
        _AudioIndex().present(paths),
        labels,
        class_names,
        multilabel=multilabel,
        folds=folds,
        split=split,
    )


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

ADAPTERS: dict[str, Callable[[str], Task]] = {
    "esc50": esc50,
    "us8k": us8k,
    "gtzan": gtzan,
    "nsynth": nsynth,
    "openmic": openmic,
    "fsd50k": fsd50k,
    "mtt": mtt,
    "folder": folder,
}


def load_task(name: str, root: str) -> Task:
    """Load the task ``name`` (a key of :data:`ADAPTERS`) from the local dataset folder ``root``."""
    adapter = ADAPTERS.get(name)
    if adapter is None:
        raise ValueError(f"unknown dataset adapter {name!r}; available: {', '.join(sorted(ADAPTERS))}")
    return adapter(root)
