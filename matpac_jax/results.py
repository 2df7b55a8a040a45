r"""Collect probe results of several runs into the published table layout (SPEC §7).

    python -m matpac_jax.results results/pp results/matpac [--output=table.md]

Each argument is a folder of ``<task>.json`` files written by ``python -m matpac_jax.probe`` (the folder name is the
row name) or one such file. Columns: OpenMIC, NSynth, GTZAN, MTT, FSD50K, ESC-50, US8K (scores × 100, mean ± 95 % CI),
then the average over the tasks the row has (marked with * when some are missing). The published MATPAC++ row is
printed first for reference.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from matpac_jax import fileio

COLUMNS = [
    ("openmic", "OpenMIC"),
    ("nsynth", "NSynth"),
    ("gtzan", "GTZAN"),
    ("mtt", "MTT"),
    ("fsd50k", "FSD50K"),
    ("esc50", "ESC-50"),
    ("us8k", "US8K"),
]
PUBLISHED = {"openmic": 85.6, "nsynth": 76.8, "gtzan": 87.6, "mtt": 40.8, "fsd50k": 56.1, "esc50": 93.1, "us8k": 89.7}


def load_run(path: str) -> tuple[str, dict[str, dict]]:
    files = sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
    name = os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path)))
    out = {}
    for f in files:
        with open(f) as fh:
            r = json.load(fh)
        if "task" in r and "mean" in r:
            out[r["task"]] = r
    if not out:
        raise ValueError(f"{path}: no probe results (<task>.json from python -m matpac_jax.probe)")
    return name, out


def table(runs: list[tuple[str, dict[str, dict]]]) -> str:
    head = (
        "| model | " + " | ".join(c for _, c in COLUMNS) + " | average |\n|---" * 1 + "|---" * (len(COLUMNS) + 1) + "|"
    )
    lines = [head]
    pub = " | ".join(f"{PUBLISHED[k]:.1f}" for k, _ in COLUMNS)
    lines.append(f"| MATPAC++ (published) | {pub} | {sum(PUBLISHED.values()) / len(PUBLISHED):.1f} |")
    for name, results in runs:
        cells, scores = [], []
        for key, _ in COLUMNS:
            r = results.get(key)
            if r is None:
                cells.append("–")
            else:
                cells.append(f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}")
                scores.append(100 * r["mean"])
        extra = [k for k in results if k not in dict(COLUMNS)]
        star = "*" if len(scores) < len(COLUMNS) else ""
        avg = f"{sum(scores) / len(scores):.1f}{star}" if scores else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
        for k in extra:
            r = results[k]
            lines.append(f"| {name} · {k} ({r['metric']}) | {100 * r['mean']:.1f} ± {100 * r['ci95']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m matpac_jax.results", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="folders of <task>.json (one per model) or single files")
    ap.add_argument("--output", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    try:
        text = table([load_run(p) for p in args.runs])
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.output:
        fileio.atomic_write_text(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
