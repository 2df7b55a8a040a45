r"""The S-SONDO teacher-embedding pass (SPEC §6): one teacher clip embedding per clip of a record corpus.

    python -m matpac_jax.main --config=configs/ssondo.py:teacher_pass --workdir=/data/teacher_pp \
        --config.teacher.checkpoint=models/pp --config.data.train='/data/shards/*.arrayrecord'
    python -m matpac_jax.distill.teacher_pass --records='/data/shards/*.arrayrecord' --checkpoint=models/pp \
        --output=/data/teacher_pp [--dtype=float16] [--batch=32] [--seconds=10] [--clusters=50] [--frames]

Each clip is cropped or zero-padded to exactly ``--seconds`` (10 s, from its start: the clip the student will see),
resampled to the teacher's rate when the corpus has another (a 32 kHz corpus serves both the 16 kHz teacher and the
32 kHz student),
embedded with the teacher's clip embedding of SPEC §5 (time-mean of the last layer's frame features, 3840-d), and
written to an output shard with the same index as its input shard: ``teacher-<i>-of-<n>.arrayrecord``, one record per
clip (``encode_embedding``: a JSON header {key, dim, dtype} and the raw vector; with ``--frames`` also the
frame-level features, read back with ``decode_frames``). Input shards are divided between
processes (``i::process_count``) and each batch of clips is split over the local devices. A shard whose output file
and ``.json`` sidecar exist is skipped, so a restarted pass continues where it stopped; outputs are written atomically.
The pass ends by checking that every clip key of the corpus has exactly one embedding (missing / extra keys listed)
and prints clips/s. Deterministic: no randomness anywhere.

Then, for distillation (process 0): ``embeddings.npy`` ([N, D], the pass's dtype, memory-mappable) and ``keys.json``
hold every embedding in corpus order (record ``i`` of the sorted input shards is row ``i``), and ``clusters.npz`` the
k-means of SPEC §6 over them (``centroids``, ``assignments``, ``sizes``; ``--clusters=0`` skips it). Both are rebuilt
only when missing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import struct
import sys
import time

import numpy as np

from matpac_jax.audio.io import from_int16, resample
from matpac_jax.data.records import decode_pcm, read_shard, write_shard

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


def fit_length(pcm: np.ndarray, samples: int) -> np.ndarray:
    """float32 clip of exactly ``samples``: the first ``samples`` of the int16 PCM, zero-padded at the end."""
    out = np.zeros(samples, np.float32)
    n = min(samples, pcm.shape[0])
    out[:n] = from_int16(pcm[:n])
    return out


def fit_clip(pcm: np.ndarray, rate: int, target_rate: int, seconds: float) -> np.ndarray:
    """float32 clip of exactly ``round(seconds × target_rate)`` samples: the first ``seconds`` of the int16 PCM at
    ``rate``, zero-padded, resampled (soxr HQ) when the rates differ."""
    samples = int(round(seconds * target_rate))
    if rate == target_rate:
        return fit_length(pcm, samples)
    wave = resample(fit_length(pcm, int(round(seconds * rate))), rate, target_rate)
    return np.pad(wave, (0, max(samples - len(wave), 0)))[:samples]


def output_name(output: str, index: int, count: int) -> str:
    return os.path.join(output, f"teacher-{index:05d}-of-{count:05d}.arrayrecord")


def _embed_shard(
    encoder, path: str, seconds: float, batch: int, dtype: str, frames: bool
) -> tuple[list[bytes], list[str]]:
    keys, waves, out = [], [], []
    rate = encoder.spec.frontend.sample_rate
    for data in read_shard(path):
        header, pcm = decode_pcm(data)
        keys.append(header["key"])
        waves.append(fit_clip(pcm, header["sample_rate"], rate, seconds))
    for i in range(0, len(waves), batch):
        r = encoder.embed(np.stack(waves[i : i + batch]), rate)
        for j, k in enumerate(keys[i : i + batch]):
            out.append(encode_embedding(k, r["clip"][j], dtype, r["frames"][j] if frames else None))
    return out, keys


def teacher_pass(
    records: str,
    checkpoint: str,
    output: str,
    seconds: float = 10.0,
    batch: int = 32,
    dtype: str = "float16",
    process_index: int = 0,
    process_count: int = 1,
    log=print,
    frames: bool = False,
) -> dict:
    """Run (or resume) the pass (``frames``: store the frame-level features too); returns {'clips', 'seconds',
    'clips_per_s', 'built', 'skipped', 'missing', 'extra'}."""
    from matpac_jax.inference import load_encoder

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    inputs = sorted(glob.glob(records))
    if not inputs:
        raise ValueError(f"--records={records!r} matches no shard")
    encoder = load_encoder(checkpoint)
    os.makedirs(output, exist_ok=True)
    built = skipped = clips = 0
    t0 = time.perf_counter()
    for i in range(process_index, len(inputs), process_count):
        target = output_name(output, i, len(inputs))
        if os.path.exists(target) and os.path.exists(target + ".json"):
            skipped += 1
            continue
        encoded, keys = _embed_shard(encoder, inputs[i], seconds, batch, dtype, frames)
        write_shard(target, encoded)
        with open(target + ".json.tmp", "w") as f:
            side = {"input": os.path.abspath(inputs[i]), "clips": len(keys), "seconds": seconds, "dtype": dtype}
            json.dump(side | {"checkpoint": os.path.abspath(checkpoint)}, f)
        os.replace(target + ".json.tmp", target + ".json")
        built, clips = built + 1, clips + len(keys)
        log(f"teacher pass: {os.path.basename(target)} ({len(keys)} clips)")
    elapsed = time.perf_counter() - t0
    report = check_complete(inputs, output)
    report |= {"clips": clips, "seconds": elapsed, "clips_per_s": clips / max(elapsed, 1e-9), "built": built,
               "skipped": skipped}  # fmt: skip
    return report


def check_complete(inputs: list[str], output: str) -> dict:
    """Every clip key of the input shards has exactly one embedding: {'missing', 'extra', 'duplicates'} (lists)."""
    from matpac_jax.data.records import decode_header

    want = {decode_header(r)["key"] for path in inputs for r in read_shard(path)}
    have: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(output, "teacher-*.arrayrecord"))):
        for r in read_shard(path):
            key = decode_embedding(r)[0]
            have[key] = have.get(key, 0) + 1
    return {
        "missing": sorted(want - set(have)),
        "extra": sorted(set(have) - want),
        "duplicates": sorted(k for k, n in have.items() if n > 1),
    }


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


def consolidate(output: str) -> tuple[list[str], np.ndarray]:
    """``embeddings.npy`` + ``keys.json`` in corpus order from the pass's shards (once); returns (keys, memmap)."""
    emb_path, keys_path = os.path.join(output, "embeddings.npy"), os.path.join(output, "keys.json")
    if not (os.path.exists(emb_path) and os.path.exists(keys_path)):
        shards = sorted(glob.glob(os.path.join(output, "teacher-*.arrayrecord")))
        if not shards:
            raise ValueError(f"{output} holds no teacher-*.arrayrecord shards: run the teacher pass first")
        keys, first = [], decode_embedding(next(iter(read_shard(shards[0]))))[1]
        n = sum(_read_json(p + ".json")["clips"] for p in shards)
        out = np.lib.format.open_memmap(emb_path + ".tmp.npy", "w+", first.dtype, (n, first.shape[0]))
        for path in shards:
            for r in read_shard(path):
                k, v = decode_embedding(r)
                out[len(keys)] = v
                keys.append(k)
        out.flush()
        del out
        with open(keys_path + ".tmp", "w") as f:
            json.dump(keys, f)
        os.replace(emb_path + ".tmp.npy", emb_path)
        os.replace(keys_path + ".tmp", keys_path)
    return _read_json(keys_path), np.load(emb_path, mmap_mode="r")


def target_stats(output: str, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (float32 [D] each) of ``embeddings.npy``, computed once in float64
    in chunks and cached in ``target_stats.npz`` (for ``config.distill.targets`` = 'center' / 'standardize')."""
    path = os.path.join(output, "target_stats.npz")
    if not os.path.exists(path):
        _, x = consolidate(output)
        total, sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        for i in range(0, len(x), chunk):
            part = np.asarray(x[i : i + chunk], np.float64)
            total += part.sum(0)
            sq += np.square(part).sum(0)
        mean = total / len(x)
        std = np.sqrt(np.maximum(sq / len(x) - mean * mean, 0.0))
        with open(path + ".tmp", "wb") as f:
            np.savez(f, mean=mean.astype(np.float32), std=std.astype(np.float32))
        os.replace(path + ".tmp", path)
    with np.load(path) as z:
        return z["mean"], z["std"]


def cluster(output: str, k: int = 50, seed: int = 0, steps: int = 200, batch: int = 4096, log=print) -> dict:
    """k-means (distill.kmeans.fit_kmeans) of ``embeddings.npy`` into ``clusters.npz`` (once); returns its arrays."""
    from matpac_jax.distill.kmeans import fit_kmeans

    path = os.path.join(output, "clusters.npz")
    if not os.path.exists(path):
        _, x = consolidate(output)
        t0 = time.perf_counter()
        r = fit_kmeans(x, k, seed=seed, steps=steps, batch=batch)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, centroids=r["centroids"], assignments=r["assignments"], sizes=r["sizes"], k=k, seed=seed)
        os.replace(path + ".tmp", path)
        sizes = r["sizes"]
        took = time.perf_counter() - t0
        log(f"k-means: {k} clusters of {len(x)} embeddings in {took:.1f} s; sizes min {sizes.min()} median "
            f"{int(np.median(sizes))} max {sizes.max()}, {int((sizes == 0).sum())} empty")  # fmt: skip
    with np.load(path) as z:
        return {name: z[name] for name in z.files}


def report_line(r: dict) -> str:
    return (f"teacher pass: {r['clips']} clips in {r['seconds']:.1f} s ({r['clips_per_s']:.1f} clips/s); "
            f"{r['built']} shards built, {r['skipped']} already done")  # fmt: skip


def incomplete_message(r: dict) -> str | None:
    if r["missing"] or r["extra"] or r["duplicates"]:
        return (f"incomplete: missing {r['missing'][:10]} ({len(r['missing'])}), extra {r['extra'][:10]}, "
                f"duplicates {r['duplicates'][:10]}")  # fmt: skip
    return None


def run_from_config(config, workdir: str) -> int:
    """``config.task='teacher_pass'`` (configs/ssondo.py): the pass of ``config.data.train`` with
    ``config.teacher.checkpoint`` into ``workdir``, then the consolidation and the k-means. Exit status 0 when
    complete, 1 when clips are missing, 2 for a bad config."""
    import jax

    from matpac_jax.config_lib import ConfigError

    t = config.teacher_pass
    if not config.teacher.checkpoint or not config.data.train:
        raise ConfigError("the teacher pass needs --config.teacher.checkpoint=DIR and --config.data.train='GLOB'")
    try:
        r = teacher_pass(config.data.train, config.teacher.checkpoint, workdir, config.audio.seconds, t.batch,
                         t.dtype, jax.process_index(), jax.process_count(), frames=t.frames)  # fmt: skip
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if jax.process_index() != 0:
        return 0
    print(report_line(r), flush=True)
    if (message := incomplete_message(r)) is not None:
        print(f"error: {message}", file=sys.stderr)
        return 1
    print("every clip has exactly one embedding", flush=True)
    keys, x = consolidate(workdir)
    target_stats(workdir)
    print(f"{len(keys)} embeddings of dimension {x.shape[1]} ({x.dtype}) in {os.path.join(workdir, 'embeddings.npy')}")
    if t.clusters:
        cluster(workdir, t.clusters, seed=config.seed, steps=t.kmeans_steps, batch=t.kmeans_batch)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m matpac_jax.distill.teacher_pass", description=__doc__.split("\n")[0])
    ap.add_argument("--records", required=True, help="glob of clip-record shards (python -m matpac_jax.data.prepare)")
    ap.add_argument("--checkpoint", required=True, help="teacher: encoder directory, training workdir or checkpoint")
    ap.add_argument("--output", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", choices=DTYPES, default="float16")
    ap.add_argument("--frames", action="store_true", help="store the frame-level features too (decode_frames)")
    ap.add_argument("--clusters", type=int, default=50, help="k of the k-means for balanced sampling (0: none)")
    args = ap.parse_args(argv)
    import jax

    try:
        r = teacher_pass(args.records, args.checkpoint, args.output, args.seconds, args.batch, args.dtype,
                         jax.process_index(), jax.process_count(), frames=args.frames)  # fmt: skip
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report_line(r))
    if (message := incomplete_message(r)) is not None:
        print(f"error: {message}", file=sys.stderr)
        return 1
    print("every clip has exactly one embedding")
    if jax.process_index() == 0:
        consolidate(args.output)
        if args.clusters:
            cluster(args.output, args.clusters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
