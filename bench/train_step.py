r"""Benchmark a training step (pretraining, or fine-tuning with configs/finetune_as.py): steps/s, samples/s, counted
model FLOPs per sample, MFU.

  python bench/train_step.py --config=configs/pp.py:smoke                  # CPU smoke model
  python bench/train_step.py --config=configs/pp.py --batch=256 --steps=20 # ViT-B recipe on an accelerator
  python bench/train_step.py --config=configs/pp.py:smoke --baseline=model.dtype=bfloat16
  python bench/train_step.py --config=configs/pp.py --batch=256 --ladder  # straightforward -> tuned, one table
  python bench/train_step.py --config=configs/finetune_as.py:smoke         # the fine-tuning step (AudioSet head)

FLOPs are counted from the step's jaxpr (every dot_general / conv: forward, backward, teacher forward), not
estimated. With --baseline=key=value[,key=value] a second variant is timed in the same process and the ratio printed.
``--ladder`` times ``LADDER`` in one process, from the straightforward step (the config as it is) through each
option to the tuned one, with samples/s, MFU, the compiled step's memory per device and the ratio to the first
(cuDNN attention is skipped where there is no NVIDIA GPU).
Inputs are random waveforms of exactly one crop; the input pipeline is not part of this measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax import config_lib, parallel  # noqa: E402
from matpac_jax.audio.frontend import LogMelConfig, num_samples_for_frames  # noqa: E402
from matpac_jax.flops import count_matmul_flops, peak_flops  # noqa: E402
from matpac_jax.tasks import make_task  # noqa: E402
from matpac_jax.train.loop import compiled_memory  # noqa: E402
from matpac_jax.train.program import compile_program  # noqa: E402
from matpac_jax.train.task import TaskInput  # noqa: E402

# (name, overrides, batch multiplier): the straightforward step, each option, and all of them with a larger batch
LADDER = (
    ("straightforward", "", 1),
    ("remat dots", "model.remat=dots", 1),
    ("remat full", "model.remat=full", 1),
    ("layer scan", "model.scan_layers=True", 1),
    ("layer scan + remat dots", "model.scan_layers=True,model.remat=dots", 1),
    ("cuDNN flash attention", "model.attn_impl=cudnn", 1),
    ("cuDNN + scan + remat dots, batch x4", "model.attn_impl=cudnn,model.scan_layers=True,model.remat=dots", 4),
)


def apply_overrides(config, overrides: str) -> None:
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"


def measure(config, steps: int, warmup: int) -> dict:
    """The trainer's program for the config's task (train.program: guard, shardings, donation) on random crops."""
    mesh = parallel.make_mesh(config.mesh.to_dict())
    init_fn, train_step, abstract = compile_program(make_task(config, "/nonexistent").build(TaskInput(None)), mesh)
    b = config.data.batch_size
    n = num_samples_for_frames(config.audio.crop_frames, LogMelConfig.from_audio_config(config.audio))
    rng_np = np.random.default_rng(0)
    host = {"audio": rng_np.normal(0, 0.1, (b, n)).astype(np.float32)}
    if config.task == "finetune":  # multi-hot targets, ~2 labels per clip as in AudioSet
        host["targets"] = rng_np.random((b, config.finetune.num_classes)) < 2 / config.finetune.num_classes
        host["targets"] = host["targets"].astype(np.float32)
    batch = parallel.global_batch(host, mesh)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
    rng = jax.random.key(0)
    flops = count_matmul_flops(train_step, abstract, spec, rng)
    t0 = time.perf_counter()
    memory = compiled_memory(train_step, abstract, spec)
    compile_s = time.perf_counter() - t0  # lowering + XLA compilation of the whole step (no persistent cache here)
    state = init_fn(jax.random.key(config.seed))
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, m = train_step(state, batch, rng)
    jax.block_until_ready(m)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = train_step(state, batch, rng)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    out = {
        "steps_per_s": 1 / dt,
        "samples_per_s": b / dt,
        "gflop_per_sample": flops / b / 1e9,
        "compile_s": compile_s,
        "warmup_s": warmup_s,
        "loss": float(m["loss"]),
    }
    peak = peak_flops()
    if peak:
        out["mfu"] = flops / dt / peak
    if memory:
        out["memory_gib"] = memory["total"] / (1 << 30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pp.py:smoke")
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--set", default="", help="overrides key=value[,key=value] for the measured variant")
    ap.add_argument("--baseline", default=None, help="overrides for a baseline variant timed in the same run")
    ap.add_argument("--ladder", action="store_true", help="time every LADDER variant and print one table")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be at least 1")
    path, _, arg = args.config.partition(":")

    def config_for(overrides):
        c = config_lib.load_config_file(path, os.path.basename(path), arg or None)
        if args.batch:
            c.data.batch_size = args.batch
        apply_overrides(c, overrides)
        return c

    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}  "
        f"config: {args.config} {args.set}  batch {config_for(args.set).data.batch_size}"
    )
    if args.ladder:
        ladder(config_for, args)
        return
    result = measure(config_for(args.set), args.steps, args.warmup)
    line = "  ".join(f"{k} {v:,.4g}" for k, v in result.items())
    print(f"measured: {line}")
    if args.baseline is not None:
        base = measure(config_for(args.baseline), args.steps, args.warmup)
        print("baseline (" + args.baseline + "): " + "  ".join(f"{k} {v:,.4g}" for k, v in base.items()))
        print(f"speed-up vs baseline: {result['samples_per_s'] / base['samples_per_s']:.3f}x")


def ladder(config_for, args) -> None:
    gpu = jax.devices()[0].platform == "gpu"
    print(
        "| variant | batch | samples/s | MFU | step memory / device | compile s | vs straightforward |\n"
        "|---|---|---|---|---|---|---|"
    )
    first = None
    for name, overrides, mult in LADDER:
        c = config_for(overrides)
        c.data.batch_size *= mult
        if "cudnn" in overrides and not gpu:
            print(f"| {name} | {c.data.batch_size} | skipped: cuDNN attention needs an NVIDIA GPU | | | | |")
            continue
        try:
            r = measure(c, args.steps, args.warmup)
        except Exception as e:  # an out-of-memory or unsupported variant is a row, not the end of the table
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            print(f"| {name} | {c.data.batch_size} | failed: {why} | | | | |")
            continue
        first = first or r["samples_per_s"]
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        mem = f"{r['memory_gib']:.2f} GiB" if "memory_gib" in r else "n/a"
        print(f"| {name} | {c.data.batch_size} | {r['samples_per_s']:,.1f} | {mfu} | {mem} | {r['compile_s']:.1f} | "
              f"{r['samples_per_s'] / first:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
