r"""How long a checkpoint save blocks the training loop, asynchronous vs synchronous, for a config's full train state.

  python bench/checkpoint.py                           # ViT-B MATPAC++ (configs/pp.py), to a temporary directory
  python bench/checkpoint.py --config=configs/pp.py:smoke --dir=/mnt/disk/tmp --repeats=3

Initialises the train state (student, EMA teacher, center, AdamW moments) on one device, then saves it with the
trainer's ``Checkpointer`` ``--repeats`` times each way and prints: the state's size, the time ``save()`` blocks
the caller (what a training step waits), and the time until the checkpoint is complete on disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax import config_lib, parallel  # noqa: E402
from matpac_jax.checkpoint import Checkpointer  # noqa: E402
from matpac_jax.matpac import task as pretrain  # noqa: E402


def measure(state, config, directory: str, async_save: bool, repeats: int) -> tuple[list[float], list[float]]:
    blocked, total = [], []
    ckpt = Checkpointer(directory, keep=2, async_save=async_save)
    for i in range(repeats):
        t0 = time.perf_counter()
        ckpt.save(i + 1, state, config, force=True)
        blocked.append(time.perf_counter() - t0)
        ckpt.wait()
        total.append(time.perf_counter() - t0)
    ckpt.close()
    return blocked, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pp.py")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    path, _, arg = args.config.partition(":")
    config = config_lib.load_config_file(path, os.path.basename(path), arg or None)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    _, init_fn, _, _ = pretrain.build(config, mesh)
    t0 = time.perf_counter()
    state = jax.block_until_ready(init_fn(jax.random.key(0)))
    init_s = time.perf_counter() - t0
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(
        f"device: {jax.devices()[0].device_kind}  config: {args.config}  state {nbytes / 2**30:.2f} GiB in "
        f"{len(jax.tree.leaves(state))} arrays (initialised in {init_s:.1f} s)"
    )
    root = tempfile.mkdtemp(prefix="matpac_ckpt_bench_", dir=args.dir)
    try:
        for async_save in (True, False):
            blocked, total = measure(state, config, os.path.join(root, str(async_save)), async_save, args.repeats)
            name = "async" if async_save else "sync "
            each = ", ".join(f"{b:.2f}" for b in blocked)
            print(
                f"{name}: save() blocks {min(blocked):.2f} s (min of {args.repeats}: {each}), "
                f"complete after {min(total):.2f} s ({nbytes / 2**20 / min(total):,.0f} MiB/s)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
