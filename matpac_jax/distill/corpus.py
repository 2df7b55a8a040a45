"""What the teacher pass leaves: its embedding records (``encode_embedding`` / ``decode_embedding``), and besides
its shards, each rebuilt when its inputs change (a notice, never a silent
reuse): ``embeddings.npy`` + ``keys.json`` in corpus order (``consolidate``), per-dimension statistics
(``target_stats``) and the k-means clusters for balanced sampling (``cluster``)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import struct
import time
import zipfile

import numpy as np

from matpac_jax.data.records import read_shard
from matpac_jax.distill.kmeans import fit_kmeans
from matpac_jax.fileio import TMP_MARK, atomic_save_npz, atomic_write_json, sha256_bytes

_HEADER = struct.Struct("<I")
DTYPES = ("float16", "float32")


def encode_embedding(key: str, vector: np.ndarray, dtype: str = "float16", frames: np.ndarray | None = None) -> bytes:
    """A JSON header {key, dim, dtype[, frames]} and the raw clip vector [dim], then the frame-level features
    [frames, dim] when given."""
    head = {"key": key, "dim": int(vector.shape[0]), "dtype": dtype}
    if frames is not None:
        head["frames"] = int(frames.shape[0])
    head = json.dumps(head).encode()
    body = np.asarray(vector, dtype).tobytes() + (b"" if frames is None else np.asarray(frames, dtype).tobytes())
    return _HEADER.pack(len(head)) + head + body


def _decode(data: bytes) -> tuple[dict, np.ndarray]:
    (n,) = _HEADER.unpack_from(data)
    head = json.loads(data[4 : 4 + n])
    values = np.frombuffer(data[4 + n :], head["dtype"])
    if values.shape[0] != head["dim"] * (1 + head.get("frames", 0)):
        raise ValueError(f"embedding record of {head['key']!r}: {values.shape[0]} values, the header disagrees")
    return head, values


def decode_embedding(data: bytes) -> tuple[str, np.ndarray]:
    """(key, clip embedding [dim])."""
    head, values = _decode(data)
    return head["key"], values[: head["dim"]]


def decode_frames(data: bytes) -> np.ndarray | None:
    """The frame-level features [frames, dim] of a record written with them, else None."""
    head, values = _decode(data)
    return values[head["dim"] :].reshape(head["frames"], head["dim"]) if "frames" in head else None


def load_embeddings(output: str) -> tuple[list[str], np.ndarray]:
    """(keys, embeddings [N, D] float32) of a finished pass, in shard order."""
    keys, vecs = [], []
    for path in sorted(glob.glob(os.path.join(output, "teacher-*.arrayrecord"))):
        for r in read_shard(path):
            k, v = decode_embedding(r)
            keys.append(k)
            vecs.append(v.astype(np.float32))
    return keys, np.stack(vecs)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _shards(output: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output, "teacher-*.arrayrecord")))


def source_digest(output: str) -> str:
    """Digest of the pass's output shards as their sidecars describe them (names and contents)."""
    parts = []
    for path in _shards(output):
        try:
            with open(path + ".json", "rb") as f:
                parts.append([os.path.basename(path), sha256_bytes(f.read())])
        except OSError:
            parts.append([os.path.basename(path), None])
    return sha256_bytes(json.dumps(parts).encode())


def _embeddings_token(output: str) -> str:
    """What ``embeddings.npy`` was built from: the shards' digest of ``consolidated.json``, or, for embeddings made
    otherwise (no shards), the size and modification time of ``embeddings.npy`` and ``keys.json``."""
    try:
        return str(_read_json(os.path.join(output, "consolidated.json"))["source"])
    except (OSError, ValueError, KeyError, TypeError):
        stats = [os.stat(os.path.join(output, n)) for n in ("embeddings.npy", "keys.json")]
        return sha256_bytes(json.dumps([[s.st_size, s.st_mtime_ns] for s in stats]).encode())


def _load_npz(path: str, want: dict, log, what: str) -> dict | None:
    """The arrays of ``path`` when its scalar fields equal ``want``; None (with a notice) when it is missing,
    unreadable or was made from other inputs, so that the caller rebuilds it."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        log(f"{what}: {path} is unreadable ({type(e).__name__}: {e}): recomputing it")
        return None
    differ = [k for k, v in want.items() if k not in data or data[k].shape != () or data[k].item() != v]
    if differ:
        log(f"{what}: {path} was made with other {', '.join(differ)}: recomputing it")
        return None
    return data


def consolidate(output: str, log=print) -> tuple[list[str], np.ndarray]:
    """``embeddings.npy`` + ``keys.json`` in corpus order from the pass's shards; returns (keys, memmap). Rebuilt when
    missing or when the shards changed since (``consolidated.json``); without shards, existing files are used."""
    emb_path, keys_path = os.path.join(output, "embeddings.npy"), os.path.join(output, "keys.json")
    marker = os.path.join(output, "consolidated.json")
    shards = _shards(output)
    have = os.path.exists(emb_path) and os.path.exists(keys_path)
    if not shards and not have:
        raise ValueError(f"{output} holds no teacher-*.arrayrecord shards: run the teacher pass first")
    source = source_digest(output) if shards else None
    if shards and not (have and _marker_source(marker) == source):
        if have:
            log(f"teacher pass: {emb_path} was built from other shards: rebuilding it")
        _build_consolidated(output, shards, source)
    return _read_json(keys_path), np.load(emb_path, mmap_mode="r")


def _marker_source(marker: str) -> str | None:
    try:
        return _read_json(marker)["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_consolidated(output: str, shards: list[str], source: str) -> None:
    emb_path, keys_path = os.path.join(output, "embeddings.npy"), os.path.join(output, "keys.json")
    marker = os.path.join(output, "consolidated.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker)  # written last: its absence marks a build that did not finish
    keys, first = [], decode_embedding(next(iter(read_shard(shards[0]))))[1]
    n = sum(_read_json(p + ".json")["clips"] for p in shards)
    tmp = f"{emb_path}{TMP_MARK}{os.getpid()}.npy"
    out = np.lib.format.open_memmap(tmp, "w+", first.dtype, (n, first.shape[0]))
    for path in shards:
        for r in read_shard(path):
            k, v = decode_embedding(r)
            out[len(keys)] = v
            keys.append(k)
    out.flush()
    del out
    if len(keys) != n:
        os.remove(tmp)
        raise ValueError(f"{output}: the shards hold {len(keys)} embeddings, their sidecars say {n}")
    os.replace(tmp, emb_path)
    atomic_write_json(keys_path, keys, indent=None)
    atomic_write_json(marker, {"source": source, "clips": n})


def target_stats(output: str, chunk: int = 65_536, log=print) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (float32 [D] each) of ``embeddings.npy``, computed in float64 in
    chunks and cached in ``target_stats.npz`` (for ``config.distill.targets`` = 'center' / 'standardize'); recomputed
    when the embeddings changed or the file is unreadable."""
    path = os.path.join(output, "target_stats.npz")
    _, x = consolidate(output, log)
    want = {"source": _embeddings_token(output)}
    if (data := _load_npz(path, want, log, "target stats")) is None:
        total, sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        for i in range(0, len(x), chunk):
            part = np.asarray(x[i : i + chunk], np.float64)
            total += part.sum(0)
            sq += np.square(part).sum(0)
        mean = total / len(x)
        std = np.sqrt(np.maximum(sq / len(x) - mean * mean, 0.0))
        data = {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}
        atomic_save_npz(path, **data, **want)
    return data["mean"], data["std"]


def cluster(
    output: str,
    k: int = 50,
    seed: int = 0,
    steps: int = 200,
    batch: int = 4096,
    log=print,
    inits: int = 1,
    epochs: float = 0.0,
) -> dict:
    """k-means (distill.kmeans.fit_kmeans) of ``embeddings.npy`` into ``clusters.npz``; returns its arrays. Recomputed
    when the embeddings or any k-means setting changed or the file is unreadable."""
    path = os.path.join(output, "clusters.npz")
    _, x = consolidate(output, log)
    want = {
        "source": _embeddings_token(output),
        "k": k,
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "inits": inits,
        "epochs": float(epochs),
    }
    if (data := _load_npz(path, want, log, "k-means")) is None:
        t0 = time.perf_counter()
        r = fit_kmeans(x, k, seed=seed, steps=steps, batch=batch, inits=inits, epochs=epochs)
        data = {"centroids": r["centroids"], "assignments": r["assignments"], "sizes": r["sizes"]}
        atomic_save_npz(path, **data, **want)
        sizes = r["sizes"]
        took = time.perf_counter() - t0
        spread = f"min {sizes.min()} median {int(np.median(sizes))} max {sizes.max()}, {int((sizes == 0).sum())} empty"
        log(f"k-means: {k} clusters of {len(x)} embeddings in {took:.1f} s; sizes {spread}")
        data |= {name: np.asarray(v) for name, v in want.items()}
    return data
