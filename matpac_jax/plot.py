"""Render the training curves of a run's ``metrics.jsonl`` to a PNG.

    python -m matpac_jax.plot --workdir=DIR [--output=PNG] [--smooth=N]

Reads ``DIR/metrics.jsonl`` (one JSON object per training step, as written by the trainer), keeps the last line for
each step (a resumed run appends repeated steps), skips malformed lines (counted on stderr) and non-finite values
(per series), and draws one panel per group of metrics that is present: losses, learning rate, temperatures,
throughput, gradient norm, step timing, MFU. ``--smooth=N`` applies an N-step trailing moving average to the loss
curves only. Writes ``DIR/curves.png`` unless ``--output`` is given and prints the PNG path as its last stdout line.
Exits with status 2 when there are no metrics to plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

import numpy as np

from matpac_jax import fileio

LOSS_KEYS = ("loss", "loss_pred", "loss_cls")

Rows = dict[int, dict]
Series = tuple[np.ndarray, np.ndarray]


class NoMetricsError(Exception):
    """There is nothing to plot: the message says which file and what to do."""


def read_metrics(path: str) -> tuple[Rows, int]:
    """Returns ``{step: row}`` keeping the last line of each step, and the number of malformed lines skipped."""
    rows: Rows = {}
    skipped = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # accepts NaN / Infinity as Python's json writes them
            except json.JSONDecodeError:
                skipped += 1
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                skipped += 1
                continue
            rows[step] = row
    return dict(sorted(rows.items())), skipped


def series(rows: Rows, key: str) -> Series:
    """The finite numeric values of ``key`` and their steps."""
    points = [
        (step, float(v))
        for step, row in rows.items()
        if isinstance(v := row.get(key), int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]
    steps, values = zip(*points, strict=True) if points else ((), ())
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def moving_average(values: np.ndarray, n: int) -> np.ndarray:
    """Trailing mean over up to ``n`` values (the first points average over what is there)."""
    if n <= 1 or values.size == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - n, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _draw_lines(ax, data: dict[str, Series], smooth: int = 1) -> None:
    for i, (key, (x, y)) in enumerate(data.items()):
        color = f"C{i}"
        if smooth > 1:
            ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(x, moving_average(y, smooth), color=color, label=f"{key} (avg {smooth})")
        else:
            ax.plot(x, y, color=color, label=key)
    ax.legend(fontsize="small")


def _panels(rows: Rows, smooth: int) -> list[tuple[str, Callable]]:
    """``(title, draw(ax))`` for each panel that has at least one finite value to show."""
    keys = sorted({k for row in rows.values() for k in row})

    def present(names) -> dict[str, Series]:
        return {k: s for k in names if k in keys and (s := series(rows, k))[0].size}

    panels: list[tuple[str, Callable]] = []

    if losses := present(LOSS_KEYS):

        def draw_losses(ax):
            _draw_lines(ax, losses, smooth)
            if all(np.all(y > 0) for _, y in losses.values()):
                ax.set_yscale("log")

        panels.append(("losses", draw_losses))
    if lr := present(["lr"]):
        panels.append(("learning rate", lambda ax: _draw_lines(ax, lr)))
    if temps := present([k for k in keys if "temp" in k]):
        panels.append(("temperatures", lambda ax: _draw_lines(ax, temps)))
    samples, tokens = present(["samples_per_s"]), present(["tokens_per_s"])
    if samples or tokens:

        def draw_throughput(ax):
            if not (samples and tokens):
                _draw_lines(ax, samples or tokens)
                return
            _draw_lines(ax, samples)
            ax.set_ylabel("samples/s")
            twin = ax.twinx()
            twin.plot(*tokens["tokens_per_s"], color="C1", label="tokens_per_s")
            twin.set_ylabel("tokens/s")
            lines = ax.get_lines() + twin.get_lines()
            ax.legend(lines, [ln.get_label() for ln in lines], fontsize="small")

        panels.append(("throughput", draw_throughput))
    if grad := present(["grad_norm"]):
        panels.append(("gradient norm", lambda ax: _draw_lines(ax, grad)))
    if timing := present(["data_wait_s", "step_time_s"]):
        panels.append(("step timing (s)", lambda ax: _draw_lines(ax, timing)))
    if mfu := present(["mfu"]):
        panels.append(("model FLOPs utilisation", lambda ax: _draw_lines(ax, mfu)))
    return panels


def _render(rows: Rows, title: str, output: str, smooth: int) -> None:
    from matplotlib.figure import Figure  # renders through Agg: no display, no global pyplot state

    panels = _panels(rows, smooth)
    n = max(len(panels), 1)
    ncols = 2 if n > 1 else 1
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6 * ncols, 3.2 * nrows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
    for ax, (name, draw) in zip(axes, panels, strict=False):
        ax.set_title(name, fontsize="medium")
        ax.grid(True, alpha=0.3)
        draw(ax)
    if not panels:
        axes[0].text(0.5, 0.5, "no plottable metrics", ha="center", va="center", transform=axes[0].transAxes)
    for ax in axes[n:]:
        ax.remove()
    for ax in axes[n - ncols : n]:  # the lowest panel of each column shows the step axis
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fileio.atomic_write(output, lambda f: fig.savefig(f, format="png"))  # a killed plot leaves the old one


def plot_metrics(workdir: str, output: str | None = None, smooth: int = 1) -> str:
    """Plots ``workdir/metrics.jsonl`` to ``output`` (default ``workdir/curves.png``) and returns its path.

    Raises ``NoMetricsError`` when the workdir or the file is missing, or the file has no valid line.
    """
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):  # also covers a missing workdir
        raise NoMetricsError(f"no metrics at {path}: run training with --workdir={workdir} first")
    rows, skipped = read_metrics(path)
    if skipped:
        print(f"skipped {skipped} malformed line(s) in {path}", file=sys.stderr)
    if not rows:
        raise NoMetricsError(f"no metrics in {path} (empty): run training with --workdir={workdir} first")
    output = output or os.path.join(workdir, "curves.png")
    if parent := os.path.dirname(output):
        os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.abspath(workdir))
    _render(rows, f"{name} — step {max(rows)}", output, smooth)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matpac_jax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training run directory holding metrics.jsonl")
    parser.add_argument("--output", default=None, help="PNG to write (default: WORKDIR/curves.png)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window for the losses (1 = none)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    try:
        path = plot_metrics(args.workdir, args.output, args.smooth)
    except NoMetricsError as e:
        print(e, file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
