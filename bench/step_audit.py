r"""Audit the pretraining step's program for the costs that mixed precision and masking can hide.

  python bench/step_audit.py --config=configs/pp.py:demo          # the demo model, bf16 compute
  python bench/step_audit.py --config=configs/pp.py --batch=256   # ViT-B recipe (traced only: any machine)

The step is traced (``jax.make_jaxpr``: nothing is compiled or run, so ViT-B can be audited on a laptop) and
``matpac_jax.program_audit`` sorts its equations: matmul FLOPs by dtype, float32 activation upcasts and gathers /
scatters, each by source line.

Run it after a change to the model or the step; the figures are recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax import config_lib, parallel  # noqa: E402
from matpac_jax.audio.frontend import num_samples_for_frames  # noqa: E402
from matpac_jax.matpac import task as pretrain  # noqa: E402
from matpac_jax.program_audit import audit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pp.py:demo")
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    ap.add_argument("--min-elements", type=int, default=0, help="smallest upcast listed (default: one [B, N, D])")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    path, _, arg = args.config.partition(":")
    config = config_lib.load_config_file(path, os.path.basename(path), arg or None)
    if args.batch:
        config.data.batch_size = args.batch
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    _, _, train_step, abstract = pretrain.build(config, mesh)
    b = config.data.batch_size
    n = num_samples_for_frames(config.audio.crop_frames, pretrain.frontend_config(config))
    batch = {"audio": jax.ShapeDtypeStruct((b, n), jnp.float32)}
    jaxpr = jax.make_jaxpr(train_step)(abstract, batch, jax.random.key(0))
    tokens = (config.audio.n_mels // config.model.patch) * (config.audio.crop_frames // config.model.patch)
    min_elements = args.min_elements or b * tokens * config.model.encoder.dim
    r = audit(jaxpr, b, min_elements)

    total = sum(r["flops"].values())
    print(f"config {args.config}  batch {b}  compute dtype {config.model.dtype}  tokens {tokens}")
    print(f"\nmatmul FLOPs per step: {total / 1e12:.3f} TFLOP")
    for k, v in r["flops"].most_common():
        print(f"  {k:<22} {v / total:7.2%}")
    print("  not in 16-bit, by source:")
    for k, v in r["slow_flops"].most_common(args.top):
        print(f"    {v / total:7.2%}  {k}")
    up = sum(r["upcasts"].values())
    print(f"\nfloat32 upcasts of activations >= {min_elements:,} elements: {up:,} elements "
          f"({up * 4 / 2**30:.3f} GiB if all were stored); weight-sized: {r['weight_upcasts']:,}")  # fmt: skip
    for (src, shape), v in r["upcasts"].most_common(args.top):
        print(f"  {v:>14,}  {str(shape):<22} {src}")
    mv = sum(r["moves"].values())
    print(f"\ngathers / scatters: {mv:,} elements moved ({mv / b:,.0f} per sample)")
    for (prim, src, shape), v in r["moves"].most_common(args.top):
        print(f"  {v:>14,}  {prim:<14} {str(shape):<22} {src}")


if __name__ == "__main__":
    main()
