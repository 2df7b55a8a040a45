"""Atomic file writes and content digests: one implementation for every output the package writes.

A reader never sees a half-written file: each writer writes a temporary file beside the target (same directory, so
the rename stays on one filesystem), fsyncs it and ``os.replace``s it onto the target; on any failure the temporary
file is removed and the target is untouched. ``sha256_*`` give content digests for cache keys and integrity checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable
from typing import IO

import numpy as np

TMP_MARK = ".tmp-"  # every temporary file written here has this in its name (``clean_temporaries`` finds them)


def _tmp_path(path: str) -> str:
    return f"{path}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a binary temporary file beside ``path``, fsync, then rename it onto ``path``."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj):
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON has no NaN/Infinity tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """Strict JSON (non-finite floats written as ``null``), atomically."""
    text = json.dumps(strict_json(obj), indent=indent, sort_keys=True, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays) -> None:
    """``numpy.savez`` of ``arrays`` to exactly ``path`` (no ``.npz`` appended), atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def unwritable_reason(path: str | os.PathLike, directory: bool = False) -> str | None:
    """Why ``path`` cannot be written as a file (or, with ``directory``, used as a directory), or ``None`` when it
    can: it is not the other kind, and its nearest existing ancestor is a writable directory. Nothing is created."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and os.path.isdir(path) != directory:
        return f"{path} exists and is not a {'directory' if directory else 'file'}"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_arrays(arrays) -> str:
    """Digest of a mapping name -> array in sorted name order: each name, dtype, shape and the C-order bytes (the
    same arrays give the same digest whatever their memory layout or device, a changed value another one)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike, skip: Iterable[str] = ()) -> str:
    """Digest of every regular file under ``root`` (relative paths and contents, in sorted order)."""
    root = os.fspath(root)
    skip = set(skip)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel in skip or TMP_MARK in name or not os.path.isfile(full):
                continue
            h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
            h.update(sha256_file(full).encode() + b"\0")
    return h.hexdigest()


def clean_temporaries(directory: str | os.PathLike) -> list[str]:
    """Remove temporary files left in ``directory`` (not recursive) by a killed writer; returns their names."""
    directory = os.fspath(directory)
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if TMP_MARK in name and os.path.isfile(full):
            with contextlib.suppress(FileNotFoundError):
                os.remove(full)
            removed.append(name)
    return removed
