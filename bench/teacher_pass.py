r"""Clips/s of the S-SONDO teacher pass against a naive per-clip loop over the same clips, in one run.

  python bench/teacher_pass.py                       # ViT-B (random weights), 64 clips of 10 s
  python bench/teacher_pass.py --config=configs/pp.py:smoke --clips=256

The batched pass embeds ``--batch`` clips per call (their 608-frame chunks split over every local device); the
naive loop calls ``Encoder.embed`` once per clip. Both use the same jitted encoder; the first call of each (compile) is
excluded. Prints clips/s of both and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matpac_jax import config_lib  # noqa: E402
from matpac_jax.inference import Encoder, EncoderSpec  # noqa: E402
from matpac_jax.matpac.model import MatpacModel  # noqa: E402


def batched_rate(enc, waves: np.ndarray, batch: int, repeats: int = 1) -> float:
    """Clips/s of ``enc.embed`` over ``repeats`` passes of ``waves`` [N, samples] in calls of ``batch`` clips. One call
    on the first ``batch`` clips runs first, untimed: it compiles the batched shapes, which a long pass pays once.
    Also the forward-only reference of bench/end_to_end.py, for the share of it the real pass reaches."""
    enc.embed(waves[:batch])
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(waves), batch):
            enc.embed(waves[i : i + batch])
    return repeats * len(waves) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pp.py")
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    path, _, arg = args.config.partition(":")
    config = config_lib.load_config_file(path, os.path.basename(path), arg or None)
    student = MatpacModel.from_config(config).init(jax.random.key(0))[0]
    enc = Encoder(EncoderSpec.from_config(config), {k: student[k] for k in ("tokenizer", "encoder")})
    n = int(args.seconds * 16_000)
    waves = (0.1 * np.random.default_rng(0).standard_normal((args.clips, n))).astype(np.float32)
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
    print(f"device: {device}  config {args.config}  {args.clips} clips of {args.seconds:g} s, batch {args.batch}")

    batched = batched_rate(enc, waves, args.batch)

    enc.embed(waves[:1])  # compile the one-clip shapes
    t0 = time.perf_counter()
    for w in waves:
        enc.embed(w)
    naive = args.clips / (time.perf_counter() - t0)
    ratio = batched / naive
    print(f"batched pass: {batched:,.1f} clips/s   naive per-clip loop: {naive:,.1f} clips/s   ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
