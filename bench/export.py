r"""Edge-export report of a student: ONNX (wave -> embedding, front-end included) on onnxruntime CPU.

  python bench/export.py                           # mn10, a 10-s clip at 32 kHz, batch 1
  python bench/export.py --student mn05 --repeats 50 --threads 1
  python bench/export.py --student eres2net

Prints the parameter count, the ONNX file size, the max |onnxruntime - JAX| on the clip and the median CPU latency
of one clip. Weights are random; the BatchNorm running statistics are set to those of one random clip (a
training-mode pass), so the embedding has a realistic scale and the difference a meaningful one.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax.audio.frontend import log_mel  # noqa: E402
from matpac_jax.distill.export import CLIP_SAMPLES, STUDENT_FRONTEND, export_report  # noqa: E402
from matpac_jax.models.students import ERes2Net, MobileNetV3  # noqa: E402


def make_model(name: str) -> nn.Module:
    """``mnNN`` (MobileNetV3 of width NN / 10: mn10, mn05, ...) or ``eres2net``."""
    if name == "eres2net":
        return ERes2Net()
    if m := re.fullmatch(r"mn(\d\d)", name):
        return MobileNetV3(int(m.group(1)) / 10)
    raise ValueError(f"--student={name!r}: expected mnNN (mn10, mn05, ...) or eres2net")


def calibrated(model: nn.Module, params, mel: jax.Array) -> dict:
    """Variables whose BatchNorm running statistics are the batch statistics of ``mel`` (any student)."""
    stats = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            x = args[0]
            axes = tuple(range(x.ndim - 1))
            stats[context.module.path + ("mean",)] = jnp.mean(x, axes)
            stats[context.module.path + ("var",)] = jnp.var(x, axes)
        return next_fun(*args, **kwargs)

    template = model.init(jax.random.key(0), mel[:1])
    with nn.intercept_methods(record):
        model.apply({"params": params, "batch_stats": template["batch_stats"]}, mel, train=True,
                    mutable=["batch_stats"])  # fmt: skip
    batch_stats = traverse_util.unflatten_dict(stats)
    assert jax.tree.structure(batch_stats) == jax.tree.structure(template["batch_stats"])
    return {"params": params, "batch_stats": batch_stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="mn10", help="mnNN (mn10 = MobileNetV3 width 1.0) or eres2net")
    ap.add_argument("--repeats", type=int, default=20, help="onnxruntime runs timed (median)")
    ap.add_argument("--seconds", type=float, default=CLIP_SAMPLES / STUDENT_FRONTEND.sample_rate)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    ap.add_argument("--out", default="", help="the .onnx file (default: a temporary directory)")
    args = ap.parse_args()

    model = make_model(args.student)
    samples = int(round(args.seconds * STUDENT_FRONTEND.sample_rate))
    wave = 0.1 * jax.random.normal(jax.random.key(1), (2, samples))
    mel = log_mel(wave, STUDENT_FRONTEND)
    variables = calibrated(model, model.init(jax.random.key(0), mel[:1])["params"], mel)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or os.path.join(tmp, f"{args.student}.onnx")
        report = export_report(model, variables, path, batch=args.batch, num_samples=samples, repeats=args.repeats,
                               threads=args.threads)  # fmt: skip
    print(f"student {args.student}: {report['params']:,} parameters, ONNX {report['size_bytes']:,} bytes")
    print(f"input {report['inputs']}, output {report['outputs']}, opset {report['opset']}")
    print(f"max |onnxruntime - JAX| {report['max_abs_diff']:.3g} (max |embedding| {report['max_abs_embedding']:.3g})")
    threads = args.threads or "default"
    print(f"CPU latency ({os.cpu_count()} CPUs, {threads} threads, median of {args.repeats}): "
          f"{report['latency_ms']:.1f} ms per batch of {args.batch} x {report['clip_seconds']:g} s, "
          f"{report['latency_ms_per_clip']:.1f} ms per clip")  # fmt: skip
    print(f"jax2onnx {report['jax2onnx']}, onnxruntime {report['onnxruntime']}, jax {jax.__version__}")
    if args.out:
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
