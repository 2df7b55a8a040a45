"""The entry point, as a user runs it: config strings, overrides, early config errors, the smoke run."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, load_config

from matpac_jax import config_lib


def main(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, "-m", "matpac_jax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_unknown_config_key_fails_before_compute_and_names_the_key(tmp_path):
    r = main(
        "--config=configs/pp.py:smoke",
        f"--workdir={tmp_path}",
        "--config.optim.learning_rate=1e-3",
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]  # a config error: one line naming the key and the keys there are
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --config.optim.learning_rate=1e-3: unknown config key ")
    assert "keys of config.optim: " in lines[0] and " lr," in lines[0]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_variant_and_argument_fail_with_the_name():
    with pytest.raises(ValueError, match="unknown variant 'tiny'"):
        load_config("pp.py", "tiny")
    with pytest.raises(ValueError, match="unknown config argument 'heads'"):
        load_config("pp.py", "smoke,heads=3")


def test_config_string_sets_batch_heads_and_steps():
    c = load_config("pp.py", "batch=8192,mcl_heads=3,steps=1000")
    assert (c.data.batch_size, c.model.mcl_heads, c.total_steps) == (8192, 3, 1000)
    assert load_config("matpac.py", None).model.mcl_heads == 1


def test_paper_recipe_numbers():
    c = load_config("pp.py", None)
    assert (c.seed, c.total_steps, c.data.batch_size, c.optim.warmup_steps) == (1337, 294_816, 2048, 19_654)
    assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay, c.optim.clip_norm) == (
        3e-4,
        0.9,
        0.95,
        1e-6,
        0.05,
        3.0,
    )
    assert (c.model.encoder.dim, c.model.encoder.depth, c.model.encoder.heads, c.model.mcl_heads) == (
        768,
        12,
        12,
        5,
    )
    assert (c.audio.crop_frames, c.objective.mask_ratio, c.objective.teacher_temp_warmup_steps) == (
        608,
        0.7,
        9_827,
    )


def test_parse_arg_coerces_types():
    a = config_lib.parse_arg("demo,batch=64,flag", variant="", batch=0, flag=False)
    assert (a.variant, a.batch, a.flag) == ("demo", 64, True)


def test_smoke_run_trains_checkpoints_and_ends_with_the_probe_line(tmp_path):
    r = main("--config=configs/pp.py:smoke", f"--workdir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("probe: learned=") and " init=" in lines[-1]
    learned, init = (float(x.split("=")[1]) for x in lines[-1].split()[1:])
    assert 0 <= learned <= 1 and 0 <= init <= 1
    assert any(line.startswith("step ") for line in lines)
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step ") and "memory" not in line)
    memory = [line for line in lines[:first_step] if line.startswith("step memory per device (compiled): ")]
    assert len(memory) == 1 and float(memory[0].split()[5]) > 0  # GiB, before the first step
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["4", "6", "8"]  # every 2 steps, the last 3 kept
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == load_config().total_steps


def test_missing_training_data_fails_before_any_compilation(tmp_path):
    from matpac_jax.tasks import train_and_evaluate

    config = load_config("pp.py", None)
    config.data.train = str(tmp_path / "nothing-*.arrayrecord")
    with pytest.raises(ValueError, match="config.data.train: no files match"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def write_demo_shards(directory, num_clips=24, num_shards=2):
    from matpac_jax.data.demo import make_demo_corpus
    from matpac_jax.data.records import ClipRecord, encode_record, shard_name, write_shard

    corpus = make_demo_corpus(num_clips, seconds=2.0, seed=3)
    for i in range(num_shards):
        clips = [ClipRecord(f"clip{j}", corpus["waves"][j]) for j in range(i, num_clips, num_shards)]
        write_shard(shard_name(str(directory), i, num_shards), (encode_record(c) for c in clips))


def records_config(data_dir):
    config = load_config()
    config.data.source, config.data.workers = "records", 0
    config.data.train = str(data_dir / "*.arrayrecord")
    config.probe.enabled = False
    config.total_steps, config.checkpoint.every = 4, 2
    return config


def test_records_run_resumes_with_the_same_data_order(tmp_path):
    """Shards -> grain -> steps; a run resumed from step 2 ends bit-identical to an uninterrupted one."""
    import jax

    from matpac_jax import parallel
    from matpac_jax.checkpoint import Checkpointer
    from matpac_jax.matpac.task import build
    from matpac_jax.tasks import train_and_evaluate

    write_demo_shards(tmp_path / "data")
    config = records_config(tmp_path / "data")
    full = train_and_evaluate(config, str(tmp_path / "a"))
    assert full["final_metrics"]["step"] == 4 and np.isfinite(full["final_metrics"]["loss"])
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints"), key=int) == ["2", "4"]

    train_and_evaluate(config, str(tmp_path / "b"))
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")  # as if killed after the step-2 checkpoint
    resumed = train_and_evaluate(config, str(tmp_path / "b"))
    assert resumed["final_metrics"]["loss"] == full["final_metrics"]["loss"]

    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    abstract = build(config, mesh)[3]
    a = Checkpointer(str(tmp_path / "a")).restore(abstract)
    b = Checkpointer(str(tmp_path / "b")).restore(abstract)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
