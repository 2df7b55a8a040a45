r"""Student embedding over many clip lengths: the set-up for timing ``python -m matpac_jax.probe`` on a recipe mn10
(configs/ssondo.py, initial weights) over clips of 35 ms to 12 s at mixed sample rates (BENCHMARKS.md, "Student
embedding over many clip lengths").

    python bench/student_lengths.py /tmp/lengths --clips=200
    JAX_LOG_COMPILES=1 /usr/bin/time -v python -m matpac_jax.probe --checkpoint=/tmp/lengths/student \
        --dataset=folder --root=/tmp/lengths/set --output=/tmp/lengths/out --seeds=1 2> log
    grep -c "Compiling _embed_program" log     # programs compiled for the student ("<lambda>" before buckets)

Clip lengths are log-uniform between 35 ms and 12 s, each at one of 22.05, 32, 44.1 and 48 kHz (a few hundred
distinct lengths after resampling to the student's 32 kHz), noise bursts with a decay, two labels.
"""

from __future__ import annotations

import argparse
import os
import types

import numpy as np
import soundfile as sf

from matpac_jax import config_lib
from matpac_jax.models.student import Student, save_student

RATES = (22_050, 32_000, 44_100, 48_000)


def write_set(root: str, clips: int, seed: int = 0) -> None:
    """``clips`` decaying noise bursts of 35 ms (one 32-ms window at 32 kHz: the probe refuses shorter files) to
    12 s and ``labels.csv`` (a ``folder`` dataset, splits by index)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(clips):
        rate = RATES[i % len(RATES)]
        seconds = float(np.exp(rng.uniform(np.log(0.035), np.log(12.0))))
        n = max(1, int(seconds * rate))
        wave = rng.standard_normal(n) * np.exp(-np.arange(n) / (0.2 * rate)) * (0.5 if i % 2 else 0.1)
        sf.write(os.path.join(root, f"{i}.wav"), wave.astype(np.float32), rate, subtype="FLOAT")
        rows.append(f"{i}.wav,{'loud' if i % 2 else 'soft'},{('train', 'train', 'valid', 'test')[i % 4]}")
    with open(os.path.join(root, "labels.csv"), "w") as f:
        f.write("path,labels,split\n" + "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--clips", type=int, default=200)
    args = ap.parse_args()
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "ssondo.py")
    config = config_lib.load_config_file(here, "ssondo.py", None)
    spec = types.SimpleNamespace(student=config.student, audio=config.audio)
    variables = Student.initial_variables(spec, seed=0)
    state = types.SimpleNamespace(step=0, params={"backbone": variables["params"]},
                                  batch_stats={"backbone": variables["batch_stats"]})  # fmt: skip
    print(save_student(os.path.join(args.workdir, "student"), config, state))
    write_set(os.path.join(args.workdir, "set"), args.clips)


if __name__ == "__main__":
    main()
