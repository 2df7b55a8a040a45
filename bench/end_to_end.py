r"""The real data path end to end: WAV files -> ``prepare`` -> ArrayRecord shards -> grain -> the train step, then the
S-SONDO teacher pass over the same shards, in one run. Every other input figure (bench/input_pipeline.py, the H200
rows of BENCHMARKS.md) times synthetic in-memory batches; this one times what a user runs.

  python bench/end_to_end.py --cpu-rehearsal       # 2 CPU cores: smoke model, 64 clips, workers 0, 2; ~80 s
  python bench/end_to_end.py --accelerator --out=$OUT/end_to_end.json   # one GPU, 16 cores: ViT-B; ~4 min

Presets: ``PRESETS`` below (their flags go before the given ones, which override them).

What it does, and what each figure means:

1. Corpus: ``--clips`` synthetic 10-s 16 kHz clips (noise + tones, ``bench/input_pipeline.synth_clip``) written as
   16-bit WAV files in ``--prepare-workers`` processes, then ``python -m matpac_jax.data.prepare`` into ``--shards``
   pcm16 shards. Reported: wall s and clips/s of prepare, and its host cores (CPU-s of prepare and its decoding
   workers from ``getrusage(RUSAGE_CHILDREN)`` / its wall s).
2. Training, once per ``--workers`` count: ``python -m matpac_jax.main --config=... --config.data.source=records
   --config.data.train=SHARDS --config.data.workers=W`` for ``--steps`` steps (warm-up a fifth of them, one checkpoint
   at the end, no probe; ``--set key=value`` adds overrides), from a fresh workdir each. From its ``metrics.jsonl``,
   over the steady steps ``skip+1 .. steps-1`` (the first ones compile and fill the pipeline, the last one waits for
   the device): median ``step_time_s``; data wait share = sum(``data_wait_s``) / sum(``step_time_s``) (the input
   time the device could not overlap, train/loop.py; target on an accelerator < 5 %); samples/s = batch x steps /
   sum(``step_time_s``); and the rate the same steps would reach without the wait. Host cores (steady) = CPU-s of
   the trainer and every descendant (grain workers), read from /proc when the metrics lines of steps ``skip`` and
   ``steps-1`` appear, over the wall s between the two readings; host cores (whole run) = the same from
   ``getrusage(RUSAGE_CHILDREN)`` over the whole subprocess (start-up and compilation included).
3. Teacher pass, in this process after training (the GPU is free then): the encoder of the last training run
   (``load_model(workdir)``; speed does not depend on the weights). Forward-only rate = jitted ``Encoder.embed`` on
   in-memory 10-s clips in calls of ``--teacher-batch`` (bench/teacher_pass.batched_rate, compiled first); then
   ``distill.teacher_pass.teacher_pass`` (what ``python -m matpac_jax.distill.teacher_pass`` runs, without its
   k-means) over the first shards holding >= ``--teacher-clips`` clips: its clips/s (shard reads, decoding, embedding,
   writing) and its share of the forward-only rate. The programs compiled for the forward-only rate serve the pass.

Prints markdown tables with the machine, the command and the date; ``--out`` writes them as JSON. Everything lives in
``--workdir`` (default: a new temporary folder; a given one must be empty) and is deleted at the end unless ``--keep``.
A failing subprocess (or a training run past ``--train-timeout`` s, killed) stops the run with its exit status and the
tail of its output; a failing teacher pass is printed, the other figures still are, and the exit status is 1. Trainer
runs share the persistent compilation cache (``$JAX_COMPILATION_CACHE_DIR``, else ``./.jax_cache``): only the first
compiles.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]

from input_pipeline import CLIP_SECONDS, SAMPLE_RATE, synth_clip  # noqa: E402

from matpac_jax.fileio import atomic_write_json  # noqa: E402

PRESETS = {  # flags put before the given ones, which override them
    "cpu_rehearsal": "--clips=64 --shards=4 --prepare-workers=2 --config=configs/pp.py:smoke --steps=100 --skip=5 "
    "--workers=0,2 --teacher-clips=64 --teacher-batch=16 --train-timeout=300",
    "accelerator": "--clips=3072 --shards=16 --prepare-workers=16 --config=configs/pp.py:batch=256 --steps=50 "
    "--skip=5 --workers=0,4,8 --teacher-clips=3072 --teacher-batch=32 --train-timeout=150",
}
TAIL = 3000  # characters of a failed subprocess's output shown


# --- The reductions (pure; tests/test_bench_end_to_end.py checks them by hand).


def steady_state(lines: list[dict], skip: int, last: int) -> dict:
    """Step figures over the metrics lines of steps ``skip+1 .. last-1`` (module docstring, 2.)."""
    steady = [m for m in lines if skip < m["step"] < last]
    if len(steady) < 2:
        raise ValueError(f"{len(steady)} steady steps between step {skip} and step {last}: raise --steps")
    step_s = sum(m["step_time_s"] for m in steady)
    wait_s = sum(m["data_wait_s"] for m in steady)
    batch = round(steady[0]["samples_per_s"] * steady[0]["step_time_s"])  # metrics_log: batch / step_time_s
    return {
        "steps": len(steady),
        "batch": batch,
        "median_step_s": statistics.median(m["step_time_s"] for m in steady),
        "data_wait_share": wait_s / step_s,
        "samples_per_s": batch * len(steady) / step_s,
        "samples_per_s_no_wait": batch * len(steady) / (step_s - wait_s),
        "window_s": step_s,
    }


def tree_cpu_s(procs: dict[int, tuple[int, float]], root: int) -> float:
    """CPU seconds of ``root`` and all its descendants; ``procs``: {pid: (parent pid, CPU-s)}."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += procs[pid][1] if pid in procs else 0.0
        todo += children.get(pid, [])
    return total


def read_procs() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, utime + stime + cutime + cstime in s)} of every process, from /proc (Linux). The children's
    part counts workers that exited and were waited for."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        out[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    return out


# --- The steps.


def fail(what: str, cmd: list[str], code: int, output: str) -> None:
    raise SystemExit(f"{what} failed (exit {code}): {' '.join(cmd)}\n--- last output ---\n{output[-TAIL:]}")


def _write_wav(job: tuple[str, int, int]) -> None:
    import soundfile as sf

    path, seed, index = job
    wave = synth_clip(np.random.default_rng([seed, index]), CLIP_SECONDS * SAMPLE_RATE)
    sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")


def write_corpus(folder: str, clips: int, procs: int, seed: int = 0) -> float:
    """``clips`` WAV files in ``folder``; returns the wall s."""
    os.makedirs(folder)
    jobs = [(os.path.join(folder, f"clip{i:06d}.wav"), seed, i) for i in range(clips)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max(procs, 1)) as pool:
        list(pool.map(_write_wav, jobs, chunksize=max(1, clips // (4 * max(procs, 1)))))
    return time.perf_counter() - t0


def run_prepare(wavs: str, shards: str, num_shards: int, workers: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "matpac_jax.data.prepare",
        f"--input={wavs}",
        f"--output={shards}",
        f"--num-shards={num_shards}",
        f"--workers={workers}",
    ]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        fail("prepare", cmd, r.returncode, r.stdout + r.stderr)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(shards, "manifest.json")) as f:
        manifest = json.load(f)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    clips = manifest["total_clips"]
    return {
        "clips": clips,
        "shards": num_shards,
        "workers": workers,
        "wall_s": wall,
        "clips_per_s": clips / wall,
        "host_cores": cpu / wall,
        "manifest": manifest,
        "command": " ".join(cmd),
    }


def train_command(args, shards: str, workdir: str, workers: int) -> list[str]:
    s = args.steps
    cmd = [
        sys.executable,
        "-m",
        "matpac_jax.main",
        f"--config={args.config}",
        f"--workdir={workdir}",
        "--config.data.source=records",
        f"--config.data.train={shards}",
        f"--config.data.workers={workers}",
        f"--config.total_steps={s}",
        f"--config.log_every={s}",
        f"--config.checkpoint.every={s}",
        f"--config.optim.warmup_steps={s // 5}",
        "--config.probe.enabled=False",
    ]
    return cmd + [f"--config.{kv}" for kv in args.set]


def run_train(args, shards: str, workdir: str, workers: int) -> dict:
    """One trainer subprocess, its CPU read from /proc at the edges of the steady window (module docstring, 2.)."""
    cmd = train_command(args, shards, workdir, workers)
    os.makedirs(workdir)
    log_path, metrics = os.path.join(workdir, "console.txt"), os.path.join(workdir, "metrics.jsonl")
    lines, edges, offset, partial = [], {}, 0, b""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                done = proc.poll() is not None  # before reading: the last lines are then read too
                if os.path.exists(metrics):
                    with open(metrics, "rb") as f:
                        f.seek(offset)
                        data = f.read()
                    offset += len(data)
                    *complete, partial = (partial + data).split(b"\n")
                    lines += [json.loads(x) for x in complete if x]
                    for edge in (args.skip, args.steps - 1):
                        if not done and edge not in edges and any(m["step"] == edge for m in lines):
                            edges[edge] = (time.perf_counter(), tree_cpu_s(read_procs(), proc.pid))
                if done:
                    break
                if time.perf_counter() - t0 > args.train_timeout:
                    proc.kill()
                    proc.wait()
                    with open(log_path) as f:
                        fail(f"training with {workers} data workers (past --train-timeout)", cmd, -9, f.read())
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        with open(log_path) as f:
            fail(f"training with {workers} data workers", cmd, proc.returncode, f.read())
    if len(edges) < 2:
        raise SystemExit(f"{metrics}: the steady window's edges (steps {args.skip}, {args.steps - 1}) never appeared")
    (ta, ca), (tb, cb) = edges[args.skip], edges[args.steps - 1]
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return {
        "workers": workers,
        **steady_state(lines, args.skip, args.steps),
        "host_cores": (cb - ca) / (tb - ta),
        "host_cores_whole_run": cpu / wall,
        "run_wall_s": wall,
        "command": " ".join(cmd),
    }


def teacher_figures(args, shards: str, manifest: dict, encoder_dir: str, output: str) -> dict:
    """Forward-only rate, then the pass over the first shards holding >= ``--teacher-clips`` clips (module docstring,
    3.); jax starts here, after every trainer has exited."""
    import jax
    from teacher_pass import batched_rate

    from matpac_jax.distill.teacher_pass import teacher_pass
    from matpac_jax.inference import TRACES
    from matpac_jax.load import load_model

    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", ".jax_cache"))
    paths, clips = [], 0
    for shard in sorted(manifest["shards"], key=lambda s: s["shard"]):
        if clips >= args.teacher_clips:
            break
        paths.append(os.path.join(shards, shard["shard"]))
        clips += shard["clips"]
    encoder = load_model(encoder_dir)
    rng = np.random.default_rng(1)
    waves = np.stack([synth_clip(rng, CLIP_SECONDS * SAMPLE_RATE) for _ in range(args.teacher_batch)])
    forward = batched_rate(encoder, waves, args.teacher_batch, repeats=max(1, -(-clips // args.teacher_batch)))
    traced = sum(TRACES.values())
    r = teacher_pass(paths, encoder_dir, output, CLIP_SECONDS, args.teacher_batch, log=lambda _: None)
    if r["missing"] or r["extra"] or r["duplicates"] or r["clips"] != clips:
        raise SystemExit(f"teacher pass incomplete: {r['clips']} of {clips} clips, missing {r['missing'][:5]}")
    return {
        "encoder": encoder.describe(),
        "clips": clips,
        "shards": len(paths),
        "batch": args.teacher_batch,
        "pass_clips_per_s": r["clips_per_s"],
        "forward_clips_per_s": forward,
        "share_of_forward": r["clips_per_s"] / forward,
        "compiled_in_pass": sum(TRACES.values()) - traced,
    }


def machine() -> dict:
    """Device kind and count, CPU cores, versions (jax starts here: call it once the trainers have exited)."""
    import jax

    return {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


# --- The report.


def tables(result: dict) -> str:
    """The figures as markdown."""
    p, t, m = result["prepare"], result["teacher"], result["machine"]
    out = [
        f"{result['date']}, {m['device']}, {m['cpus']} CPU cores, jax {m['jax']}, python {m['python']}",
        f"command: `{result['command']}`",
        "",
        "| corpus | WAV writing s | prepare s | prepare clips/s | prepare host cores (rusage) |",
        "|---|---|---|---|---|",
        f"| {p['clips']} clips x {CLIP_SECONDS} s, {p['shards']} shards, {p['workers']} workers | "
        f"{result['wav_write_s']:.1f} | {p['wall_s']:.1f} | {p['clips_per_s']:,.1f} | {p['host_cores']:.2f} |",
        "",
        f"train: `{result['config']}`, batch {result['train'][0]['batch']}, steady steps {result['skip'] + 1}.."
        f"{result['steps'] - 1}",
        "",
        "| data workers | median step s | data wait | samples/s | samples/s without the wait | host cores (steady, "
        "/proc) | host cores (whole run, rusage) | run s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["train"]:
        out.append(
            f"| {r['workers']} | {r['median_step_s']:.4f} | {r['data_wait_share']:.1%} | {r['samples_per_s']:,.1f} | "
            f"{r['samples_per_s_no_wait']:,.1f} | {r['host_cores']:.2f} | {r['host_cores_whole_run']:.2f} | "
            f"{r['run_wall_s']:.0f} |"
        )
    if "error" in t:
        return "\n".join([*out, "", f"teacher pass failed: {t['error']}", "", f"total {result['total_s']:.0f} s"])
    e = t["encoder"]
    out += [
        "",
        "| teacher pass | clips | batch | pass clips/s | forward-only clips/s | share of forward-only |",
        "|---|---|---|---|---|---|",
        f"| ViT {e['depth']} x {e['dim']} (crop {e['crop_frames']} frames) | {t['clips']} ({t['shards']} shards) | "
        f"{t['batch']} | {t['pass_clips_per_s']:,.1f} | {t['forward_clips_per_s']:,.1f} | "
        f"{t['share_of_forward']:.1%} |",
        "",
        f"total {result['total_s']:.0f} s",
    ]
    if t["compiled_in_pass"]:
        out.append(f"note: the pass compiled {t['compiled_in_pass']} programs: its clips/s include compilation")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = ap.add_mutually_exclusive_group(required=True)
    preset.add_argument("--cpu-rehearsal", dest="preset", action="store_const", const="cpu_rehearsal")
    preset.add_argument("--accelerator", dest="preset", action="store_const", const="accelerator")
    ap.add_argument("--clips", type=int, help="synthetic 10-s clips written and prepared")
    ap.add_argument("--shards", type=int, help="prepare --num-shards")
    ap.add_argument("--prepare-workers", type=int, help="processes writing WAVs; prepare --workers")
    ap.add_argument("--config", help="trainer config, e.g. configs/pp.py:batch=256")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more --config.KEY=VALUE")
    ap.add_argument("--steps", type=int, help="steps per training run")
    ap.add_argument("--skip", type=int, help="first steps left out of the steady window (compilation, pipeline fill)")
    ap.add_argument("--workers", help="comma-separated config.data.workers counts, one training run each")
    ap.add_argument("--teacher-clips", type=int, help="clips of the teacher pass (whole shards, at least this many)")
    ap.add_argument("--teacher-batch", type=int, help="clips per embed call")
    ap.add_argument("--train-timeout", type=float, help="s before a training run is killed (fails)")
    ap.add_argument("--workdir", help="an empty or new folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the WAVs, shards, runs and embeddings")
    ap.add_argument("--out", help="also write the figures as JSON here")
    argv = sys.argv[1:] if argv is None else argv
    preset = ap.parse_known_args(argv)[0].preset  # exits when none is given
    args = ap.parse_args(PRESETS[preset].split() + argv)
    args.workers = [int(w) for w in str(args.workers).split(",")]
    if min(args.clips, args.shards, args.prepare_workers, args.teacher_clips, args.teacher_batch) < 1:
        ap.error("--clips, --shards, --prepare-workers, --teacher-clips and --teacher-batch must be >= 1")
    if args.shards > args.clips or min(args.workers) < 0 or not 0 < args.skip < args.steps - 2:
        ap.error("need --shards <= --clips, --workers >= 0 and 0 < --skip < --steps - 2")
    return args


def run_all(args, root: str) -> dict:
    """The three steps in ``root``; every figure, as ``tables`` reads them."""
    t_start = time.perf_counter()
    wavs, shards, runs = (os.path.join(root, name) for name in ("wavs", "shards", "runs"))
    print(f"writing {args.clips} WAV files to {wavs}", flush=True)
    wav_s = write_corpus(wavs, args.clips, args.prepare_workers)
    prepared = run_prepare(wavs, shards, args.shards, args.prepare_workers)
    print(f"prepare: {prepared['clips']} clips in {prepared['wall_s']:.1f} s", flush=True)
    if prepared["clips"] != args.clips:
        raise SystemExit(f"prepare wrote {prepared['clips']} of {args.clips} clips: see {shards}/manifest.json")
    train = []
    for w in args.workers:
        r = run_train(args, shards, os.path.join(runs, f"workers{w}"), w)
        train.append(r)
        print(
            f"train, {w} data workers: median step {r['median_step_s']:.4f} s, {r['samples_per_s']:,.1f} samples/s, "
            f"data wait {r['data_wait_share']:.1%}, host cores {r['host_cores']:.2f}, {r['run_wall_s']:.0f} s",
            flush=True,
        )
    try:  # the training figures are worth printing even if the pass fails
        encoder_dir = os.path.join(runs, f"workers{args.workers[-1]}")
        teacher = teacher_figures(args, shards, prepared.pop("manifest"), encoder_dir, os.path.join(root, "teacher"))
    except Exception as e:
        traceback.print_exc()
        teacher = {"error": f"{type(e).__name__}: {e}"}
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "config": args.config,
        "steps": args.steps,
        "skip": args.skip,
        "wav_write_s": wav_s,
        "prepare": prepared,
        "train": train,
        "teacher": teacher,
        "total_s": time.perf_counter() - t_start,
    }


def main() -> None:
    args = parse_args()
    if args.workdir and os.path.exists(args.workdir) and os.listdir(args.workdir):
        raise SystemExit(f"--workdir={args.workdir} is not empty: give an empty or new folder (runs would resume)")
    root = args.workdir or tempfile.mkdtemp(prefix="matpac_e2e_")
    os.makedirs(root, exist_ok=True)
    try:
        result = run_all(args, root)
    finally:
        if args.keep:
            print(f"kept {root}")
        elif args.workdir:
            for name in ("wavs", "shards", "runs", "teacher"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("\n" + tables(result), flush=True)
    if args.out:
        atomic_write_json(args.out, result)
    sys.exit(1 if "error" in result["teacher"] else 0)


if __name__ == "__main__":
    main()
