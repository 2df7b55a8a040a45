r"""Audit the pretraining step's program for the costs that mixed precision and masking can hide.

  python bench/step_audit.py --config=configs/pp.py:demo          # the demo model, bf16 compute
  python bench/step_audit.py --config=configs/pp.py --batch=256   # ViT-B recipe (traced only: any machine)

The step is traced (``jax.make_jaxpr``: nothing is compiled or run, so ViT-B can be audited on a laptop) and every
equation, inside jit, grad, remat and scan bodies (times their length), is sorted into:

* matmul FLOPs by operand dtype: the share that runs in bfloat16 is what the tensor cores see;
* float32 upcasts (``convert_element_type`` from a 16-bit float) of at least ``--min-elements`` elements, by source
  line: each is an activation-sized float32 tensor unless XLA fuses it into its consumer;
* gathers and scatters (the masked-token bookkeeping), by source line, with the elements they move.

Run it after a change to the model or the step; the figures are recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax import config_lib, parallel  # noqa: E402
from matpac_jax.audio.frontend import num_samples_for_frames  # noqa: E402
from matpac_jax.flops import _as_jaxpr, _sub_jaxprs, _Walker  # noqa: E402
from matpac_jax.train import pretrain  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOW = (jnp.bfloat16, jnp.float16)
_MOVES = ("gather", "scatter", "scatter-add", "scatter_add", "dynamic_slice", "dynamic_update_slice")


def where(eqn) -> str:
    """'path:line (function)' of the user code that emitted the equation, relative to the repository."""
    try:  # private API: the audit still counts without it
        from jax._src import source_info_util

        frame = source_info_util.user_frame(eqn.source_info.traceback)
        return f"{frame.file_name.replace(_ROOT + os.sep, '')}:{frame.start_line} ({frame.function_name})"
    except Exception:
        return "(no source)"


def size(aval) -> int:
    return int(np.prod(aval.shape)) if hasattr(aval, "shape") else 0


def audit(jaxpr, batch: int, min_elements: int) -> dict:
    """Counters over the whole program. Upcasts whose leading axis is the batch are activations; the others are
    weight-sized (the float32 gradient of a bfloat16 use of a float32 parameter) and only totalled."""
    flops = collections.Counter()  # operand dtypes -> matmul FLOPs
    slow_flops = collections.Counter()  # source -> matmul FLOPs not in 16-bit
    upcasts = collections.Counter()  # (source, shape) -> float32 activation elements produced
    weight_upcasts = collections.Counter()  # float32 weight-gradient elements
    moves = collections.Counter()  # (primitive, source, shape) -> elements moved

    def walk(j, mult: int) -> None:
        for eqn in j.eqns:
            name = eqn.primitive.name
            ins, outs = [v.aval for v in eqn.invars], [v.aval for v in eqn.outvars]
            if name in ("dot_general", "conv_general_dilated"):
                f = mult * _Walker().eqn(eqn)
                flops[f"{ins[0].dtype} x {ins[1].dtype}"] += f
                if ins[0].dtype not in _LOW or ins[1].dtype not in _LOW:
                    slow_flops[where(eqn)] += f
            elif name == "convert_element_type":
                if ins[0].dtype in _LOW and outs[0].dtype == jnp.float32 and size(outs[0]) >= min_elements:
                    if outs[0].shape[:1] == (batch,) or batch in outs[0].shape[1:2]:
                        upcasts[(where(eqn), outs[0].shape)] += mult * size(outs[0])
                    else:
                        weight_upcasts["all"] += mult * size(outs[0])
            elif name in _MOVES:
                moves[(name, where(eqn), outs[0].shape)] += mult * size(outs[0])
            inner = mult * int(eqn.params.get("length", 1)) if name == "scan" else mult
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    walk(sub, inner)

    walk(_as_jaxpr(jaxpr), 1)
    return {"flops": flops, "slow_flops": slow_flops, "upcasts": upcasts, "weight_upcasts": weight_upcasts["all"],
            "moves": moves}  # fmt: skip


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
