"""Read tfds datasets prepared in ArrayRecord format, without TensorFlow: open a split, get its clips as int16 PCM.

``tfds.data_source(name, split=..., data_dir=..., download=False)`` gives a random-access source of decoded records
(the files' ``dataset_info.json`` / ``features.json`` describe them; the builder class need not be importable, and
nothing is downloaded or generated here). Two readers use it:

- pretraining (``config.data.source='tfds'``): ``TfdsAudioSource``, one split as a random-access source of int16 PCM
  clips that ``pipeline.pretrain_dataset`` shuffles, crops and batches exactly like record shards;
- probing (``--dataset=tfds:NAME``): ``evaluate.datasets.tfds_task``.

What a record must hold (``matpac_jax.data.tfds_audio`` builds such datasets from a folder + CSV):

- ``audio``: a ``tfds.features.Tensor`` of int16 PCM (``int16 / 32767`` is the waveform, as ``audio.io.from_int16``)
  or float (clipped to [-1, 1] and rounded to int16 here), ``[samples]`` or ``[samples, channels]`` (channels are
  averaged). ``tfds.features.Audio`` cannot be used: building that feature needs TensorFlow (tfds 4.9.10).
- the sample rate: ``dataset_info.metadata['sample_rate']``, else a ``sample_rate`` feature of each record.
- for probing, a ``label``: ``ClassLabel`` (single-label) or an integer ``Tensor [C]`` multi-hot vector whose class
  names are ``metadata['class_names']``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np
from google.protobuf.json_format import ParseError

from matpac_jax.audio.io import to_int16

PREPARE_HINT = (
    "prepare it in ArrayRecord format: python -m matpac_jax.data.tfds_audio --name=NAME --folder=AUDIO_DIR "
    "--csv=LABELS.csv --data_dir=DATA_DIR (or, for a tfds builder of your own, "
    "builder.download_and_prepare(file_format='array_record'))"
)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """``data_dir``, or tfds's default when empty: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    chosen = os.fspath(data_dir or "") or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.abspath(os.path.expanduser(chosen))


def prepared_names(data_dir: str) -> list[str]:
    """``name[/config]:version`` of every dataset prepared under ``data_dir`` (for error messages)."""
    found = []
    for depth in ("*/*", "*/*/*"):
        for info in glob.glob(os.path.join(data_dir, depth, "dataset_info.json")):
            parts = os.path.relpath(os.path.dirname(info), data_dir).split(os.sep)
            found.append(f"{'/'.join(parts[:-1])}:{parts[-1]}")
    return sorted(found)


def open_split(name: str, data_dir: str | os.PathLike | None, split: str | None, label: str = ""):
    """``tfds.data_source(name, split=split, data_dir=..., download=False)`` (``split=None``: ``{split: source}``).

    Errors start with ``label`` (the config key or flag that named the dataset) and name the directory searched and
    the fix: FileNotFoundError for a dataset not prepared there, ValueError for an unknown split, a format other than
    ArrayRecord or features that need TensorFlow.
    """
    import tensorflow_datasets as tfds

    data_dir = resolve_data_dir(data_dir)
    label = label or f"tfds dataset {name!r}"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        here = ", ".join(prepared_names(data_dir)) or "none"
        base = name.partition(":")[0]
        if any(p.partition(":")[0] == base for p in prepared_names(data_dir)):  # there, but tfds cannot read it
            raise ValueError(
                f"{label} under {data_dir} is damaged (its dataset_info.json or features.json cannot be read): "
                f"{DAMAGED_FIX}"
            ) from None
        raise FileNotFoundError(
            f"{label}: not prepared under {data_dir} (looked for {data_dir}/{base}/<version>/dataset_info.json; "
            f"prepared there: {here}); give the data_dir it was prepared in, or {PREPARE_HINT}"
        ) from None
    except NotImplementedError as e:  # tfds: "Random access data source for file format ... is not supported"
        raise ValueError(
            f"{label} under {data_dir} is not stored in ArrayRecord format ({str(e).splitlines()[0]}): rebuild it "
            "with download_and_prepare(file_format='array_record') into another data_dir"
        ) from None
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise
        raise ValueError(
            f"{label} under {data_dir}: its features need TensorFlow to be read (e.g. tfds.features.Audio or Image); "
            f"store the audio as tfds.features.Tensor (int16 or float32), as matpac_jax.data.tfds_audio does"
        ) from None
    except ValueError as e:  # tfds: "Unknown split 'x'. Should be one of [...]"
        raise ValueError(f"{label} under {data_dir}: {e}") from None
    except (RuntimeError, OSError, ParseError) as e:  # a truncated or missing shard, a garbled dataset_info.json
        raise ValueError(f"{label} under {data_dir} is damaged ({_last_line(e)}): {DAMAGED_FIX}") from None


DAMAGED_FIX = "prepare the dataset again (python -m matpac_jax.data.tfds_audio) or restore its directory"


def _last_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def read_record(source: Sequence, index: int, label: str) -> dict:
    """``source[index]``, with a damaged shard (array_record's RuntimeError) a ValueError naming the record and the
    fix: the one read of a tfds record, for training and the probe alike."""
    try:
        return source[index]
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{label}: record {index} cannot be read ({_last_line(e)}): {DAMAGED_FIX}") from None


def sample_rate_of(info) -> int | None:
    """The dataset's sample rate from ``metadata['sample_rate']``, or None (then each record must carry it)."""
    rate = (info.metadata or {}).get("sample_rate")
    return None if rate is None else int(rate)


def record_pcm(record: dict, index: int, label: str) -> np.ndarray:
    """The int16 PCM [samples] of a decoded record: float clipped and rounded, channels averaged."""
    audio = np.asarray(record["audio"])
    if audio.ndim == 2:
        audio = audio.astype(np.float32).mean(axis=1) / (32767.0 if audio.dtype == np.int16 else 1.0)
    if audio.ndim != 1:
        raise ValueError(f"{label}: record {index} has audio of shape {audio.shape}, expected [samples(, channels)]")
    if audio.dtype == np.int16:
        return audio
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"{label}: record {index} has {audio.dtype} audio, expected int16 PCM or float samples")
    try:
        return to_int16(audio)
    except ValueError as e:
        raise ValueError(f"{label}: record {index}: {e}") from None


class TfdsAudioSource:
    """One tfds split as a random-access source of int16 PCM clips ``[samples]`` at ``sample_rate``, for grain.

    ``open`` checks, before any training, that the split exists, is non-empty, holds an ``audio`` feature and is
    at ``sample_rate``; a record whose own ``sample_rate`` differs raises when read. Picklable (grain workers).
    """

    def __init__(self, source: Sequence, sample_rate: int, label: str, per_record_rate: bool):
        self._source, self.sample_rate, self.label, self._per_record_rate = source, sample_rate, label, per_record_rate

    @classmethod
    def open(
        cls, name: str, data_dir: str | os.PathLike | None, split: str, sample_rate: int, label: str = ""
    ) -> TfdsAudioSource:
        label = label or f"tfds dataset {name!r}"
        source = open_split(name, data_dir, split, label)
        label = f"{label} split {split!r}"
        features = source.dataset_info.features
        if "audio" not in features:
            raise ValueError(f"{label}: no 'audio' feature (it has {sorted(features)}); see data/tfds_source.py")
        rate = sample_rate_of(source.dataset_info)
        if rate is None and "sample_rate" not in features:
            raise ValueError(f"{label}: no sample rate: neither metadata['sample_rate'] nor a 'sample_rate' feature")
        if rate is not None and rate != sample_rate:
            raise ValueError(
                f"{label} is at {rate} Hz, the model reads {sample_rate} Hz (config.audio.sample_rate): prepare the "
                f"dataset at {sample_rate} Hz (python -m matpac_jax.data.tfds_audio --sample_rate={sample_rate})"
            )
        if len(source) == 0:
            raise ValueError(f"{label} holds no records")
        read_record(source, 0, label)  # a damaged shard fails here, before compute, rather than in a grain worker
        return cls(source, sample_rate, label, per_record_rate=rate is None)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> np.ndarray:
        record = read_record(self._source, index, self.label)
        if self._per_record_rate and int(record["sample_rate"]) != self.sample_rate:
            raise ValueError(
                f"{self.label}: record {index} is at {int(record['sample_rate'])} Hz, expected {self.sample_rate} Hz"
            )
        return record_pcm(record, index, self.label)

    def __repr__(self) -> str:
        return f"TfdsAudioSource({self.label}, {len(self)} clips at {self.sample_rate} Hz)"
