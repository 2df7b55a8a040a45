r"""Benchmark a training step (pretraining, or fine-tuning with configs/finetune_as.py): steps/s, samples/s, counted
model FLOPs per sample, MFU.

  python bench/train_step.py --config=configs/pp.py:smoke                  # CPU smoke model
  python bench/train_step.py --config=configs/pp.py --batch=256 --steps=20 # ViT-B recipe on an accelerator
  python bench/train_step.py --config=configs/pp.py:smoke --baseline=model.dtype=bfloat16
  python bench/train_step.py --config=configs/pp.py --batch=256 --ladder  # XLA attention -> default -> options
  python bench/train_step.py --config=configs/finetune_as.py:smoke         # the fine-tuning step (AudioSet head)

FLOPs are counted from the step's jaxpr (every dot_general / conv: forward, backward, teacher forward), not
estimated. With --baseline=key=value[,key=value] a second variant is timed in the same process and the ratio printed.
``--ladder`` times ``LADDER`` in one process: XLA's attention, the default (``model.attn_impl='auto'``: cuDNN's
fused attention on an NVIDIA GPU, XLA's elsewhere) and each option on top of it, with samples/s, MFU (the attention
inside cuDNN's kernel counted as XLA's, flops.py), the compiled step's memory per device and the ratio to the first.
Inputs are random waveforms of exactly one crop; the input pipeline is not part of this measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax import config_lib, parallel  # noqa: E402
from matpac_jax.audio.frontend import LogMelConfig, num_samples_for_frames  # noqa: E402
from matpac_jax.flops import count_matmul_flops, peak_flops  # noqa: E402
from matpac_jax.tasks import make_task  # noqa: E402
from matpac_jax.train.loop import memory_of  # noqa: E402
from matpac_jax.train.program import compile_program  # noqa: E402
from matpac_jax.train.task import TaskInput  # noqa: E402

# (name, overrides, batch multiplier): XLA's attention (the default before 'auto'), the default, and each option on
# top of it. Earlier rows on one H200 (BENCHMARKS.md): remat and the layer scan cost speed, cuDNN paid 1.28x.
LADDER = (
    ("XLA attention", "model.attn_impl=xla", 1),
    ("default (attn_impl=auto)", "", 1),
    ("auto + remat dots", "model.remat=dots", 1),
    ("auto + layer scan", "model.scan_layers=True", 1),
    ("auto, batch x2", "", 2),
    ("auto + remat dots, batch x4", "model.remat=dots", 4),
)


def apply_overrides(config, overrides: str) -> None:
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"


TARGET_DIM = 3840  # the distillation target: the MATPAC++ teacher's clip embedding


@dataclasses.dataclass
class PreparedStep:
    """A task's step as the trainer compiles it (train.program: guard, shardings, donation), ahead of time, with an
    initial state and a random host batch of the config's shapes."""

    compiled: Any  # the AOT-compiled step: (state, batch, rng) -> (state, metrics), state donated
    state: Any
    host_batch: dict  # numpy arrays, as the input pipeline gives them
    mesh: Any
    flops: int  # counted matmul FLOPs of one step (flops.count_matmul_flops)
    memory: dict | None  # compiled per-device bytes (loop.compiled_memory's keys)
    compile_s: float  # lowering + XLA compilation (no persistent cache)

    def batch(self):
        """The host batch placed on the mesh as the trainer places it (a fresh transfer at each call)."""
        return parallel.global_batch(self.host_batch, self.mesh)


def random_batch(config) -> dict:
    """Random host inputs of one step for the config's task: waveform crops (int16 PCM, as the input pipeline ships
    them), plus multi-hot targets (fine-tuning, ~2 labels per clip as in AudioSet) or teacher embeddings
    (distillation)."""
    rng = np.random.default_rng(0)
    b = config.data.batch_size
    if config.task == "distill":
        n = int(round(config.audio.seconds * config.audio.sample_rate))
    else:
        n = num_samples_for_frames(config.audio.crop_frames, LogMelConfig.from_audio_config(config.audio))
    host = {"audio": rng.integers(-3000, 3000, (b, n)).astype(np.int16)}
    if config.task == "finetune":
        k = config.finetune.num_classes
        host["targets"] = (rng.random((b, k)) < 2 / k).astype(np.float32)
    if config.task == "distill":
        host["target"] = rng.standard_normal((b, TARGET_DIM)).astype(np.float32)
    return host


def prepare_step(config) -> PreparedStep:
    """Compile the config's step once (the timed and profiled calls run this compiled program)."""
    mesh = parallel.make_mesh(config.mesh.to_dict())
    info = {"target_dim": TARGET_DIM} if config.task == "distill" else {}
    if config.task == "distill":  # no teacher corpus here: raw targets (the recipe's; centring is one [B, d] op)
        config.distill.targets = "raw"
        config.student.init_from = config.student.init_from or "none"  # speed does not depend on the start
    program = make_task(config, "/nonexistent").build(TaskInput(None, info))
    init_fn, train_step, abstract = compile_program(program, mesh, config)
    host = random_batch(config)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
    rng = jax.random.key(0)
    flops = count_matmul_flops(train_step, abstract, spec, rng)
    t0 = time.perf_counter()
    compiled = train_step.lower(abstract, spec, rng).compile()
    compile_s = time.perf_counter() - t0
    memory = memory_of(compiled)
    return PreparedStep(compiled, init_fn(jax.random.key(config.seed)), host, mesh, flops, memory, compile_s)


def measure(config, steps: int, warmup: int) -> dict:
    """samples/s, counted GFLOP/sample, MFU and memory of the config's step on random crops (one batch transfer
    before the timed steps: the input pipeline is not part of it)."""
    p = prepare_step(config)
    b = config.data.batch_size
    batch, rng, state = p.batch(), jax.random.key(0), p.state
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, m = p.compiled(state, batch, rng)
    jax.block_until_ready(m)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = p.compiled(state, batch, rng)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    out = {
        "steps_per_s": 1 / dt,
        "samples_per_s": b / dt,
        "gflop_per_sample": p.flops / b / 1e9,
        "compile_s": p.compile_s,
        "warmup_s": warmup_s,
        "loss": float(m["loss"]),
    }
    peak = peak_flops()
    if peak:
        out["mfu"] = p.flops / dt / peak
    if p.memory:
        out["memory_gib"] = p.memory["total"] / (1 << 30)
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
    from matpac_jax.models.vit import cudnn_attention_available

    cudnn = cudnn_attention_available()
    print(f"attn_impl='auto' is {'cuDNN' if cudnn else 'XLA'} attention on this machine")
    print(
        "| variant | batch | samples/s | MFU | step memory / device | compile s | vs XLA attention |\n"
        "|---|---|---|---|---|---|---|"
    )
    first = None
    for name, overrides, mult in LADDER:
        c = config_for(overrides)
        c.data.batch_size *= mult
        if "cudnn" in overrides and not cudnn:
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
