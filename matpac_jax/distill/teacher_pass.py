r"""The S-SONDO teacher-embedding pass (SPEC §6): one teacher clip embedding per clip of a record corpus.

    python -m matpac_jax.distill.teacher_pass --records='/data/shards/*.arrayrecord' --checkpoint=models/pp \
        --output=/data/teacher_pp [--dtype=float16] [--batch=32] [--seconds=10]

Each clip is cropped or zero-padded to exactly ``--seconds`` (10 s, from its start: the clip the student will see),
embedded with the teacher's clip embedding of SPEC §5 (time-mean of the last layer's frame features, 3840-d), and
written to an output shard with the same index as its input shard: ``teacher-<i>-of-<n>.arrayrecord``, one record per
clip (``encode_embedding``: a JSON header {key, dim, dtype} and the raw vector). Input shards are divided between
processes (``i::process_count``) and each batch of clips is split over the local devices. A shard whose output file
and ``.json`` sidecar exist is skipped, so a restarted pass continues where it stopped; outputs are written atomically.
The pass ends by checking that every clip key of the corpus has exactly one embedding (missing / extra keys listed)
and prints clips/s. Deterministic: no randomness anywhere.
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

from matpac_jax.audio.io import from_int16
from matpac_jax.data.records import decode_pcm, read_shard, write_shard

_HEADER = struct.Struct("<I")
DTYPES = ("float16", "float32")


def encode_embedding(key: str, vector: np.ndarray, dtype: str = "float16") -> bytes:
    head = json.dumps({"key": key, "dim": int(vector.shape[0]), "dtype": dtype}).encode()
    return _HEADER.pack(len(head)) + head + np.asarray(vector, dtype).tobytes()


def decode_embedding(data: bytes) -> tuple[str, np.ndarray]:
    (n,) = _HEADER.unpack_from(data)
    head = json.loads(data[4 : 4 + n])
    vec = np.frombuffer(data[4 + n :], head["dtype"])
    if vec.shape[0] != head["dim"]:
        raise ValueError(f"embedding record of {head['key']!r}: {vec.shape[0]} values, header says {head['dim']}")
    return head["key"], vec


def fit_length(pcm: np.ndarray, samples: int) -> np.ndarray:
    """float32 clip of exactly ``samples``: the first ``samples`` of the int16 PCM, zero-padded at the end."""
    out = np.zeros(samples, np.float32)
    n = min(samples, pcm.shape[0])
    out[:n] = from_int16(pcm[:n])
    return out


def output_name(output: str, index: int, count: int) -> str:
    return os.path.join(output, f"teacher-{index:05d}-of-{count:05d}.arrayrecord")


def _embed_shard(encoder, path: str, samples: int, batch: int, dtype: str) -> tuple[list[bytes], list[str]]:
    keys, waves, out = [], [], []
    rate = encoder.spec.frontend.sample_rate
    for data in read_shard(path):
        header, pcm = decode_pcm(data)
        if header["sample_rate"] != rate:
            raise ValueError(
                f"{path}: clip {header['key']!r} is at {header['sample_rate']} Hz, the teacher needs {rate}"
            )
        keys.append(header["key"])
        waves.append(fit_length(pcm, samples))
    for i in range(0, len(waves), batch):
        emb = encoder.embed(np.stack(waves[i : i + batch]), rate)["clip"]
        out += [encode_embedding(k, e, dtype) for k, e in zip(keys[i : i + batch], emb, strict=True)]
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
) -> dict:
    """Run (or resume) the pass; returns {'clips', 'seconds', 'clips_per_s', 'built', 'skipped', 'missing', 'extra'}."""
    from matpac_jax.inference import load_encoder

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    inputs = sorted(glob.glob(records))
    if not inputs:
        raise ValueError(f"--records={records!r} matches no shard")
    encoder = load_encoder(checkpoint)
    samples = int(round(seconds * encoder.spec.frontend.sample_rate))
    os.makedirs(output, exist_ok=True)
    built = skipped = clips = 0
    t0 = time.perf_counter()
    for i in range(process_index, len(inputs), process_count):
        target = output_name(output, i, len(inputs))
        if os.path.exists(target) and os.path.exists(target + ".json"):
            skipped += 1
            continue
        encoded, keys = _embed_shard(encoder, inputs[i], samples, batch, dtype)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m matpac_jax.distill.teacher_pass", description=__doc__.split("\n")[0])
    ap.add_argument("--records", required=True, help="glob of clip-record shards (python -m matpac_jax.data.prepare)")
    ap.add_argument("--checkpoint", required=True, help="teacher: encoder directory, training workdir or checkpoint")
    ap.add_argument("--output", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", choices=DTYPES, default="float16")
    args = ap.parse_args(argv)
    import jax

    try:
        r = teacher_pass(args.records, args.checkpoint, args.output, args.seconds, args.batch, args.dtype,
                         jax.process_index(), jax.process_count())  # fmt: skip
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"teacher pass: {r['clips']} clips in {r['seconds']:.1f} s ({r['clips_per_s']:.1f} clips/s); "
          f"{r['built']} shards built, {r['skipped']} already done")  # fmt: skip
    if r["missing"] or r["extra"] or r["duplicates"]:
        print(f"error: incomplete: missing {r['missing'][:10]} ({len(r['missing'])}), extra {r['extra'][:10]}, "
              f"duplicates {r['duplicates'][:10]}", file=sys.stderr)  # fmt: skip
        return 1
    print("every clip has exactly one embedding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
