"""Checkpoints in-process: restore onto other meshes, atomicity, retention, data-state errors, the non-finite guard,
observability files and the early config errors."""

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config, smoke_config

from matpac_jax import parallel, tasks
from matpac_jax.checkpoint import Checkpointer
from matpac_jax.config_lib import ConfigError
from matpac_jax.matpac import task as pretrain
from matpac_jax.train import loop
from matpac_jax.train.metrics_log import TIMING_KEYS, NonFiniteError


def _state_on(mesh_config, devices, config):
    mesh = parallel.make_mesh(mesh_config, devices)
    _, init_fn, step_fn, abstract = pretrain.build(config, mesh)
    return mesh, init_fn, step_fn, abstract


def _leaves_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_other_meshes_and_device_counts(tmp_path):
    config = load_config()
    devices = jax.devices()[:8]
    mesh, init_fn, step_fn, _ = _state_on({"data": 8}, devices, config)
    state = init_fn(jax.random.key(0))
    audio = np.random.default_rng(0).normal(0, 0.1, (8, pretrain.crop_samples(config))).astype(np.float32)
    state, _ = step_fn(state, parallel.global_batch({"audio": audio}, mesh), jax.random.key(1))
    saved = jax.device_get(state)
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, state, config)
    ckpt.close()

    for mesh_config, devs in (({"data": 4, "fsdp": 2}, devices), ({"data": 1}, devices[:1])):
        _, _, _, abstract = _state_on(mesh_config, devs, config)
        restored = Checkpointer(str(tmp_path)).restore(abstract)
        _leaves_equal(saved, restored)
        for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True):
            assert leaf.sharding == target.sharding  # laid out for the new mesh, not the saved one


def test_a_crash_mid_save_leaves_the_previous_checkpoint_usable(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(4, {"x": jnp.arange(3.0)}, load_config())
    ckpt.close()
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "4", root / "6.orbax-checkpoint-tmp-1795750000")  # an unfinished save of step 6
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 4
    restored = ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
    np.testing.assert_array_equal(restored["x"], [0.0, 1.0, 2.0])
    ckpt.close()
    assert sorted(os.listdir(root)) == ["4"]  # the leftover is removed


def test_keep_last_n_plus_every_period(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2, keep_period=4)
    for step in range(1, 11):
        ckpt.save(step, {"x": jnp.full(2, float(step))}, load_config())
    ckpt.close()
    assert Checkpointer(str(tmp_path)).all_steps() == [4, 8, 9, 10]


def test_missing_data_state_names_reset_data(tmp_path):
    from test_main import records_config, write_demo_shards

    ckpt = Checkpointer(str(tmp_path / "run"))
    ckpt.save(2, {"x": jnp.zeros(2)}, load_config())  # no data item: as if saved by another process count
    ckpt.close()
    write_demo_shards(tmp_path / "data")
    config = records_config(tmp_path / "data")
    it = iter(pretrain.make_input(config)[0])
    with pytest.raises(ValueError, match="reset_data=True"):
        Checkpointer(str(tmp_path / "run")).restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)}, data_iter=it)


# --- The non-finite guard.


def test_step_keeps_the_state_on_a_nan_batch():
    config = load_config()
    mesh, init_fn, step_fn, _ = _state_on({"data": 1}, jax.devices()[:1], config)
    state = init_fn(jax.random.key(0))
    before = jax.device_get(state)
    audio = np.zeros((8, pretrain.crop_samples(config)), np.float32)
    audio[3, 100] = np.nan
    after, m = step_fn(state, parallel.global_batch({"audio": audio}, mesh), jax.random.key(1))
    assert float(m["nonfinite"]) == 1.0 and int(m["nonfinite_inputs"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(after.step) == 1
    after = jax.device_get(after)
    fields = lambda s: (s.student, s.teacher, s.center, s.opt_state)  # noqa: E731
    _leaves_equal(fields(before), fields(after))


def _nan_at(step_to_poison: int):
    """batch_iterator replacement: the demo batches, with NaN audio at one step."""
    original = loop.batch_iterator

    def batches(source, first_step):
        for step, batch in enumerate(original(source, first_step), start=first_step):
            if step == step_to_poison:
                batch = {"audio": np.full_like(batch["audio"], np.nan)}
            yield batch

    return batches


def _smoke(steps=6, **overrides):
    return smoke_config(steps, **overrides)


def test_nonfinite_stop_writes_a_report_and_no_new_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "batch_iterator", _nan_at(2))  # the update to step 3 sees NaN
    with pytest.raises(NonFiniteError, match="step 3: non-finite loss=nan") as e:
        tasks.train_and_evaluate(_smoke(), str(tmp_path))
    assert "nonfinite=skip" in str(e.value)
    report = json.loads((tmp_path / "nonfinite_report.json").read_text())
    assert report["step"] == 3 and "loss" in report["nonfinite"] and report["nonfinite_inputs"] > 0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # step 4's checkpoint was never written


def test_nonfinite_skip_skips_the_update_and_finishes(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "batch_iterator", _nan_at(2))
    result = tasks.train_and_evaluate(_smoke(nonfinite="skip"), str(tmp_path))
    assert result["final_metrics"]["step"] == 6 and np.isfinite(result["final_metrics"]["loss"])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite"] for m in lines] == [0, 0, 1, 0, 0, 0]
    config = _smoke(nonfinite="skip")
    abstract = pretrain.build(config, parallel.make_mesh({"data": 1}, jax.devices()[:1]))[3]
    for step in Checkpointer(str(tmp_path)).all_steps():
        state = Checkpointer(str(tmp_path)).restore(abstract, step=step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


# --- Observability.


def _tb_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files, read with the record framing + tensorboardX's Event proto."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    for name in os.listdir(directory):
        data = (directory / name).read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_metrics_tensorboard_and_profile(tmp_path):
    result = tasks.train_and_evaluate(_smoke(steps=4, profile_steps=(1, 3)), str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:
        assert set(TIMING_KEYS) - {"mfu"} <= set(m)  # no MFU on CPU: no known peak
        assert m["samples_per_s"] == pytest.approx(8 / m["step_time_s"])
        assert m["tokens_per_s"] == pytest.approx(m["samples_per_s"] * 5 * 8)  # 80/16 x 128/16 patches
        assert 0 <= m["data_wait_s"] <= m["step_time_s"]
    scalars = _tb_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["loss"]] == pytest.approx([m["loss"] for m in lines])
    assert {"lr", "teacher_temp", "mcl_temp", "samples_per_s", "data_wait_s"} <= set(scalars)
    traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files if f.endswith(".xplane.pb")]
    assert traces, "jax.profiler wrote no trace"
    assert result["final_metrics"]["step"] == 4 and "step_time_s" not in result["final_metrics"]


# --- Early config errors: before any data is read or anything compiled.


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.data.update(batch_size=12), "batch_size=12 is not divisible by the data-parallel size 8"),
        (lambda c: c.mesh.update(data=16), "needs 16 devices, only 8 are available"),
        (
            lambda c: c.update(data={"source": "records", "train": "/x/*.arrayrecord"}, probe={"enabled": False}),
            "no files match",
        ),  # the smoke config's closing probe is the demo's: off for records
        (lambda c: c.update(nonfinite="ignore"), "config.nonfinite='ignore'"),
        (lambda c: c.update(profile_steps=(5,)), r"config.profile_steps=\(5,\)"),
        (lambda c: c.checkpoint.update(every=0), "config.checkpoint: every=0"),
    ],
)
def test_config_errors_fail_before_compute(tmp_path, change, message):
    config = load_config()
    change(config)
    with pytest.raises(ConfigError, match=message):
        tasks.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_unwritable_workdir_fails_before_compute(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="is not writable .*give a writable directory"):
        tasks.train_and_evaluate(load_config(), str(tmp_path / "a_file" / "run"))
    with pytest.raises(ConfigError, match="is a URL"):
        tasks.train_and_evaluate(load_config(), "gs://bucket/run")
