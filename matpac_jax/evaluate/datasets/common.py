"""What every dataset adapter shares: the :class:`Task` they return and the metadata / audio helpers.

Common behaviour of the adapters (each in its own module of this package):

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
"""

from __future__ import annotations

import csv
import dataclasses
import os
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "AudioIndex",
    "SPLITS",
    "Task",
    "expand",
    "field",
    "finish",
    "int_column",
    "multi_hot",
    "names_by_index",
    "need",
    "read_csv",
]

SPLITS = ("train", "valid", "test")

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


def expand(root: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def need(path: str, dataset: str, layout: str) -> str:
    """Raise a FileNotFoundError that says what the dataset folder should contain if ``path`` is not a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: expected the metadata file {path} ({layout})")
    return path


def read_csv(path: str, dataset: str, required: Sequence[str], delimiter: str = ",") -> tuple[list[str], list[dict]]:
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


def field(row: dict, column: str) -> str:
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def int_column(rows: Sequence[dict], column: str, path: str, dataset: str) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        value = field(row, column)
        try:
            out[i] = int(value)
        except ValueError:
            raise ValueError(
                f"{dataset}: {path} row {i + 2}: column {column!r} must be an integer, got {value!r}"
            ) from None
    return out


def names_by_index(ids: np.ndarray, names: Sequence[str], path: str, dataset: str) -> list[str]:
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


class AudioIndex:
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


def finish(
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


def multi_hot(rows: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    out = np.zeros((len(rows), num_classes), dtype=np.float32)
    for i, ids in enumerate(rows):
        out[i, list(ids)] = 1.0
    return out
