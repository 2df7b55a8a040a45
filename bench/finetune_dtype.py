r"""How far bfloat16 compute moves fine-tuning from EVAR's float32: the same steps from the same weights, batches and
keys in both dtypes (configs/finetune_as.py:VARIANT and :VARIANT,dtype=bfloat16), the loss at every step and the
parameters' relative difference at the end.

  python bench/finetune_dtype.py --variant=demo --steps=20
  python bench/finetune_dtype.py --variant=demo --steps=100 --init-from=/tmp/demo/pretrain  # a pretrained encoder

Through the trainer's program (guard, shardings, donation), on the variant's own data (the demo corpus); the
parameters are stored in float32 in both, only the compute dtype differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax import config_lib, parallel  # noqa: E402
from matpac_jax.tasks import make_task  # noqa: E402
from matpac_jax.train.program import compile_program  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "finetune_as.py")


def run(variant: str, dtype: str, steps: int, init_from: str = "") -> tuple[list[float], dict]:
    """Losses of ``steps`` steps and the final parameters (host float32) of ``variant`` computed in ``dtype``."""
    c = config_lib.load_config_file(CONFIG, "finetune_as.py", f"{variant},dtype={dtype}")
    c.mesh, c.finetune.init_from = {"data": 1}, init_from
    with tempfile.TemporaryDirectory() as workdir:
        task = make_task(c, workdir)
        data = task.make_input()
        mesh = parallel.make_mesh({"data": 1})
        init_fn, step_fn, _ = compile_program(task.build(data), mesh, c)
        state = init_fn(jax.random.key(c.seed))
        losses = []
        for step in range(steps):
            state, metrics = step_fn(state, parallel.global_batch(data.source(step), mesh), jax.random.key(step))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state.params)


def relative_difference(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖a‖ over every parameter."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    diff = sum(float(np.sum((np.asarray(x, np.float64) - y) ** 2)) for x, y in pairs)
    norm = sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(a))
    return float(np.sqrt(diff / norm))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="demo", help="configs/finetune_as.py variant")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--init-from", default="", help="config.finetune.init_from (default: from scratch)")
    args = p.parse_args()
    f32, p32 = run(args.variant, "float32", args.steps, args.init_from)
    b16, p16 = run(args.variant, "bfloat16", args.steps, args.init_from)
    _, p0 = run(args.variant, "float32", 0, args.init_from)
    print("| step | loss float32 | loss bfloat16 | difference |\n|---|---|---|---|")
    for i, (a, b) in enumerate(zip(f32, b16, strict=True)):
        print(f"| {i + 1} | {a:.5f} | {b:.5f} | {b - a:+.2e} |")
    moved = relative_difference(p32, p0)
    apart = relative_difference(p32, p16)
    print(
        f"parameters after {args.steps} steps: ‖bf16 − f32‖ / ‖f32‖ = {apart:.2e}; ‖f32 − init‖ / ‖f32‖ = {moved:.2e}"
    )
    print(f"mean |loss difference| {np.mean(np.abs(np.subtract(b16, f32))):.2e}")


if __name__ == "__main__":
    main()
