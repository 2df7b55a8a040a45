r"""Benchmark the S-SONDO distillation step per student and compute dtype: samples/s, counted FLOPs per sample, MFU,
and each dtype's speed against float32 measured in the same run.

  python bench/distill_step.py                                   # mn10, ERes2Net, dymn10; float32 and bfloat16
  python bench/distill_step.py --students=mn10 --batch=120       # the recipe's batch on an accelerator
  python bench/distill_step.py --seconds=2 --batch=8 --steps=3   # a quick look on a laptop CPU

The step is the trainer's (distill.step: front-end on device, student, projection head, loss, Adam, BatchNorm),
with the recipe's front-end (configs/ssondo.py: 10-s clips at 32 kHz, 128 mels, 624 frames) on random int16 audio
and random 3840-d targets; the input pipeline is not part of this measurement. FLOPs are counted from the step's
jaxpr (every convolution and dot_general, forward and backward), not estimated.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from matpac_jax import parallel  # noqa: E402
from matpac_jax.config_lib import load_config_file  # noqa: E402
from matpac_jax.distill.task import DistillTask  # noqa: E402
from matpac_jax.flops import count_matmul_flops, peak_flops  # noqa: E402
from matpac_jax.models.students import count_params  # noqa: E402
from matpac_jax.train.program import compile_program  # noqa: E402
from matpac_jax.train.task import TaskInput  # noqa: E402

STUDENTS = {"mn10": dict(arch="mobilenet", width=1.0), "eres2net": dict(arch="eres2net"),
            "dymn10": dict(arch="dymn", width=1.0)}  # fmt: skip


def measure(config, steps: int, warmup: int) -> dict:
    """The trainer's program (DistillTask.build through train.program: guard, shardings, donation) on one device."""
    b, n = config.data.batch_size, int(round(config.audio.seconds * config.audio.sample_rate))
    task = DistillTask(config, "/nonexistent")
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    init_fn, step, _ = compile_program(task.build(TaskInput(None, {"target_dim": 3840})), mesh, config)
    rng = np.random.default_rng(0)
    batch = {
        "audio": jnp.asarray(rng.integers(-3000, 3000, (b, n)), jnp.int16),
        "target": jnp.asarray(rng.standard_normal((b, 3840)), jnp.float32),
    }
    state = init_fn(jax.random.key(0))
    key = jax.random.key(1)
    flops = count_matmul_flops(step, state, batch, key)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = compiled(state, batch, key)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch, key)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    out = {"params": count_params(state.params["backbone"]), "samples_per_s": b / dt,
           "gflop_per_sample": flops / b / 1e9, "compile_s": compile_s, "loss": float(m["loss"])}  # fmt: skip
    peak = peak_flops()
    if peak:
        out["mfu"] = flops / dt / peak
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", default="mn10,eres2net,dymn10", help=f"comma-separated: {', '.join(STUDENTS)}")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length (the recipe: 10)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be at least 1")
    unknown = set(args.students.split(",")) - set(STUDENTS)
    if unknown:
        ap.error(f"unknown students {sorted(unknown)}: choose from {', '.join(STUDENTS)}")
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}  "
          f"batch {args.batch} of {args.seconds:g}-s clips")  # fmt: skip
    print("| student | parameters | dtype | samples/s | GFLOP/sample | MFU | compile s | vs float32 |\n"
          "|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name in args.students.split(","):
        first = None
        for dtype in args.dtypes.split(","):
            c = load_config_file(os.path.join(ROOT, "configs", "ssondo.py"), "ssondo.py", None)
            c.student.update(STUDENTS[name])
            c.student.init_from = "none"  # timing only: no ImageNet weights needed
            c.student.dtype = dtype
            c.data.batch_size, c.audio.seconds = args.batch, args.seconds
            r = measure(c, args.steps, args.warmup)
            first = first or r["samples_per_s"]
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
            print(f"| {name} | {r['params']:,} | {dtype} | {r['samples_per_s']:,.2f} | {r['gflop_per_sample']:.2f} | "
                  f"{mfu} | {r['compile_s']:.1f} | {r['samples_per_s'] / first:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
