r"""Named sweeps of a config file: run them one after another, or print their launch commands, then tabulate.

    python -m matpac_jax.sweep --config=configs/pp.py:demo --sweep=mcl_heads --workdir=/runs/heads
    python -m matpac_jax.sweep --config=configs/pp.py --sweep=large_batch --workdir=/mnt/gcs/sweeps/lb --print
    python -m matpac_jax.sweep --config=configs/pp.py:demo --sweep=mcl_heads --workdir=/runs/heads --table

A config file defines ``SWEEPS = {name: [{'key.path': value, ...}, ...]}``: each entry is one run, the config (with
its variant) plus those overrides (``--config.key.path=value``), in its own workdir ``WORKDIR/<key=value,...>``. Runs
go in sequence (a finished run is resumed, i.e. skipped at once, by the trainer); a failed run is reported and the
sweep goes on. ``--print`` prints the commands instead (to paste into a scheduler: each is an ordinary
``python -m matpac_jax.main`` command). At the end, or with ``--table``, the final metrics of every run (last line of
its ``metrics.jsonl``) are tabulated to the console and ``WORKDIR/sweep.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys

from matpac_jax import fileio

COLUMNS = ("step", "loss", "loss_pred", "loss_cls", "cos_to_teacher", "grad_norm", "samples_per_s")


def load_sweeps(config_path: str) -> dict:
    spec = importlib.util.spec_from_file_location("_sweep_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "SWEEPS", {})


def run_name(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"


def commands(config: str, overrides_list: list[dict], workdir: str) -> list[tuple[str, list[str]]]:
    """(run directory, argv of python -m matpac_jax.main) per run."""
    out = []
    for overrides in overrides_list:
        run_dir = os.path.join(workdir, run_name(overrides))
        argv = [sys.executable, "-m", "matpac_jax.main", f"--config={config}", f"--workdir={run_dir}"]
        argv += [f"--config.{k}={v}" for k, v in overrides.items()]
        out.append((run_dir, argv))
    return out


def final_metrics(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = f.read().splitlines()
    return json.loads(lines[-1]) if lines else None


def table(runs: list[tuple[str, list[str]]], status: dict | None = None) -> str:
    rows = [(os.path.basename(d), final_metrics(d)) for d, _ in runs]
    cols = [c for c in COLUMNS if any(m and c in m for _, m in rows)] or ["step"]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows:
        if m is None:
            note = (status or {}).get(name, "not run")
            lines.append(f"| {name} | " + " | ".join([note] + [""] * (len(cols) - 1)) + " |")
        else:
            cells = [f"{m[c]:.4g}" if isinstance(m.get(c), float) else str(m.get(c, "")) for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m matpac_jax.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="config file[:variant,...] as for matpac_jax.main")
    ap.add_argument("--sweep", required=True, help="a name in the config file's SWEEPS")
    ap.add_argument("--workdir", required=True, help="each run goes to WORKDIR/<overrides>")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the launch commands, run nothing")
    mode.add_argument("--table", action="store_true", help="only tabulate the runs' final metrics")
    args = ap.parse_args(argv)
    path = args.config.partition(":")[0]
    sweeps = load_sweeps(path)
    if args.sweep not in sweeps:
        print(f"error: {path} defines no sweep {args.sweep!r}; it has: {', '.join(sweeps) or 'none'}", file=sys.stderr)
        return 2
    runs = commands(args.config, sweeps[args.sweep], args.workdir)
    if args.print:
        for _, argv in runs:
            print(shlex.join(["python", *argv[1:]]))
        return 0
    status = {}
    if not args.table:
        for i, (run_dir, argv) in enumerate(runs):
            print(f"[{i + 1}/{len(runs)}] {os.path.basename(run_dir)}", flush=True)
            code = subprocess.call(argv)
            if code:
                status[os.path.basename(run_dir)] = f"failed (exit {code})"
                print(f"run {os.path.basename(run_dir)} failed with exit status {code}; going on", flush=True)
    text = table(runs, status)
    print(text)
    os.makedirs(args.workdir, exist_ok=True)
    fileio.atomic_write_text(os.path.join(args.workdir, "sweep.md"), f"# {args.sweep}: {args.config}\n\n{text}\n")
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
