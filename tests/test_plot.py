"""``python -m matpac_jax.plot``: training curves from a synthetic metrics.jsonl, and its error exits."""

import json
import math
import subprocess
import sys

import pytest
from helpers import ROOT
from matplotlib import image

from matpac_jax.plot import main, plot_metrics, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(step: int) -> dict:
    loss_pred, loss_cls = 2.0 / step**0.5, 5.0 - 0.05 * step
    return {
        "step": step,
        "loss": (loss_pred + loss_cls) / 2,
        "loss_pred": loss_pred,
        "loss_cls": loss_cls,
        "lr": 1e-3 * min(step / 10, 1.0),
        "samples_per_s": 100.0 + step,
        "tokens_per_s": 25_000.0 + 250 * step,
        "grad_norm": 10.0 / step,
        "mcl_temp": 0.1 * 0.99**step,
        "teacher_temp": min(0.04 + 0.001 * step, 0.07),
        "ema_decay": 0.999,
        "data_wait_s": 0.01,
        "step_time_s": 0.5,
        "mfu": 0.4,
    }


def write_run(workdir) -> None:
    """50 steps; a crash after step 32 cut its line short and the resume rewrote steps 30..32 (the later lines win).

    Also a NaN loss at step 35 and an infinite grad_norm at step 50.
    """
    lines = [json.dumps(dict(row(s), loss=123.0) if s in (30, 31) else row(s)) for s in range(1, 32)]
    lines.append('{"step": 32, "loss": 1.0, "lr"')  # malformed
    lines += [json.dumps(dict(row(s), loss=float("nan") if s == 35 else row(s)["loss"])) for s in range(30, 51)]
    lines[-1] = json.dumps(dict(row(50), grad_norm=float("inf")))
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_read_metrics_keeps_the_last_line_per_step_and_counts_malformed_lines(tmp_path):
    write_run(tmp_path)
    rows, skipped = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert skipped == 1
    assert list(rows) == list(range(1, 51))
    assert rows[30]["loss"] == row(30)["loss"] and rows[31]["loss"] == row(31)["loss"]
    assert math.isnan(rows[35]["loss"])


def test_plot_metrics_writes_a_png(tmp_path, capsys):
    write_run(tmp_path)
    path = plot_metrics(str(tmp_path), smooth=5)
    assert path == str(tmp_path / "curves.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    height, width = image.imread(path).shape[:2]
    assert width == 1200  # two 6-inch columns at 100 dpi
    assert 800 <= height <= 2000  # 7 panels: 4 rows
    assert "skipped 1 malformed line(s)" in capsys.readouterr().err


def test_plot_metrics_with_only_the_required_keys(tmp_path):
    keys = ("step", "loss", "loss_pred", "loss_cls", "lr", "samples_per_s")
    lines = [json.dumps({k: v for k, v in row(s).items() if k in keys}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))  # no trailing newline
    out = tmp_path / "plots" / "run.png"
    assert plot_metrics(str(tmp_path), output=str(out)) == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "matpac_jax.plot", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_prints_the_png_path_last(tmp_path):
    write_run(tmp_path)
    out = tmp_path / "out.png"
    r = run_cli(f"--workdir={tmp_path}", f"--output={out}", "--smooth=3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "skipped 1 malformed line(s)" in r.stderr


def test_cli_without_metrics_exits_2_naming_the_file(tmp_path):
    workdir = tmp_path / "missing"
    r = run_cli(f"--workdir={workdir}")
    assert r.returncode == 2
    assert r.stderr.strip() == f"no metrics at {workdir / 'metrics.jsonl'}: run training with --workdir={workdir} first"
    assert r.stdout == ""


@pytest.mark.parametrize("text", ["", "\n", "not json\n"])
def test_empty_or_unreadable_metrics_exit_2(tmp_path, capsys, text):
    (tmp_path / "metrics.jsonl").write_text(text)
    assert main([f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"no metrics in {tmp_path / 'metrics.jsonl'}" in err
    assert f"--workdir={tmp_path}" in err
    assert not (tmp_path / "curves.png").exists()
