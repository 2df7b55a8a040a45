r"""Where the training step's time goes: a ``jax.profiler`` trace of a few steady-state steps reduced to a table.

  python bench/profile_step.py --config=configs/pp.py --batch=256             # the recipe step on an accelerator
  python bench/profile_step.py --config=configs/pp.py --batch=256 --set=model.attn_impl=xla
  python bench/profile_step.py --config=configs/finetune_as.py --batch=64     # the fine-tuning step
  python bench/profile_step.py --config=configs/ssondo.py --batch=120         # the distillation step (mn10)
  python bench/profile_step.py --config=configs/pp.py:smoke --steps=5         # CPU (tested)

The step is the trainer's program (``bench/train_step.py``'s ``prepare_step``: the guard, shardings, donation),
compiled once; each profiled step gets a freshly transferred random batch, as the trainer's prefetch gives it. The
trace (``create_perfetto_trace=True``, kept under ``--trace-dir``, readable in Perfetto / TensorBoard) is reduced by
``matpac_jax.profile_summary``: device time per category (matmuls / convolutions, cuDNN fused attention, elementwise
and reduction fusions, gathers / scatters, copies / transposes, the optimizer + EMA update, the non-finite guard,
the log-mel front-end, host <-> device transfers, idle gaps between kernels), which adds up to the traced wall
time of the steps, and the 20 costliest kernels with their share. The step time measured by the host clock over
the same steps is printed beside it. ``--out`` writes the table and the figures (JSON) to a folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from matpac_jax.profile_summary import CPU_TRACE_FLAG

# XLA's CPU runtime traces its thunks only with this flag, which must be set before jax starts (harmless elsewhere).
if CPU_TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_TRACE_FLAG}".strip()

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_step import apply_overrides, prepare_step  # noqa: E402

from matpac_jax import config_lib  # noqa: E402
from matpac_jax.flops import peak_flops  # noqa: E402
from matpac_jax.profile_summary import WINDOW, format_summary, read_trace, summarize  # noqa: E402


def profile(config, steps: int, warmup: int, trace_dir: str) -> dict:
    """Trace ``steps`` steps after ``warmup`` untraced ones; -> the summary and the host-clock step time."""
    p = prepare_step(config)
    rng, state = jax.random.key(0), p.state
    for _ in range(warmup):
        state, m = p.compiled(state, p.batch(), rng)
    jax.block_until_ready((state, m))
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
        with jax.profiler.TraceAnnotation(WINDOW):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, m = p.compiled(state, p.batch(), rng)
            jax.block_until_ready((state, m))
            host_step_s = (time.perf_counter() - t0) / steps
    finally:
        jax.profiler.stop_trace()
    summary = summarize(read_trace(trace_dir), p.compiled.as_text(), steps)
    out = {"summary": summary, "host_step_s": host_step_s, "flops": p.flops, "compile_s": p.compile_s}
    peak = peak_flops()
    if peak:
        out["mfu"] = p.flops / host_step_s / peak
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pp.py:smoke")
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    ap.add_argument("--steps", type=int, default=5, help="steps traced")
    ap.add_argument("--warmup", type=int, default=2, help="steps run before the trace starts")
    ap.add_argument("--set", default="", help="overrides key=value[,key=value]")
    ap.add_argument("--trace-dir", default=None, help="where the trace is written (default: a temporary folder)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", default=None, help="a folder for profile.md and profile.json")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be at least 1")
    path, _, arg = args.config.partition(":")
    config = config_lib.load_config_file(path, os.path.basename(path), arg or None)
    if args.batch:
        config.data.batch_size = args.batch
    apply_overrides(config, args.set)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    r = profile(config, args.steps, args.warmup, trace_dir)
    s = r["summary"]
    b = config.data.batch_size
    head = (
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}  config: "
        f"{args.config} {args.set}  batch {b}\n"
        f"host clock: {r['host_step_s'] * 1e3:.3f} ms/step ({b / r['host_step_s']:,.1f} samples/s"
        + (f", MFU {r['mfu']:.1%}" if "mfu" in r else "")
        + f"); traced: {s.step_s * 1e3:.3f} ms/step; trace in {trace_dir}"
    )
    table = format_summary(s, args.top)
    print(head, table, sep="\n\n", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.md"), "w") as f:
            f.write(head + "\n\n" + table + "\n")
        ms = {k: v / s.steps * 1e3 for k, v in s.seconds.items()}
        figures = dict(host_step_s=r["host_step_s"], traced_step_s=s.step_s, batch=b, ms_per_step=ms)
        figures |= dict(device_events=s.device_events, unknown_ops=sorted(s.unknown_ops))
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
