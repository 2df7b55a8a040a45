"""The one saved-model format, written and read here: a directory holding

- ``model.json``: ``{"format": "matpac_jax model", "version": 3, "kind": KIND, "spec": {...}, "sha256": {...}}``
  where ``kind`` says which class reads it ('vit': ``inference.Encoder``; 'student': ``models.student.Student``) and
  ``spec`` is everything but the weights (shape, front-end);
- ``weights.npz``: the weights, one array per '/'-joined parameter path (NumPy's zip of ``.npy`` files, read with
  ``allow_pickle=False``).

Both files are written atomically, the weights first, so a reader sees a whole old model or a whole new one.
Version 3 adds ``"sha256": {"model.json": ..., "weights.npz": ...}`` to ``model.json``: the digest of the canonical
JSON of everything else in it, and of the weights file's bytes; a flipped bit in either file is refused at load, naming
it. Directories written by earlier versions still read, without that check: version 2 (no digest) and version 1
(``encoder.json`` + ``params.npz``). The digest catches corruption, not an adversary (who can rewrite it).

``read_model_dir`` is the one read, bounded before it allocates: each ``.npy`` header in the zip must declare exactly
the bytes its member holds (a header declaring 4 TiB in a small member is refused before any allocation), a compressed
member may expand at most ``MAX_EXPANSION`` times (numpy's ``savez`` stores, so only a deflate bomb comes near it), and
zip's own reader never yields more than the member's directory size. Only numeric dtypes, '/'-paths without empty
parts, no key both a leaf and a parent, no key twice, and finite values: every problem is a ValueError naming the file
and the member. What the weights must be for the model the spec describes is the model class's check
(``inference.Encoder.from_saved``, ``models.student.Student.from_saved``).
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from matpac_jax.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file, strict_json
from matpac_jax.trees import flatten

MODEL_FILE, WEIGHTS_FILE = "model.json", "weights.npz"
FORMAT, VERSION = "matpac_jax model", 3  # 3: with the "sha256" digest; 2 (without) still read
MAX_EXPANSION = 64  # uncompressed / compressed bytes of a member, beyond 1 MiB; float weights compress < 2x
_LEGACY = ("encoder.json", "params.npz", "matpac_jax encoder")  # version 1: ViT encoders only


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """'/'-joined paths -> a nested dict; a path with an empty part, or a key that is both a leaf and a parent
    ('a' and 'a/b'), is a ValueError naming it (one of them would silently shadow the other)."""
    out: dict = {}
    for key in sorted(flat):
        *parents, leaf = key.split("/")
        if "" in parents or not leaf:
            raise ValueError(f"weight name {key!r} has an empty path part")
        node = out
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{'/'.join(parents[: i + 1])!r} is both a weight and a group (of {key!r})")
        if leaf in node:
            raise ValueError(f"{key!r} is both a weight and a group")
        node[leaf] = flat[key]
    return out


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_FILE)) or os.path.isfile(os.path.join(path, _LEGACY[0]))


def refuse_other_kind(directory: str, kind: str, flag: str = "--output") -> None:
    """ValueError when ``directory`` already holds a model of another kind than ``kind``: a converter writing a
    student over an encoder (or the reverse) would silently replace it. Rewriting a model of the same kind is fine."""
    if not is_model_dir(directory):
        return
    try:
        with open(os.path.join(directory, MODEL_FILE)) as f:
            held = json.load(f).get("kind", "?")
    except FileNotFoundError:
        held = "vit"  # version 1 (encoder.json): ViT encoders only
    except (OSError, ValueError, AttributeError):
        held = "unreadable"
    if held != kind:
        raise ValueError(
            f"{flag}={directory} already holds a {held!r} model directory: writing a {kind!r} model there would "
            "replace it; choose another directory, or move that one aside"
        )


def _json_digest(meta: dict) -> str:
    """Digest of ``model.json``'s content but its "sha256" field: canonical JSON (sorted keys, no spaces), so
    indentation does not count and any changed value does."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    text = json.dumps(strict_json(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return sha256_bytes(text.encode())


def write_model_dir(directory: str, kind: str, spec: dict, weights: dict) -> str:
    """``weights`` (a nested dict of arrays on the host), then ``model.json`` with the digest of both."""
    os.makedirs(directory, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **flatten(weights, leaf=np.asarray))
    data = buf.getvalue()
    atomic_write_bytes(os.path.join(directory, WEIGHTS_FILE), data)
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "spec": strict_json(spec)}
    meta["sha256"] = {MODEL_FILE: _json_digest(meta), WEIGHTS_FILE: sha256_bytes(data)}
    atomic_write_json(os.path.join(directory, MODEL_FILE), meta)
    return directory


def _check_digest(meta: dict, meta_path: str, weights_path: str, fix: str) -> None:
    """Version 3's digest against both files (earlier versions have none: nothing to check)."""
    if meta.get("version", 2) < 3:
        return
    digest = meta.get("sha256")
    if not isinstance(digest, dict) or not all(isinstance(digest.get(k), str) for k in (MODEL_FILE, WEIGHTS_FILE)):
        raise ValueError(f"{meta_path}: version {meta['version']} without its 'sha256' digest: {fix}")
    if digest[MODEL_FILE] != _json_digest(meta):
        raise ValueError(f"{meta_path}: its content does not match its sha256 digest (the file is corrupt): {fix}")
    try:
        actual = sha256_file(weights_path)
    except OSError as e:
        raise ValueError(f"{weights_path} is missing or unreadable ({e}): {fix}") from None
    if actual != digest[WEIGHTS_FILE]:
        raise ValueError(
            f"{weights_path}: its sha256 does not match {MODEL_FILE}'s digest (the file is corrupt): {fix}"
        )


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member, its header checked against the member's size before the array is allocated."""
    if info.file_size > MAX_EXPANSION * info.compress_size + (1 << 20):
        raise ValueError(f"expands {info.compress_size} compressed bytes to {info.file_size} (a decompression bomb)")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy version {version} (weights are written as 1.0)")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f, max_header_size=10_000)
        if dtype.hasobject or dtype.kind not in "biuf":
            raise ValueError(f"dtype {dtype} (weights are numbers)")
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if declared != info.file_size - f.tell():
            raise ValueError(
                f"its header declares {shape} {dtype} ({declared} bytes) but the member holds "
                f"{info.file_size - f.tell()} bytes"
            )
        data = f.read(declared)
    flat = np.frombuffer(data, dtype).copy()
    array = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{int(np.size(array) - np.isfinite(array).sum())} non-finite values (NaN or Inf)")
    return array


def read_weights(path: str, fix: str = "write the file again") -> dict[str, np.ndarray]:
    """name -> array of a weights ``.npz`` (module docstring: bounded, numeric, finite); a ValueError names the file,
    the member and the problem."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise ValueError(f"{path} is missing, truncated or not an .npz ({type(e).__name__}: {e}): {fix}") from None
    flat: dict[str, np.ndarray] = {}
    with archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            try:
                if not info.filename.endswith(".npy") or name in flat:
                    raise ValueError("not one .npy member per weight (a stray or repeated member)")
                flat[name] = _read_member(archive, info)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, SyntaxError) as e:
                raise ValueError(f"{path}: member {info.filename!r}: {e}: {fix}") from None
    return flat


def read_model_dir(path: str) -> tuple[str, dict, dict]:
    """(kind, spec, nested weights) of a model directory; a missing, truncated or malformed file is a ValueError
    naming it and the fix."""
    fix = "write the directory again (the run or the command that made it: a training run's end, convert, published)"
    legacy = not os.path.isfile(os.path.join(path, MODEL_FILE)) and os.path.isfile(os.path.join(path, _LEGACY[0]))
    meta_path = os.path.join(path, _LEGACY[0] if legacy else MODEL_FILE)
    weights_path = os.path.join(path, _LEGACY[1] if legacy else WEIGHTS_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != (_LEGACY[2] if legacy else FORMAT):
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        kind, spec = ("vit", meta["spec"]) if legacy else (meta["kind"], meta["spec"])
        if not isinstance(spec, dict) or not isinstance(kind, str):
            raise ValueError("no 'kind' and 'spec'")
        if not legacy and (type(meta.get("version", 2)) is not int or not 2 <= meta.get("version", 2) <= VERSION):
            raise ValueError(f"version {meta.get('version')!r}, this code reads 2 to {VERSION}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{meta_path} is unreadable or malformed ({type(e).__name__}: {e}): {fix}") from None
    flat = read_weights(weights_path, fix)  # first: a truncated or malformed file is named as such
    if not legacy:
        _check_digest(meta, meta_path, weights_path, fix)
    try:
        weights = unflatten(flat)
    except ValueError as e:
        raise ValueError(f"{weights_path}: {e}: {fix}") from None
    return kind, spec, weights
