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
processes (``i::process_count``) and each batch of clips is split over the local devices. Each output shard has a
``.json`` sidecar naming what it was made from: a digest of the teacher's weights and settings (their content, not
their path), the input shard (name, size, modification time) and the pass's settings (seconds, dtype, frames). A shard
whose sidecar matches is skipped, so a restarted pass continues where it stopped; one made from another teacher, input
or settings (or with an unreadable sidecar) is recomputed, with a one-line notice: a rerun into the same output never
mixes embeddings of two teachers. Outputs are written atomically. The pass ends by checking that every clip key of
the corpus has exactly one embedding (missing / extra keys listed) and prints clips/s. Deterministic: no randomness
anywhere. ``--clusters`` larger than the corpus is refused before any clip is embedded.

Then, for distillation (process 0): ``embeddings.npy`` ([N, D], the pass's dtype, memory-mappable) and ``keys.json``
hold every embedding in corpus order (record ``i`` of the sorted input shards is row ``i``), and ``clusters.npz`` the
k-means of SPEC §6 over them (``centroids``, ``assignments``, ``sizes``; ``--clusters=0`` skips it). Each is rebuilt
when missing, unreadable or made from other shards / settings (``consolidated.json`` records the shards' sidecars;
``target_stats.npz`` and ``clusters.npz`` the embeddings they came from).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np

from matpac_jax.audio.io import from_int16, resample
from matpac_jax.config_lib import ConfigError
from matpac_jax.data.pipeline import expand_files  # a glob, or a prepare output / manifest: its exact shards
from matpac_jax.data.records import check_shard, decode_header, decode_pcm, read_shard, write_shard
from matpac_jax.distill.corpus import (
    DTYPES,
    _read_json,
    cluster,
    consolidate,
    decode_embedding,
    encode_embedding,
    target_stats,
)
from matpac_jax.fileio import atomic_write_json, sha256_bytes
from matpac_jax.load import load_model


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
    rate = encoder.sample_rate
    for data in read_shard(path):
        header, pcm = decode_pcm(data)
        keys.append(header["key"])
        waves.append(fit_clip(pcm, header["sample_rate"], rate, seconds))
    for i in range(0, len(waves), batch):
        r = encoder.embed(np.stack(waves[i : i + batch]), rate)
        for j, k in enumerate(keys[i : i + batch]):
            out.append(encode_embedding(k, r["clip"][j], dtype, r["frames"][j] if frames else None))
    return out, keys


SIDECAR_FORMAT = 2
IDENTITY = {  # sidecar field -> what a mismatch means
    "teacher": "teacher weights",
    "teacher_spec": "teacher settings (shape, front-end)",
    "input": "input shard (name, size or modification time)",
    "seconds": "--seconds",
    "dtype": "--dtype",
    "frames": "--frames",
}


def teacher_identity(encoder) -> dict:
    """The teacher's part of a shard's identity: digests of its weights' content and of its spec."""
    spec = json.dumps(encoder.describe(), sort_keys=True)
    return {"teacher": encoder.weights_digest(), "teacher_spec": sha256_bytes(spec.encode())}


def shard_identity(teacher: dict, path: str, seconds: float, dtype: str, frames: bool) -> dict:
    """What an output shard's content depends on (the ``IDENTITY`` fields of its sidecar); ``teacher`` from
    ``teacher_identity``."""
    st = os.stat(path)
    return {
        **teacher,
        "input": {"name": os.path.basename(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
        "seconds": float(seconds),
        "dtype": dtype,
        "frames": bool(frames),
    }


def stale_reason(target: str, want: dict) -> str | None:
    """None when ``target`` and its sidecar exist and the sidecar matches ``want``; else why the shard must be
    (re)built: '' when it was never finished, a phrase naming the mismatch otherwise."""
    if not os.path.exists(target + ".json"):
        return ""
    if not os.path.exists(target):
        return "its sidecar has no shard"
    try:
        side = _read_json(target + ".json")
    except (OSError, ValueError) as e:
        return f"its sidecar is unreadable ({type(e).__name__}: {e})"
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT:
        return "its sidecar has no teacher digest (an older version wrote it)"
    differ = [label for key, label in IDENTITY.items() if side.get(key) != want[key]]
    return f"it was made with another {', '.join(differ)}" if differ else None


def check_settings(inputs: list[str], seconds: float, batch: int, dtype: str, clusters: int) -> int:
    """ValueError naming the flag / config key of a setting the pass cannot use (before any clip is embedded); returns
    the corpus's clip count (from the shards' indexes)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} (--dtype / config.teacher_pass.dtype): expected one of {DTYPES}")
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds={seconds!r} (--seconds / config.audio.seconds): must be a finite number > 0")
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch={batch!r} (--batch / config.teacher_pass.batch): must be an integer >= 1")
    if not (isinstance(clusters, int) and clusters >= 0):
        raise ValueError(f"clusters={clusters!r} (--clusters / config.teacher_pass.clusters): must be an integer >= 0")
    total = sum(check_shard(path) for path in inputs)
    if clusters > total:
        raise ValueError(
            f"clusters={clusters} (--clusters / config.teacher_pass.clusters) is more than the {total} clips of the "
            f"corpus: k-means needs at least one clip per cluster; lower it (0 skips the k-means)"
        )
    return total


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
    clusters: int = 0,
) -> dict:
    """Run (or resume) the pass (``frames``: store the frame-level features too; ``clusters``: the k-means to come,
    checked against the clip count first); returns {'clips', 'seconds', 'clips_per_s', 'built', 'skipped',
    'rebuilt', 'missing', 'extra', 'duplicates'}."""
    try:
        inputs = expand_files(records)
    except ValueError as e:
        raise ValueError(f"--records={records!r}: {e}") from None
    check_settings(inputs, seconds, batch, dtype, clusters)
    encoder = load_model(checkpoint)
    if frames and encoder.frame_rate is None:
        raise ValueError(f"--frames: {checkpoint} holds a model without frame embeddings (it pools the clip)")
    teacher = teacher_identity(encoder)
    os.makedirs(output, exist_ok=True)
    built = skipped = rebuilt = clips = 0
    t0 = time.perf_counter()
    for i in range(process_index, len(inputs), process_count):
        target = output_name(output, i, len(inputs))
        want = shard_identity(teacher, inputs[i], seconds, dtype, frames)
        reason = stale_reason(target, want)
        if reason is None:
            skipped += 1
            continue
        if reason:
            log(f"teacher pass: {os.path.basename(target)}: {reason}: recomputing it")
            rebuilt += 1
        encoded, keys = _embed_shard(encoder, inputs[i], seconds, batch, dtype, frames)
        write_shard(target, encoded)
        side = want | {
            "format": SIDECAR_FORMAT,
            "clips": len(keys),
            "input_path": os.path.abspath(inputs[i]),
            "checkpoint": os.path.abspath(checkpoint),
        }
        atomic_write_json(target + ".json", side)
        built, clips = built + 1, clips + len(keys)
        log(f"teacher pass: {os.path.basename(target)} ({len(keys)} clips)")
    elapsed = time.perf_counter() - t0
    report = check_complete(inputs, output)
    report |= {
        "clips": clips,
        "seconds": elapsed,
        "clips_per_s": clips / max(elapsed, 1e-9),
        "built": built,
        "skipped": skipped,
        "rebuilt": rebuilt,
    }
    return report


def check_complete(inputs: list[str], output: str) -> dict:
    """Every clip key of the input shards has exactly one embedding: {'missing', 'extra', 'duplicates'} (lists)."""
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


def report_line(r: dict) -> str:
    return (
        f"teacher pass: {r['clips']} clips in {r['seconds']:.1f} s ({r['clips_per_s']:.1f} clips/s); "
        f"{r['built']} shards built ({r.get('rebuilt', 0)} stale ones recomputed), {r['skipped']} already "
        "done"
    )


def incomplete_message(r: dict) -> str | None:
    if r["missing"] or r["extra"] or r["duplicates"]:
        return (
            f"incomplete: missing {r['missing'][:10]} ({len(r['missing'])}), extra {r['extra'][:10]}, "
            f"duplicates {r['duplicates'][:10]}"
        )
    return None


def run_from_config(config, workdir: str) -> int:
    """``config.task='teacher_pass'`` (configs/ssondo.py): the pass of ``config.data.train`` with
    ``config.teacher.checkpoint`` into ``workdir``, then the consolidation and the k-means. Exit status 0 when
    complete, 1 when clips are missing, 2 for a bad config."""
    import jax

    t = config.teacher_pass
    if not config.teacher.checkpoint or not config.data.train:
        raise ConfigError("the teacher pass needs --config.teacher.checkpoint=DIR and --config.data.train='GLOB'")
    try:
        processes = {"process_index": jax.process_index(), "process_count": jax.process_count()}
        settings = {"batch": t.batch, "dtype": t.dtype, "frames": t.frames, "clusters": t.clusters, **processes}
        r = teacher_pass(config.data.train, config.teacher.checkpoint, workdir, config.audio.seconds, **settings)
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
        kmeans = {"steps": t.kmeans_steps, "batch": t.kmeans_batch, "inits": t.kmeans_inits, "epochs": t.kmeans_epochs}
        cluster(workdir, t.clusters, seed=config.seed, **kmeans)
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
        processes = {"process_index": jax.process_index(), "process_count": jax.process_count()}
        settings = {"batch": args.batch, "dtype": args.dtype, "frames": args.frames, "clusters": args.clusters}
        r = teacher_pass(args.records, args.checkpoint, args.output, args.seconds, **settings, **processes)
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
