"""A labelled audio folder + CSV as a TFDS dataset in ArrayRecord format, readable without TensorFlow.

The CSV has the columns ``path`` (relative to the folder, or absolute), ``label`` (a class name, or several
separated by ``;`` for a multi-label set) and optionally ``split`` (a split name such as train / validation /
test; ``train`` when absent or empty) and ``fold`` (an int; ``-1`` when absent or empty)::

    builder = make_builder("my_eval_set", folder, csv_path, data_dir)
    builder.download_and_prepare(file_format="array_record")
    sources = tfds.data_source("my_eval_set", data_dir=data_dir)  # {split: ArrayRecordDataSource}, for grain

or in one call ``prepare_labelled_folder(name, folder, csv_path, data_dir)``, or from the command line::

    python -m matpac_jax.data.tfds_audio --name=my_eval_set --folder=AUDIO_DIR --csv=labels.csv --data_dir=DATA_DIR

Such a dataset is read, without TensorFlow, for pretraining (``config.data.source='tfds'``) and probing
(``--dataset=tfds:NAME``) by ``matpac_jax.data.tfds_source``. Every record is a dict:

- ``audio``: the file decoded by ``matpac_jax.audio.io.load_audio`` (mono, resampled to ``sample_rate`` with soxr
  HQ), as int16 PCM (``to_int16``: clipped to [-1, 1]; ``from_int16`` gives float32 back) or float32;
- ``sample_rate``: int32 scalar; ``key``: bytes, the CSV ``path``; ``fold``: int32 scalar;
- ``label``: int64 class index (``tfds.features.ClassLabel``, names sorted) for a single-label set, or an int8
  multi-hot vector over the sorted class names for a multi-label set (any ``;`` in the labels, or
  ``multi_label=True``). The class names are also in ``dataset_info.metadata["class_names"]``.

Files that ``load_audio`` rejects (``AudioError``: missing, corrupt, empty, non-finite) are skipped; they are listed
as ``[path, reason]`` pairs in ``builder.skipped`` and in ``dataset_info.metadata["skipped"]`` (metadata.json).
A split left with no usable file is an error. Records are stored in TFDS's shuffled order, not in CSV order.

Only feature types that encode and decode without TensorFlow are used (checked with tensorflow-datasets 4.9.10):
``Tensor`` (any numpy dtype, fixed or ``None`` dims), ``ClassLabel``, ``Text`` and ``Sequence``; ``Audio`` and
``tfds.load`` need TensorFlow. The builder class is created without registering it in the TFDS catalogue, so
``tfds.data_source(name, data_dir=...)`` reads the prepared files (in this process or any other) from their
``dataset_info.json`` / ``features.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import registered

from matpac_jax.audio.io import AudioError, load_audio, to_int16

REQUIRED_COLUMNS = ("path", "label")
LABEL_SEPARATOR = ";"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # dataset and split names


@dataclass(frozen=True)
class Row:
    """One CSV row: ``path`` as written in the CSV, resolved ``file``, class names, split and fold."""

    path: str
    file: str
    labels: tuple[str, ...]
    split: str
    fold: int


def read_csv(csv_path: str | os.PathLike, folder: str | os.PathLike) -> list[Row]:
    """Parse and validate the CSV; errors name the CSV and the offending column / line."""
    csv_path = os.fspath(csv_path)
    folder = os.fspath(folder)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"labels CSV not found: {csv_path}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"audio folder not found: {folder}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"{csv_path}: missing required column(s) {', '.join(repr(c) for c in missing)}; found {columns}"
            )
        rows: list[Row] = []
        seen: dict[str, int] = {}
        for line, raw in enumerate(reader, start=2):
            record = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str | None)}
            path = record["path"]
            if not path:
                raise ValueError(f"{csv_path}:{line}: empty 'path'")
            if path in seen:
                raise ValueError(f"{csv_path}:{line}: duplicate 'path' {path!r} (first on line {seen[path]})")
            seen[path] = line
            labels = tuple(dict.fromkeys(s.strip() for s in record["label"].split(LABEL_SEPARATOR) if s.strip()))
            if not labels:
                raise ValueError(f"{csv_path}:{line}: empty 'label' for {path!r}")
            split = record.get("split") or "train"
            if not _NAME_RE.match(split):
                raise ValueError(f"{csv_path}:{line}: invalid 'split' {split!r} (e.g. train, validation, test)")
            fold_text = record.get("fold") or ""
            try:
                fold = int(fold_text) if fold_text else -1
            except ValueError:
                raise ValueError(f"{csv_path}:{line}: 'fold' must be an integer, got {fold_text!r}") from None
            rows.append(Row(path, os.path.join(folder, path), labels, split, fold))
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    return rows


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
    try:
        registered.imported_builder_cls(name)
    except registered.DatasetNotFoundError:
        return
    raise ValueError(f"dataset name {name!r} is a TFDS catalogue dataset: tfds.data_source would load that one")


def make_builder(
    name: str,
    folder: str | os.PathLike,
    csv_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    sample_rate: int = 16000,
    audio_dtype: str = "int16",
    multi_label: bool | None = None,
    workers: int = 8,
    version: str = "1.0.0",
) -> tfds.core.GeneratorBasedBuilder:
    """A TFDS builder for ``folder`` + ``csv_path``; call ``download_and_prepare(file_format="array_record")``.

    ``multi_label=None`` infers it (any label with ``;``). ``workers`` threads decode files in parallel (the order
    of the records does not depend on it). The CSV is read and validated here.
    """
    _check_name(name)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if audio_dtype not in ("int16", "float32"):
        raise ValueError(f"audio_dtype must be 'int16' or 'float32', got {audio_dtype!r}")
    rows = read_csv(csv_path, folder)
    class_names = sorted({label for row in rows for label in row.labels})
    if multi_label is None:
        multi_label = any(len(row.labels) > 1 for row in rows)
    elif not multi_label:
        multi = [row.path for row in rows if len(row.labels) > 1]
        if multi:
            raise ValueError(f"{os.fspath(csv_path)}: multi_label=False but {multi[0]!r} has several labels")
    splits = sorted({row.split for row in rows})
    index = {c: i for i, c in enumerate(class_names)}
    dtype = np.int16 if audio_dtype == "int16" else np.float32
    label_feature = (
        tfds.features.Tensor(shape=(len(class_names),), dtype=np.int8)
        if multi_label
        else tfds.features.ClassLabel(names=class_names)
    )

    def encode_label(labels: tuple[str, ...]):
        if not multi_label:
            return index[labels[0]]
        hot = np.zeros(len(class_names), np.int8)
        hot[[index[c] for c in labels]] = 1
        return hot

    def decode(row: Row) -> tuple[Row, np.ndarray | None, str | None]:
        try:
            wave = load_audio(row.file, sample_rate=sample_rate)
        except AudioError as e:
            return row, None, e.reason
        return row, (to_int16(wave) if dtype == np.int16 else wave.astype(np.float32)), None

    class _LabelledAudioFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls) -> epath.Path:
            # TFDS's default probes `importlib_resources` (not installed) for a class in an installed package; it
            # is only used to look for a checksums.tsv next to the code, which this builder (no downloads) lacks.
            return epath.Path(__file__)

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.skipped: list[list[str]] = []

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Labelled audio from {os.fspath(folder)} with labels {os.fspath(csv_path)}.",
                features=tfds.features.FeaturesDict(
                    {
                        "audio": tfds.features.Tensor(shape=(None,), dtype=dtype),
                        "sample_rate": tfds.features.Tensor(shape=(), dtype=np.int32),
                        "label": label_feature,
                        "key": tfds.features.Text(),
                        "fold": tfds.features.Tensor(shape=(), dtype=np.int32),
                    }
                ),
                metadata=tfds.core.MetadataDict(
                    class_names=class_names, multi_label=bool(multi_label), sample_rate=sample_rate, skipped=[]
                ),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in splits}

        def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
            split_rows = [row for row in rows if row.split == split]
            written = 0
            chunk = 4 * max(1, workers)  # bounded look-ahead: at most `chunk` decoded files held at once
            with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
                decoded = (
                    r for i in range(0, len(split_rows), chunk) for r in pool.map(decode, split_rows[i : i + chunk])
                )
                for row, audio, reason in decoded:
                    if audio is None:
                        self._skip(row, reason)
                        continue
                    written += 1
                    yield (
                        row.path,
                        {
                            "audio": audio,
                            "sample_rate": sample_rate,
                            "label": encode_label(row.labels),
                            "key": row.path,
                            "fold": row.fold,
                        },
                    )
            if not written:
                raise ValueError(
                    f"split {split!r}: none of its {len(split_rows)} files could be decoded; "
                    f"first skipped: {self.skipped[-len(split_rows)]}"
                )

        def _skip(self, row: Row, reason: str | None) -> None:
            entry = [row.path, reason or "unknown"]
            self.skipped.append(entry)
            self.info.metadata["skipped"].append(entry)

    _LabelledAudioFolder.__name__ = _LabelledAudioFolder.__qualname__ = f"LabelledAudioFolder_{name}"
    _LabelledAudioFolder.name = name
    return _LabelledAudioFolder(data_dir=os.fspath(data_dir))


def prepare_labelled_folder(
    name: str,
    folder: str | os.PathLike,
    csv_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    sample_rate: int = 16000,
    overwrite: bool = False,
    **builder_kwargs,
) -> dict[str, Sequence]:
    """Build (unless already prepared; ``overwrite=True`` rebuilds) and return ``tfds.data_source`` by split.

    Files skipped in this build are in ``metadata["skipped"]`` of any returned source's ``dataset_info``.
    """
    version_dir = os.path.join(os.fspath(data_dir), name, builder_kwargs.get("version", "1.0.0"))
    if overwrite and os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
        # Deleted before the builder exists: a builder made over prepared files refuses FORCE_REDOWNLOAD.
        shutil.rmtree(version_dir)
    builder = make_builder(name, folder, csv_path, data_dir, sample_rate=sample_rate, **builder_kwargs)
    builder.download_and_prepare(file_format="array_record")
    return tfds.data_source(name, data_dir=os.fspath(data_dir))


def main(argv: list[str] | None = None) -> int:
    """Prepare a folder + CSV as a tfds dataset (ArrayRecord); exit status 2 with the reason for unusable input."""
    ap = argparse.ArgumentParser(prog="python -m matpac_jax.data.tfds_audio", description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="dataset name (snake_case): tfds:NAME, config.data.tfds_name")
    ap.add_argument("--folder", required=True, help="folder the CSV paths are relative to")
    ap.add_argument("--csv", dest="csv_path", required=True, help="CSV with columns path, label[, split][, fold]")
    ap.add_argument("--data_dir", required=True, help="tfds data_dir to prepare the dataset in")
    ap.add_argument("--sample_rate", type=int, default=16000)
    ap.add_argument("--audio_dtype", default="int16", choices=("int16", "float32"))
    ap.add_argument("--workers", type=int, default=8, help="threads decoding audio files")
    ap.add_argument("--overwrite", action="store_true", help="rebuild a dataset already prepared there")
    args = ap.parse_args(argv)
    try:
        sources = prepare_labelled_folder(**vars(args))  # flag names = parameter names
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = next(iter(sources.values())).dataset_info
    counts = ", ".join(f"{split} {len(source)}" for split, source in sorted(sources.items()))
    print(f"prepared {info.full_name} in {info.data_dir}: {counts} clips; {len(info.metadata['skipped'])} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
