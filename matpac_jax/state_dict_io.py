"""Reading and writing PyTorch state dicts as data, never code: ``.pt`` / ``.pth`` / ``.ckpt`` through
``torch.load(weights_only=True)`` with a scoped allow-list of fairseq's plain data, and ``.safetensors`` (written and
read here, no dependency), every malformed file refused with a ``ConversionError`` naming the file and the problem."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile

import numpy as np

from matpac_jax.fileio import atomic_write
from matpac_jax.trees import flatten


class StateDictMismatch(ValueError):
    """A state dict whose keys do not match the student: ``unknown`` (keys of the file the student has no place for)
    and ``missing`` (keys the student needs that the file lacks), both sorted lists of key names, listed in the
    message after ``what`` (the file / model); ``detail`` adds anything else (wrong shapes, the expected layout)."""

    def __init__(self, what: str, unknown=(), missing=(), detail: str = ""):
        self.what, self.detail = what, detail
        self.unknown = sorted(unknown)
        self.missing = sorted(missing)
        parts = [f"{what}: the state dict does not match"]
        if self.missing:
            parts.append(f"missing keys {self.missing}")
        if self.unknown:
            parts.append(f"unknown keys {self.unknown}")
        if detail:
            parts.append(detail)
        super().__init__("; ".join(parts))


class ConversionError(ValueError):
    """Keys missing, unknown or of the wrong shape, or an unreadable weight file; the message names them."""


# safetensors dtype -> numpy dtype read from the file (little-endian); every tensor is returned as float32.
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not a state dict of this model family


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors layout: u64 header length, JSON header {name: dtype, shape, data_offsets}, raw data.
    Written atomically: ``path`` is either the complete new file or left as it was."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], np.float32)
        blobs.append(a.tobytes())
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(text)) + text)
        for b in blobs:
            f.write(b)

    atomic_write(path, write)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as float32. Raises ``ConversionError`` naming the file and the problem
    for any malformed file (header length, header JSON, dtype, shape, offsets, truncated or trailing data)."""
    with open(path, "rb") as f:
        data = f.read()
    bad = lambda why: ConversionError(f"{path}: not a valid safetensors file: {why}")  # noqa: E731
    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", data)
    if n > min(len(data) - 8, _MAX_HEADER):
        raise bad(f"header length {n} exceeds the {len(data) - 8} bytes that follow it")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, expected an object")
    header.pop("__metadata__", None)
    body = len(data) - 8 - n
    out, end = {}, 0
    for name, h in header.items():
        dtype, shape, (start, stop) = _check_entry(name, h, body, bad)
        raw = np.frombuffer(data, dtype, count=(stop - start) // dtype.itemsize, offset=8 + n + start)
        if h["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.astype(np.float32).reshape(shape)
        end = max(end, stop)
    if end != body:
        raise bad(f"the tensors take {end} bytes but {body} bytes of data follow the header")
    return out


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate keys {dup}")
    return dict(pairs)


def _check_entry(name: str, h, body: int, bad) -> tuple[np.dtype, tuple, tuple[int, int]]:
    """(numpy dtype, shape, (start, stop)) of one header entry, or ``bad(reason)`` raised."""
    if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
        raise bad(f"tensor {name!r}: expected {{dtype, shape, data_offsets}}, got {h!r:.80}")
    if not isinstance(h["dtype"], str) or h["dtype"] not in _SAFETENSORS_DTYPES:
        raise bad(f"tensor {name!r} has dtype {h['dtype']!r:.40}; expected one of {sorted(_SAFETENSORS_DTYPES)}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[h["dtype"]])
    shape, offsets = h["shape"], h["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"tensor {name!r} has shape {shape!r:.80}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"tensor {name!r} has data_offsets {offsets!r:.80}; expected [start, stop]")
    start, stop = offsets
    if not 0 <= start <= stop <= body:
        raise bad(f"tensor {name!r}: data_offsets [{start}, {stop}] are outside the {body} data bytes (truncated?)")
    if stop - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise bad(f"tensor {name!r}: {stop - start} bytes do not hold a {h['dtype']} tensor of shape {shape}")
    return dtype, tuple(shape), (start, stop)


def _safe_globals() -> list:
    """What a checkpoint may reference beyond tensors and containers (``torch.load(weights_only=True)``'s own
    allowlist): the plain data a fairseq training checkpoint holds besides ``model``: ``args``
    (``argparse.Namespace``) and numpy scalars (``numpy.dtype`` + ``numpy.core.multiarray.scalar``, written under
    either numpy 1 or numpy 2 module name) in its metrics."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    dtype_classes = [type(np.dtype(t)) for t in ("f8", "f4", "f2", "i8", "i4", "i2", "i1", "u1", "?")]
    scalars = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    return [argparse.Namespace, np.dtype, *dtype_classes, *scalars]


def pickle_globals(data: bytes) -> list[str]:
    """The globals (``module.name``) a pickle stream imports, found by reading its opcodes (nothing is executed)."""
    names, strings, memo, last = [], [], {}, None
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str) and op.name.endswith(("UNICODE", "STRING", "UNICODE8")):
                strings.append(arg)
                last = arg
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = last
            elif op.name == "MEMOIZE":
                memo[len(memo)] = last
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
                strings.append(memo[arg])
                last = memo[arg]
            elif op.name not in ("FRAME", "PROTO"):
                last = None
    except Exception:  # a truncated or corrupt stream: what was found so far
        pass
    return list(dict.fromkeys(names))


def _checkpoint_globals(path: str) -> list[str]:
    """The globals imported by a ``torch.save`` zip (its ``data.pkl``) or a raw pickle file, read without running it."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
                return pickle_globals(z.read(pkl[0])) if pkl else []
        with open(path, "rb") as f:
            return pickle_globals(f.read())
    except (OSError, zipfile.BadZipFile):
        return []


# Globals no weights file needs and a malicious pickle uses to run code: a file naming one is not offered the re-save
# advice (loading it with weights_only=False would run its payload).
_CODE_RUNNERS = (
    *("os.", "posix.", "nt.", "subprocess.", "builtins.", "__builtin__.", "sys.", "shutil.", "socket."),
    *("importlib.", "runpy.", "pty.", "code.", "pickle.", "marshal.", "types.", "ctypes.", "webbrowser."),
)
_RESAVE = (
    "if you trust the file, re-save its weights alone (python -c \"import torch; sd = torch.load('{path}', "
    "weights_only=False); torch.save(sd.get('model', sd), 'weights.pt')\") and convert that"
)


def _refusal(path: str, refused: list[str], detail: str) -> str:
    """Why a pickle was not read and what to do: re-save the weights alone where the refused globals are ordinary
    classes, never that where one of them runs code (loading the file any other way would run its payload)."""
    what = f"it needs {', '.join(refused[:5])}" if refused else f"it is not a plain state dict ({detail})"
    runners = [g for g in refused if g.startswith(_CODE_RUNNERS)]
    if runners:
        advice = f"{runners[0]} runs commands or code when unpickled: this is no weights file, do not load it by "
        advice += "any other means; get the weights from a source you trust"
    else:
        advice = _RESAVE.format(path=path)
    return (
        f"{path}: refused to unpickle: {what}; only tensors and plain data are read, since unpickling other "
        f"objects can run code; {advice}"
    )


def _torch_load(path: str) -> dict:
    """``torch.load`` that can only build tensors and plain data: ``weights_only=True`` with the few extra globals of
    ``_safe_globals`` allowed for this call only. A file needing anything else raises ``ConversionError`` naming the
    refused global(s); nothing in it is executed."""
    import torch

    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; older: weights_only's defaults only
    try:
        with scoped(_safe_globals()) if scoped else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. about the pickle protocol: the error says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        allowed = {n for g in _safe_globals() for n in ([g[1]] if isinstance(g, tuple) else [_qualname(g)])}
        ours = ("torch.", "collections.")  # tensor rebuilding and containers: weights_only's own allowlist
        found = [g for g in _checkpoint_globals(path) if g not in allowed and not g.startswith(ours)]
        named = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's message names the first refused global
        refused = list(dict.fromkeys(([named.group(1)] if named else []) + found))
        raise ConversionError(_refusal(path, refused, _last_line(e))) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ConversionError(f"{path}: not a readable PyTorch file: {_last_line(e)}") from None


def _qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A state dict as numpy arrays, from ``.safetensors`` (no dependency) or a PyTorch file (``torch.load`` with
    ``weights_only=True``: a file that needs anything but tensors and plain data is refused, never executed; without
    PyTorch installed a ``.pt`` file is refused, never unpickled). A fairseq checkpoint's weights (``model``) are
    returned. Raises ``ConversionError`` for any unreadable or unsafe file."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConversionError(
            f"reading {path} needs PyTorch: pip install 'matpac_jax[torch]' (or give a .safetensors file)"
        ) from None
    sd = _torch_load(path)
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(sd).__name__}")
    if "model" in sd and isinstance(sd["model"], dict):  # a fairseq training checkpoint: the weights are in 'model'
        sd = sd["model"]
    # {'_ema': {'blocks.0.x': t}} -> {'_ema.blocks.0.x': array}: the EMA teachers are nested dicts in the file
    return flatten(sd, ".", lambda v: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v))


def state_dict_path(path: str) -> str:
    """The file ``write_state_dict(path, ...)`` writes: ``path`` itself, or with ``.safetensors`` for its extension
    when it is not a ``.pt`` file or PyTorch is not installed."""
    if path.endswith(".safetensors") or (path.endswith(".pt") and importlib.util.find_spec("torch") is not None):
        return path
    return os.path.splitext(path)[0] + ".safetensors"


def write_state_dict(path: str, sd: dict[str, np.ndarray]) -> str:
    """``.pt`` with torch installed, else ``.safetensors`` (the path's extension is changed and returned). Written
    atomically: the returned path is either the complete new file or left as it was."""
    path = state_dict_path(path)
    if path.endswith(".pt"):
        import torch

        tensors, nested = {}, {}
        for k, v in sd.items():  # the EMA teachers go back into nested dicts, as the published files hold them
            group = k.split(".", 1)[0]
            target = nested.setdefault(group, {}) if group in ("_ema", "_cls_head_ema") else tensors
            target[k.split(".", 1)[1] if target is not tensors else k] = torch.from_numpy(np.array(v))
        atomic_write(path, lambda f: torch.save(tensors | nested, f))
        return path
    write_safetensors(path, sd)
    return path
