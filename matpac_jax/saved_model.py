"""The one saved-model format, written and read here: a directory holding

- ``model.json``: ``{"format": "matpac_jax model", "version": 2, "kind": KIND, "spec": {...}}`` where ``kind`` says
  which class reads it ('vit': ``inference.Encoder``; 'student': ``distill.trained.Student``) and ``spec`` is
  everything but the weights (shape, front-end);
- ``weights.npz``: the weights, one array per '/'-joined parameter path (NumPy's zip of ``.npy`` files, read with
  ``allow_pickle=False``).

Both files are written atomically, the weights first, so a reader sees a whole old model or a whole new one.
Directories written by earlier versions (``encoder.json`` + ``params.npz``) are still read.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from matpac_jax.fileio import atomic_save_npz, atomic_write_json

MODEL_FILE, WEIGHTS_FILE = "model.json", "weights.npz"
FORMAT, VERSION = "matpac_jax model", 2
_LEGACY = ("encoder.json", "params.npz", "matpac_jax encoder")  # version 1: ViT encoders only


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
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


def write_model_dir(directory: str, kind: str, spec: dict, weights: dict) -> str:
    """``weights`` (a nested dict of arrays on the host), then ``model.json``."""
    os.makedirs(directory, exist_ok=True)
    atomic_save_npz(os.path.join(directory, WEIGHTS_FILE), **flatten(weights))
    atomic_write_json(os.path.join(directory, MODEL_FILE),
                      {"format": FORMAT, "version": VERSION, "kind": kind, "spec": spec})  # fmt: skip
    return directory


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
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{meta_path} is unreadable or malformed ({type(e).__name__}: {e}): {fix}") from None
    try:
        with np.load(weights_path, allow_pickle=False) as data:
            weights = unflatten({k: data[k] for k in data.files})
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        why = f"{type(e).__name__}: {e}"
        raise ValueError(f"{weights_path} is missing, truncated or not an .npz ({why}): {fix}") from None
    return kind, spec, weights
