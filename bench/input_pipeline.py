r"""Benchmark the input pipeline: raw ArrayRecord reads/s vs decoded random crops/s, for PCM and FLAC records.

  python bench/input_pipeline.py                                  # defaults: 400 clips, 4 shards, workers 0, 1, 2
  python bench/input_pipeline.py --clips=2000 --shards=16 --workers=8 --batches=40

One run writes a synthetic corpus (10-s 16 kHz clips of noise plus tones, so FLAC compresses like real audio rather
than silence) to shards in a temporary directory, three times: int16 PCM records in uncompressed shards (``pcm16``,
what ``prepare`` writes by default), the same in zstd-compressed shards (``pcm16+zstd``) and FLAC records in
uncompressed shards (``flac``); then measures:

  (a) raw reads: ``ArrayRecordReader.read_all()`` over every shard, no decoding (array_record may decompress chunks
      in its own threads: the per-CPU-s figure counts them);
  (b) the full ``pretrain_dataset`` pipeline (shuffle, decode, random crop of 97,520 samples = 608 frames, batch 32)
      with workers=0 (in-process, grain's read threads), 1 and ``--workers``; the first ``--warmup`` batches
      (worker start-up included) are discarded, then ``--batches`` batches are timed. For pcm16 with workers, also
      the same pipeline sending each batch in grain's fresh shared-memory block (the reference for ``shm_batches``).

Per-core figures are items per CPU-second: the CPU time of this process and of the grain worker processes (from
/proc) over the timed window, so they do not depend on how many cores the threads / workers actually got. The run
prints (b)/(a) per core for the single-process case, (c) the same read + decode + crop in a plain loop without grain
(to separate codec cost from pipeline overhead), and the host cores needed to feed an accelerator consuming
``--target`` samples/s (4000 / crops per CPU-second). Wall-clock rates depend on what else the machine is running.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax.data.records import ClipRecord, encode_record, shard_name, write_shard  # noqa: E402

SAMPLE_RATE = 16000
CLIP_SECONDS = 10
CROP = 97_520  # num_samples_for_frames(608): 400 + 607 * 160
BATCH = 32
STORAGES = {  # name: (record codec, ArrayRecord compression)
    "pcm16": ("pcm16", "none"),
    "pcm16+zstd": ("pcm16", "zstd"),
    "flac": ("flac", "none"),
}


def synth_clip(rng: np.random.Generator, n: int) -> np.ndarray:
    """Noise (filtered, with a loudness envelope) plus a few tones: compressible like real audio, not like silence."""
    t = np.arange(n) / SAMPLE_RATE
    noise = rng.normal(0.0, 1.0, n)
    noise = np.convolve(noise, np.ones(8) / 8, mode="same")  # low-pass: most real audio energy is low
    env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 2.0) * t + rng.uniform(0, 2 * np.pi))
    x = rng.uniform(0.02, 0.1) * noise * env
    for _ in range(rng.integers(1, 4)):
        f = rng.uniform(80, 4000)
        x += rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * env
    return np.clip(x, -1, 1).astype(np.float32)


def write_corpus(root: str, clips: int, shards: int, seed: int) -> dict[str, dict]:
    """Write ``clips`` synthetic clips to ``shards`` shards per storage; returns {storage: {files, bytes}}."""
    rng = np.random.default_rng(seed)
    audio = [synth_clip(rng, CLIP_SECONDS * SAMPLE_RATE) for _ in range(clips)]
    out = {}
    for name, (codec, compression) in STORAGES.items():
        directory = os.path.join(root, name)
        t0 = time.perf_counter()
        files = []
        for s in range(shards):
            path = shard_name(directory, s, shards)
            records = (
                encode_record(ClipRecord(key=f"clip{i:06d}", audio=audio[i]), codec) for i in range(s, clips, shards)
            )
            write_shard(path, records, compression)
            files.append(path)
        size = sum(os.path.getsize(f) for f in files)
        out[name] = {"files": files, "bytes": size, "write_s": time.perf_counter() - t0}
    return out


def raw_reads(files: list[str], repeats: int) -> dict:
    """Records/s reading every shard with ``ArrayRecordReader.read_all()``, no decoding."""
    from array_record.python.array_record_module import ArrayRecordReader

    count, nbytes = 0, 0
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for path in files:
            reader = ArrayRecordReader(path)
            records = reader.read_all()
            reader.close()
            count += len(records)
            nbytes += sum(len(r) for r in records)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"per_s": count / wall, "per_cpu_s": count / cpu, "records": count, "mb_per_s": nbytes / wall / 1e6}


def plain_loop(files: list[str], n: int, seed: int) -> dict:
    """Crops per CPU-s of the pipeline's steps in a plain loop: random-access read, decode_pcm, crop, no grain."""
    import grain

    from matpac_jax.data.records import decode_pcm

    source = grain.sources.ArrayRecordDataSource(files)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(source))
    out = np.empty((BATCH, CROP), np.int16)
    c0 = time.process_time()
    for k in range(n):
        audio = decode_pcm(source[int(order[k % len(order)])])[1]
        start = int(rng.integers(0, audio.shape[0] - CROP + 1))
        out[k % BATCH] = audio[start : start + CROP]
    return {"per_cpu_s": n / (time.process_time() - c0)}


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_now() -> dict[int, float]:
    """CPU seconds of this process (all threads) and of each live child (the grain workers)."""
    out = {os.getpid(): time.process_time()}
    for child in multiprocessing.active_children():
        out[child.pid] = _proc_cpu_s(child.pid)
    return out


def pipeline_rate(files: list[str], workers: int, warmup: int, batches: int, seed: int, pooled: bool = True) -> dict:
    """Crops/s of ``pretrain_dataset`` after ``warmup`` discarded batches, over ``batches`` timed ones.
    ``pooled=False``: the same elements and workers, but batches built by grain's default batching, which sends each
    one in a fresh shared-memory block (the pipeline before ``shm_batches``)."""
    import grain

    from matpac_jax.data.pipeline import pretrain_dataset, worker_init

    args = dict(global_batch=BATCH, crop_samples=CROP, seed=seed, short_clips="skip", process_index=0, process_count=1)
    if pooled or workers == 0:
        ds = pretrain_dataset(files, workers=workers, **args)
    else:
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
        ds = pretrain_dataset(files, workers=0, **args).mp_prefetch(options, worker_init_fn=worker_init)
    it = iter(ds)
    t0 = time.perf_counter()
    for _ in range(warmup):
        batch = next(it)
    warmup_s = time.perf_counter() - t0
    assert batch["audio"].shape == (BATCH, CROP) and batch["audio"].dtype == np.int16, batch["audio"].shape
    cpu0 = _cpu_now()
    w0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    wall = time.perf_counter() - w0
    cpu1 = _cpu_now()
    cpu = sum(cpu1[pid] - cpu0.get(pid, 0.0) for pid in cpu1)
    main_cpu = cpu1[os.getpid()] - cpu0[os.getpid()]
    if len(cpu1) != workers + 1:
        print(f"  warning: CPU time counted for {len(cpu1)} processes, expected {workers + 1}", flush=True)
    crops = batches * BATCH
    del it, ds  # shuts the workers down
    return {
        "per_s": crops / wall,
        "per_cpu_s": crops / cpu,
        "cpu_s": cpu,
        "main_ms": main_cpu / crops * 1e3,
        "worker_ms": (cpu - main_cpu) / crops * 1e3,
        "wall_s": wall,
        "warmup_s": warmup_s,
    }


def shm_page_cost(nbytes: int, repeats: int = 20) -> dict:
    """ms to fill a fresh shared-memory block of ``nbytes`` (what grain allocates per batch sent from a worker) vs
    refilling an already-touched buffer: the difference is the kernel's page faults."""
    from multiprocessing import shared_memory

    t0 = time.perf_counter()
    for _ in range(repeats):
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
        view = np.ndarray((nbytes,), np.uint8, buffer=shm.buf)
        view[:] = 1
        del view
        shm.close()
        shm.unlink()
    fresh = (time.perf_counter() - t0) / repeats
    warm = np.zeros(nbytes, np.uint8)
    t0 = time.perf_counter()
    for _ in range(repeats):
        warm[:] = 1
    return {"fresh_ms": fresh * 1e3, "warm_ms": (time.perf_counter() - t0) / repeats * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=400, help="synthetic 10-s clips per storage")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="largest worker count measured (also 0 and 1)")
    ap.add_argument("--warmup", type=int, default=3, help="batches discarded before timing (worker start-up)")
    ap.add_argument("--batches", type=int, default=50, help="batches of 32 crops timed per configuration")
    ap.add_argument("--raw-repeats", type=int, default=5, help="passes over the shards for the raw-read figure")
    ap.add_argument("--target", type=float, default=4000.0, help="accelerator consumption, samples/s")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if min(args.clips, args.shards, args.batches, args.warmup, args.raw_repeats) < 1 or args.workers < 0:
        ap.error("--clips, --shards, --batches, --warmup and --raw-repeats must be >= 1, --workers >= 0")
    if args.shards > args.clips:
        ap.error("--shards must not exceed --clips")

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's mp_prefetch reads absl flags

    import grain

    t_start = time.perf_counter()
    worker_counts = sorted({0, 1, args.workers})
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"grain {getattr(grain, '__version__', '?')}"
    )
    print(f"corpus: {args.clips} clips x {CLIP_SECONDS} s @ {SAMPLE_RATE} Hz in {args.shards} shards per storage")
    print(f"pipeline: crop {CROP:,} samples, batch {BATCH}, warmup {args.warmup} batches, timed {args.batches}")
    with tempfile.TemporaryDirectory(prefix="matpac_bench_") as root:
        corpus = write_corpus(root, args.clips, args.shards, args.seed)
        for name, c in corpus.items():
            print(
                f"  {name:10s}: {c['bytes'] / args.clips / 1e3:8.1f} kB/clip on disk "
                f"({c['bytes'] / 1e6:.1f} MB, written in {c['write_s']:.1f} s)"
            )
        raw = {name: raw_reads(corpus[name]["files"], args.raw_repeats) for name in STORAGES}
        loop = {name: plain_loop(corpus[name]["files"], args.batches * BATCH, args.seed) for name in STORAGES}
        rows, fresh_shm = {}, {}
        for name in STORAGES:
            for w in worker_counts:
                rows[name, w] = pipeline_rate(corpus[name]["files"], w, args.warmup, args.batches, args.seed)
                r = rows[name, w]
                print(
                    f"  measured {name} workers={w}: {r['per_s']:.1f} crops/s "
                    f"(warm-up {r['warmup_s']:.1f} s, timed {r['wall_s']:.1f} s)",
                    flush=True,
                )
        for w in worker_counts[1:]:  # the same pcm16 pipeline with grain's fresh shared memory per batch
            fresh_shm[w] = pipeline_rate(corpus["pcm16"]["files"], w, args.warmup, args.batches, args.seed, False)

    print()
    print("(a) raw ArrayRecord reads (read_all, incl. array_record's own threads), no decoding")
    print("| storage | kB/clip | records/s (wall) | records per CPU-s | MB/s (wall) |")
    print("|---|---|---|---|---|")
    for name in STORAGES:
        a = raw[name]
        kb = corpus[name]["bytes"] / args.clips / 1e3
        print(f"| {name} | {kb:.1f} | {a['per_s']:,.0f} | {a['per_cpu_s']:,.0f} | {a['mb_per_s']:,.0f} |")
    print()
    print(f"(b) pretrain_dataset: shuffle, decode, random crop of {CROP:,} samples, batch {BATCH}")
    print(
        f"| storage | workers | crops/s (wall) | CPU-s used per wall-s | CPU-ms per crop (main + workers) | "
        f"crops per CPU-s | (b)/(a) per core | cores for {args.target:,.0f} samples/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in STORAGES:
        for w in worker_counts:
            r = rows[name, w]
            ratio = r["per_cpu_s"] / raw[name]["per_cpu_s"]
            print(
                f"| {name} | {w} | {r['per_s']:,.1f} | {r['cpu_s'] / r['wall_s']:.2f} | "
                f"{r['main_ms']:.3f} + {r['worker_ms']:.3f} | {r['per_cpu_s']:,.1f} | "
                f"{ratio:.3f} | {args.target / r['per_cpu_s']:.1f} |"
            )
    for w, r in fresh_shm.items():
        ratio = r["per_cpu_s"] / raw["pcm16"]["per_cpu_s"]
        print(
            f"| pcm16, grain's fresh shared memory per batch | {w} | {r['per_s']:,.1f} | "
            f"{r['cpu_s'] / r['wall_s']:.2f} | "
            f"{r['main_ms']:.3f} + {r['worker_ms']:.3f} | {r['per_cpu_s']:,.1f} | "
            f"{ratio:.3f} | {args.target / r['per_cpu_s']:.1f} |"
        )
    print()
    for name in STORAGES:
        single = rows[name, 0]["per_cpu_s"] / raw[name]["per_cpu_s"]
        best = max(rows[name, w]["per_cpu_s"] for w in worker_counts)
        print(
            f"{name}: single-process (b)/(a) per core = {single:.3f}; host cores to feed {args.target:,.0f} "
            f"samples/s = {args.target / best:.1f} (at the best per-core rate, {best:,.1f} crops per CPU-s)"
        )
    print()
    print("(c) the same steps in a plain loop, no grain (random-access read + decode_record + crop)")
    for name in STORAGES:
        c = loop[name]["per_cpu_s"]
        print(f"{name}: {c:,.1f} crops per CPU-s = {c / raw[name]['per_cpu_s']:.3f} of (a) per core")
    shm = shm_page_cost(BATCH * CROP * 2)
    print()
    print(
        f"(d) one int16 batch ({BATCH * CROP * 2 / 1e6:.1f} MB) into fresh shared memory, as a worker sends it: "
        f"{shm['fresh_ms']:.2f} ms; into an already-touched buffer: {shm['warm_ms']:.2f} ms "
        f"(= {(shm['fresh_ms'] - shm['warm_ms']) / BATCH:.3f} CPU-ms per crop of page faults)"
    )
    print(f"total run time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
