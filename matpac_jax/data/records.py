"""The clip record format (schema version 1) and ArrayRecord shards of clip records.

Shards
------
A shard is an ArrayRecord file written with ``group_size:1`` (every record is its own chunk, so record ``i`` is read
without decoding its neighbours: random access for a shuffled input pipeline), uncompressed by default or with
ArrayRecord's zstd (``compression="zstd"``: readers need not know, each chunk says how it is stored). zstd saves only
~12 % on int16 PCM of 10-s clips and nothing on FLAC, but costs ~0.5 CPU-ms per PCM record to read, five times the
read itself (bench/input_pipeline.py), so shards for training are uncompressed. Shards are named
``{prefix}-{index:05d}-of-{num_shards:05d}.arrayrecord`` (``shard_name``). One record per clip. ``write_shard`` writes
to a temporary file beside the target and renames it into place, so a shard at its final path is always complete.

Record (schema version 1)
-------------------------
Serialised without TensorFlow / protobuf, as the concatenation of::

    offset  size  field
    0       4     magic            b"MPJR"
    4       1     schema version   uint8, 1
    5       4     header length H  uint32, little-endian, in bytes
    9       H     header           UTF-8 JSON object (fields below)
    9 + H   rest  payload          the audio, encoded as the header's `codec` says

Header fields (all required):

- ``key`` (str): stable, unique clip key. For AudioSet: ``f"{YTID}_{start_ms}"``, the YouTube id and the segment
  start in integer milliseconds, as the AudioSet CSVs' ``start_seconds`` (e.g. ``30.000``) times 1000:
  ``"--PJHxphWEs_30000"`` (``audioset_key``). YouTube ids contain ``_`` and ``-``: split on the *last* ``_``.
  Other corpora: any unique string (e.g. the path relative to the corpus root, without extension).
- ``path`` (str): the original audio file the clip was decoded from ("" if unknown); informational only.
- ``sample_rate`` (int > 0): samples per second of the payload, 16000 for the training data.
- ``num_samples`` (int >= 0): length of the clip in samples (mono).
- ``codec`` (str): ``"pcm16"`` or ``"flac"``.
- ``labels`` (list[int], may be empty): class indices of the clip. For AudioSet: the head unit (0..526) of each of
  the clip's ``positive_labels``, its mid's position in ``class_labels_indices.csv`` sorted by mid
  (``audioset_classes``; shards ``prepare`` wrote before its manifest recorded ``label_order`` hold the file's
  ``index`` column instead). The order is the manifest's, not the record's: schema version 1 either way.

Payload by codec:

- ``"pcm16"``: ``num_samples`` int16 little-endian PCM samples (``2 * num_samples`` bytes, nothing after).
- ``"flac"``: a FLAC stream (mono, 16-bit, ``sample_rate``) of ``num_samples`` samples, as written by soundfile
  (libsndfile) with subtype PCM_16; an empty payload when ``num_samples == 0`` (libsndfile writes no bytes for an
  empty FLAC stream). Lossless: decodes to the same int16 samples as ``"pcm16"``.

Samples are float audio quantised as ``round(clip(x, -1, 1) * 32767)`` and decoded as ``int16 / 32767``
(``matpac_jax.audio.io.to_int16`` / ``from_int16``).

Versioning: decoders reject any other magic or version. Adding an optional header field keeps version 1 (decoders
ignore unknown fields); any change to the layout, to the meaning of a field or to a codec bumps the version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import struct
import uuid
from collections.abc import Iterable

import numpy as np
import soundfile as sf
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from matpac_jax.audio.io import from_int16, to_int16

SCHEMA_VERSION = 1
MAGIC = b"MPJR"
CODECS = ("pcm16", "flac")
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
COMPRESSIONS = {"none": "group_size:1,uncompressed", "zstd": "group_size:1,zstd"}  # ArrayRecord writer options


@dataclasses.dataclass(frozen=True, eq=False)
class ClipRecord:
    """One clip: ``audio`` is float32 [samples] in [-1, 1] (mono). Compared by identity (it holds an array)."""

    key: str
    audio: np.ndarray
    sample_rate: int = 16000
    labels: tuple[int, ...] = ()
    path: str = ""

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(int(label) for label in self.labels))


def audioset_key(ytid: str, start_seconds: float | str) -> str:
    """The AudioSet clip key ``f"{ytid}_{start_ms}"``: start in integer milliseconds (``"30.000"`` -> 30000).

    ValueError naming the value when ``start_seconds`` is not a finite number (``"abc"``, ``"nan"``, ``"inf"``).
    """
    try:
        seconds = float(start_seconds)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds):
        raise ValueError(f"start_seconds {start_seconds!r} is not a finite number of seconds")
    return f"{ytid}_{round(seconds * 1000)}"


def _check_header(header: object) -> dict:
    if not isinstance(header, dict):
        raise ValueError(f"record header is not a JSON object: {type(header).__name__}")
    expected = {"key": str, "path": str, "sample_rate": int, "num_samples": int, "codec": str, "labels": list}
    for name, kind in expected.items():
        if name not in header:
            raise ValueError(f"record header lacks field {name!r}")
        value = header[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"record header field {name!r} should be {kind.__name__}, got {value!r}")
    if header["sample_rate"] <= 0 or header["num_samples"] < 0:
        raise ValueError(f"record header has sample_rate={header['sample_rate']}, num_samples={header['num_samples']}")
    if header["codec"] not in CODECS:
        raise ValueError(f"record header has unknown codec {header['codec']!r} (known: {', '.join(CODECS)})")
    if not all(isinstance(label, int) and not isinstance(label, bool) for label in header["labels"]):
        raise ValueError(f"record header labels should be ints, got {header['labels']!r}")
    return header


def encode_record(clip: ClipRecord, codec: str = "pcm16") -> bytes:
    """Serialise a clip (schema version 1, see the module docstring); ``codec`` is "pcm16" or "flac"."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    audio = np.asarray(clip.audio)
    if audio.ndim != 1:
        raise ValueError(f"clip {clip.key!r}: audio must be mono [samples], got shape {audio.shape}")
    if not isinstance(clip.key, str) or not clip.key:
        raise ValueError(f"clip key must be a non-empty str, got {clip.key!r}")
    if int(clip.sample_rate) <= 0:
        raise ValueError(f"clip {clip.key!r}: sample_rate must be positive, got {clip.sample_rate}")
    try:
        pcm = to_int16(audio)
    except ValueError as e:
        raise ValueError(f"clip {clip.key!r}: {e}") from None
    if codec == "pcm16":
        payload = pcm.astype("<i2").tobytes()
    elif pcm.size == 0:
        payload = b""
    else:
        buffer = io.BytesIO()
        sf.write(buffer, pcm, int(clip.sample_rate), format="FLAC", subtype="PCM_16")
        payload = buffer.getvalue()
    header = {
        "key": clip.key,
        "path": str(clip.path),
        "sample_rate": int(clip.sample_rate),
        "num_samples": int(pcm.size),
        "codec": codec,
        "labels": [int(label) for label in clip.labels],
    }
    header_bytes = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return _PREFIX.pack(MAGIC, SCHEMA_VERSION, len(header_bytes)) + header_bytes + payload


def _split(data: bytes) -> tuple[dict, memoryview]:
    """(validated header, payload view) of a serialised record."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise ValueError(f"truncated record: {len(view)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ValueError(f"bad magic {bytes(magic)!r}: not a matpac_jax clip record (expected {MAGIC!r})")
    if version != SCHEMA_VERSION:
        raise ValueError(f"unknown record schema version {version} (this code reads version {SCHEMA_VERSION})")
    end = _PREFIX.size + header_len
    if len(view) < end:
        raise ValueError(f"truncated header: {len(view) - _PREFIX.size} of {header_len} bytes")
    try:
        header = json.loads(bytes(view[_PREFIX.size : end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt record header: {e}") from None
    return _check_header(header), view[end:]


def decode_header(data: bytes) -> dict:
    """The header fields of a record (key, path, sample_rate, num_samples, codec, labels) without decoding audio.

    Only the prefix and header are read: ``data`` may stop at the end of the header.
    """
    return _split(data)[0]


def decode_pcm(data: bytes) -> tuple[dict, np.ndarray]:
    """(header, int16 samples) of a record, without converting to float: lets a reader crop before converting."""
    header, payload = _split(data)
    n, sr, codec = header["num_samples"], header["sample_rate"], header["codec"]
    if codec == "pcm16":
        if len(payload) != 2 * n:
            problem = "truncated" if len(payload) < 2 * n else "oversized"
            raise ValueError(f"{problem} pcm16 payload: {len(payload)} bytes for {n} samples (expected {2 * n})")
        pcm = np.frombuffer(payload, dtype="<i2")
    elif n == 0:
        if len(payload):
            raise ValueError(f"flac payload of {len(payload)} bytes for 0 samples")
        pcm = np.zeros(0, np.int16)
    else:
        try:
            pcm, flac_sr = sf.read(io.BytesIO(payload), dtype="int16", always_2d=True)
        except Exception as e:  # soundfile.LibsndfileError: lost sync, unrecognised format, ...
            raise ValueError(f"corrupt or truncated flac payload ({len(payload)} bytes): {e}") from None
        if pcm.shape[1] != 1 or flac_sr != sr:
            raise ValueError(f"flac payload is {pcm.shape[1]} channels at {flac_sr} Hz, header says 1 at {sr} Hz")
        if pcm.shape[0] != n:
            raise ValueError(f"truncated flac payload: {pcm.shape[0]} samples decoded, header says {n}")
        pcm = pcm[:, 0]
    return header, pcm


def decode_record(data: bytes) -> ClipRecord:
    """Deserialise a record; the audio comes back float32 ``int16 / 32767``. ValueError for a malformed record."""
    header, pcm = decode_pcm(data)
    return ClipRecord(
        key=header["key"],
        audio=from_int16(pcm),
        sample_rate=header["sample_rate"],
        labels=tuple(header["labels"]),
        path=header["path"],
    )


def _close_error(obj: ArrayRecordReader | ArrayRecordWriter) -> str:
    """Close a reader / writer whose ok() is False and return the reason: the constructors do not raise on failure
    (a missing or corrupt file gives ok() False and 0 records); the error surfaces as a RuntimeError from close()."""
    try:
        obj.close()
    except Exception as e:
        return str(e)
    return "unknown error"


def write_shard(path: str | os.PathLike, records: Iterable[bytes], compression: str = "none") -> int:
    """Write serialised records, in order, to an ArrayRecord shard (``group_size:1``); returns the count.

    ``compression``: ``"none"`` (default, fastest to read) or ``"zstd"`` (``COMPRESSIONS``).
    Writes to a temporary file beside ``path`` (creating the directory), fsyncs, then ``os.replace``s it onto
    ``path`` (replacing any existing file). If anything fails, including the ``records`` iterator itself, the
    temporary file is removed and nothing appears at ``path``. Local filesystems only.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}: expected one of {', '.join(COMPRESSIONS)}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writer = ArrayRecordWriter(tmp, COMPRESSIONS[compression])
    count = 0
    try:
        if not writer.ok():
            raise OSError(f"cannot write {tmp}: {_close_error(writer)}")
        for record in records:
            if not isinstance(record, bytes | bytearray | memoryview):
                raise TypeError(f"record {count} is {type(record).__name__}, not bytes")
            writer.write(bytes(record))
            count += 1
        writer.close()  # raises RuntimeError if anything failed (ok() is False after any close, so not checked)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if writer.is_open():
            with contextlib.suppress(Exception):
                writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return count


def read_shard(path: str | os.PathLike) -> list[bytes]:
    """All records of a shard, in order. FileNotFoundError if missing, ValueError if not an ArrayRecord file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shard at {path}")
    reader = ArrayRecordReader(path)
    if not reader.ok():
        raise ValueError(f"{path}: not a readable ArrayRecord file: {_close_error(reader)}")
    try:
        num = reader.num_records()
        records = list(reader.read_all()) if num else []
    finally:
        reader.close()
    if len(records) != num:
        raise ValueError(f"{path}: read {len(records)} records, the index says {num}")
    return records


def check_shard(path: str | os.PathLike) -> int:
    """The record count of a shard, after checking that it is a readable ArrayRecord file (its footer and index:
    a truncated or foreign file fails here, a corrupt record only when read). ValueError naming the file and what
    to do, FileNotFoundError when it is missing."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shard at {path}")
    reader = ArrayRecordReader(path)
    if not reader.ok():
        reason = _close_error(reader) or "truncated or corrupt"
        raise ValueError(
            f"{path}: not a readable ArrayRecord shard ({reason}): rebuild it with python -m matpac_jax.data.prepare "
            "(a rerun rebuilds only missing shards once the bad one is removed) or leave it out of the data paths"
        )
    try:
        return int(reader.num_records())
    finally:
        reader.close()


def shard_name(output_dir: str | os.PathLike, index: int, num_shards: int, prefix: str = "clips") -> str:
    """``{output_dir}/{prefix}-{index:05d}-of-{num_shards:05d}.arrayrecord``."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    return os.path.join(os.fspath(output_dir), f"{prefix}-{index:05d}-of-{num_shards:05d}.arrayrecord")
