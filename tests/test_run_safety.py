"""Safety of training runs: one run per workdir (lock), no non-finite state ever saved (state guard, config checks,
a limit on consecutive skips), checkpoints verified against their checksums on resume (fallback to the previous one,
nothing deleted), and config errors named before any compute (bad values, resume with another config)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, load_config, smoke_config

from matpac_jax import checksums, parallel, tasks, trained_state
from matpac_jax.checkpoint import Checkpointer, CheckpointError
from matpac_jax.config_lib import ConfigError
from matpac_jax.matpac import task as pretrain
from matpac_jax.train import loop
from matpac_jax.train.metrics_log import TIMING_KEYS, NonFiniteError
from matpac_jax.workdir_lock import WorkdirBusyError, WorkdirLock


def _smoke(steps=4, **overrides):
    return smoke_config(steps, **overrides)


def _metrics(workdir) -> list[dict]:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]


def _restore(workdir, step):
    abstract = pretrain.build(_smoke(), parallel.make_mesh({"data": 1}, jax.devices()[:1]))[3]
    c = Checkpointer(str(workdir))
    try:
        return jax.device_get(c.restore(abstract, step=step))
    finally:
        c.close()


@pytest.fixture(scope="module", autouse=True)
def _no_memory_report():
    """The runs here skip the compiled-memory report (a second compilation, tested in test_main)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "memory_report", lambda *a: None)
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory, _no_memory_report):
    """A finished 4-step smoke run (checkpoints 2 and 4); tests work on copies (``_copy``)."""
    workdir = tmp_path_factory.mktemp("safety") / "run"
    tasks.train_and_evaluate(_smoke(), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["2", "4"]
    return workdir


def _copy(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def _resume_step(workdir, **kw):
    c = Checkpointer(str(workdir), **kw)
    try:
        return c.resume_step()
    finally:
        c.close()


def _largest_state_file(step_dir) -> str:
    files = [os.path.join(d, f) for d, _, names in os.walk(step_dir / "state") for f in names]
    return max(files, key=os.path.getsize)


# --- One run per workdir.


def test_a_second_run_on_a_locked_workdir_fails_before_touching_it(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir(parents=True)  # another run's save under way
    (workdir / "metrics.jsonl").write_text('{"step": 9}\n')  # another run's metrics, past any checkpoint
    with WorkdirLock(str(workdir)):
        with pytest.raises(WorkdirBusyError, match=rf"in use by another run \(pid {os.getpid()} on "):
            tasks.train_and_evaluate(_smoke(), str(workdir))
        assert (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1").is_dir()
        assert (workdir / "metrics.jsonl").read_text() == '{"step": 9}\n'
        WorkdirLock(str(workdir), process_index=1).acquire().release()  # another process of the same job: free
    WorkdirLock(str(workdir)).acquire().release()  # released with its holder


def test_a_second_process_on_a_locked_workdir_exits_2_naming_the_holder(tmp_path):
    with WorkdirLock(str(tmp_path)):
        r = subprocess.run(
            [sys.executable, "-m", "matpac_jax.main", "--config=configs/pp.py:smoke", f"--workdir={tmp_path}"],
            cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"is in use by another run (pid {os.getpid()}" in r.stderr and "another --workdir" in r.stderr
    assert not (tmp_path / "checkpoints").exists()


# --- No non-finite state is ever kept.


def test_the_step_keeps_the_state_when_the_update_turns_it_non_finite():
    """A finite loss and gradient whose update is NaN (here a hostile optimizer state): the state is kept."""
    config = _smoke()
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    _, init_fn, step_fn, _ = pretrain.build(config, mesh)
    state = init_fn(jax.random.key(0))
    poison = lambda path, x: -jnp.ones_like(x) if "nu" in jax.tree_util.keystr(path) else x  # noqa: E731
    state = state.replace(opt_state=jax.tree_util.tree_map_with_path(poison, state.opt_state))
    before = jax.device_get(state)
    audio = np.random.default_rng(0).normal(0, 0.1, (8, pretrain.crop_samples(config))).astype(np.float32)
    after, m = step_fn(state, parallel.global_batch({"audio": audio}, mesh), jax.random.key(1))
    assert math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))
    assert float(m["nonfinite"]) == 1.0 and float(m["nonfinite_state"]) == 1.0 and int(after.step) == 1
    fields = lambda s: (s.student, s.teacher, s.center, s.opt_state)  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, fields(jax.device_get(after)), fields(before))


def test_the_distillation_step_keeps_the_state_when_the_update_turns_it_non_finite():
    import flax.linen as nn

    from matpac_jax import parallel
    from matpac_jax.distill.step import make_program
    from matpac_jax.train.program import compile_program

    class Tiny(nn.Module):  # BatchNorm + two layers: the step's contract, compiled in a moment
        @nn.compact
        def __call__(self, mel, train=True):
            x = nn.BatchNorm(use_running_average=not train)(jnp.mean(mel, axis=2))
            emb = nn.Dense(4)(x)
            return emb, nn.Dense(6)(emb)

    config = load_config("ssondo.py", "smoke")
    config.optim.lr = float("nan")  # past check_config: the guard must hold on its own
    config.distill.targets = "raw"
    model, mel_shape = Tiny(), (1, config.audio.n_mels, 8)
    samples = int(config.audio.seconds * config.audio.sample_rate)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    init, step, _ = compile_program(make_program(model, config, mel_shape), mesh, config)  # the trainer's guard
    state = init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"audio": jnp.asarray(rng.integers(-3000, 3000, (4, samples)), jnp.int16),
             "target": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}  # fmt: skip
    before = jax.device_get(state)
    after, m = step(state, batch, jax.random.key(1))
    assert math.isfinite(float(m["loss"])) and float(m["nonfinite"]) == 1.0 and float(m["nonfinite_state"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((after.params, after.batch_stats, after.opt_state)),
                 (before.params, before.batch_stats, before.opt_state))  # fmt: skip


def test_skip_stops_after_max_consecutive_skips_with_finite_checkpoints_and_a_strict_report(tmp_path, monkeypatch):
    original = loop.batch_iterator
    monkeypatch.setattr(loop, "batch_iterator", lambda source, first: (
        {"audio": np.full_like(b["audio"], np.nan)} for b in original(source, first)))  # fmt: skip
    config = _smoke(nonfinite="skip", nonfinite_max_skips=3)  # 4 steps: the step the other tests compile
    with pytest.raises(NonFiniteError, match=r"steps 1\.\.3: 3 non-finite updates in a row") as e:
        tasks.train_and_evaluate(config, str(tmp_path))
    assert "nonfinite_max_skips=3" in str(e.value)

    def no_constants(name):
        raise AssertionError(f"non-strict JSON token {name}")

    report = json.loads((tmp_path / "nonfinite_report.json").read_text(), parse_constant=no_constants)
    assert report["step"] == 3 and report["consecutive_nonfinite_steps"] == 3 and report["metrics"]["loss"] is None
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # saved while skipping: the initial state, finite
    initial = jax.device_get(pretrain.build(config, parallel.make_mesh({"data": 1}, jax.devices()[:1]))[1](
        jax.random.key(config.seed)))  # fmt: skip
    saved = _restore(tmp_path, 2)
    assert int(saved.step) == 2
    fields = lambda s: (s.student, s.teacher, s.center, s.opt_state)  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, fields(saved), fields(initial))


# --- Checkpoint integrity.


def test_the_checksum_manifest_is_written_before_the_checkpoint_is_committed(tmp_path, monkeypatch):
    seen = []
    original = checksums.write_manifest

    def write_manifest(d, step):
        seen.append((os.path.basename(d), os.path.isdir(tmp_path / "checkpoints" / str(step))))
        return original(d, step)

    monkeypatch.setattr(checksums, "write_manifest", write_manifest)
    for step, async_save in ((1, True), (2, False)):
        c = Checkpointer(str(tmp_path), async_save=async_save)
        c.save(step, {"x": jnp.arange(3.0)}, load_config())
        c.close()
    assert [(".orbax-checkpoint-tmp" in name, committed) for name, committed in seen] == [(True, False)] * 2
    for step in (1, 2):
        assert checksums.verify(str(tmp_path / "checkpoints" / str(step))) == (step, None)


def test_a_flipped_bit_in_the_latest_checkpoint_falls_back_to_the_previous_and_ends_identical(finished, tmp_path,
                                                                                              capsys):  # fmt: skip
    workdir = _copy(finished, tmp_path)
    path = _largest_state_file(workdir / "checkpoints" / "4")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    result = tasks.train_and_evaluate(_smoke(), str(workdir))
    err = capsys.readouterr().err
    rel = os.path.relpath(path, workdir / "checkpoints" / "4")
    assert f"checkpoint 4 is corrupt or unverifiable: {rel} differs from what was written" in err
    assert "resuming from the previous verified checkpoint, step 2" in err.lower()
    assert (workdir / "checkpoints-rejected" / "4").is_dir()  # kept for inspection, not deleted
    assert result["final_metrics"]["step"] == 4 and _metrics(workdir) == _metrics(finished)
    jax.tree.map(np.testing.assert_array_equal, _restore(workdir, 4), _restore(finished, 4))


def test_readers_of_a_workdir_verify_it_as_a_resume_does(finished, tmp_path, capsys):
    """load_model / embed / finetune.init_from / convert read a training state through one verified read
    (trained_state.read_trained_state): a flipped bit in the latest checkpoint is named and the previous verified one
    read (nothing moved: reading never changes a workdir); that checkpoint named directly is refused naming the file;
    check=False still reads it (checkpoints of older versions)."""
    from matpac_jax.load import load_model

    workdir = _copy(finished, tmp_path)
    path = _largest_state_file(workdir / "checkpoints" / "4")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    wave = np.random.default_rng(0).normal(0, 0.1, (1, 16_000)).astype(np.float32)
    got = load_model(workdir).embed(wave, 16_000)["clip"]
    err = capsys.readouterr().err
    assert re.search(r"checkpoints/4 is corrupt or unverifiable: state/\S+ differs from what was written", err)
    assert re.search(r"reading the previous verified one, \S+/checkpoints/2$", err.strip())
    np.testing.assert_array_equal(got, load_model(workdir / "checkpoints" / "2").embed(wave, 16_000)["clip"])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    with pytest.raises(CheckpointError, match=r"checkpoints/4: state/\S+ differs from what was written.*backup"):
        load_model(workdir / "checkpoints" / "4")
    config, state = trained_state.read_trained_state(str(workdir / "checkpoints" / "4"), check=False)
    assert int(state["step"]) == 4


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: open(_largest_state_file(d), "r+b").truncate(100), r"state/\S+ has 100 bytes, \d+ were written"),
        (lambda d: open(d / "state" / "_METADATA", "w").close(), r"state/_METADATA has 0 bytes"),
        (lambda d: shutil.rmtree(d / "state"), r"state/\S+ is missing"),
        (lambda d: os.remove(d / "checksums.json"), "it has no checksums.json"),
    ],
)
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumed(finished, tmp_path, capsys, damage,
                                                                           reason):  # fmt: skip
    workdir = _copy(finished, tmp_path)
    damage(workdir / "checkpoints" / "4")
    assert _resume_step(workdir) == 2
    assert re.search(f"checkpoint 4 is corrupt or unverifiable: {reason}", capsys.readouterr().err)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


def test_no_verifiable_checkpoint_is_an_error_naming_each_step_and_moves_nothing(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    for step in ("2", "4"):
        os.remove(workdir / "checkpoints" / step / "checksums.json")  # as written by an older version
    with pytest.raises(CheckpointError, match=r"step 4: it has no checksums.json.*step 2: .*verify=False"):
        tasks.train_and_evaluate(_smoke(), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert _resume_step(workdir, verify=False) == 4  # the escape hatch: resume unverified


def test_a_checkpoint_directory_holding_another_step_is_refused_naming_both(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    os.rename(workdir / "checkpoints" / "4", workdir / "checkpoints" / "3")
    with pytest.raises(CheckpointError, match=r"checkpoints/3 holds the checkpoint of step 4, not of step 3"):
        _resume_step(workdir)
    os.remove(workdir / "checkpoints" / "3" / "checksums.json")  # unverified: the restored state's step tells
    abstract = pretrain.build(_smoke(), parallel.make_mesh({"data": 1}, jax.devices()[:1]))[3]
    c = Checkpointer(str(workdir), verify=False)
    try:
        with pytest.raises(CheckpointError, match=r"checkpoints/3 holds the state of step 4, not of step 3"):
            c.restore(abstract, step=3)
    finally:
        c.close()


# --- Resume with another config.


def test_resume_with_another_model_or_fewer_steps_is_refused_naming_the_keys(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    config = _smoke(steps=6)
    config.model.encoder.dim = 128
    config.optim.lr = 1e-3
    with pytest.raises(ConfigError, match=r"config.model.encoder.dim: saved 64, now 128; config.optim.lr: saved"):
        tasks.train_and_evaluate(config, str(workdir))
    with pytest.raises(ConfigError, match=r"config.total_steps=3 is below the step of the latest checkpoint, 4"):
        tasks.train_and_evaluate(_smoke(steps=3), str(workdir))
    assert _metrics(workdir) == _metrics(finished)  # nothing was written


def test_resume_accepts_the_keys_that_may_change(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    config = _smoke(steps=10, log_every=1, profile_steps=(5, 6), nonfinite="skip")
    config.checkpoint.update(every=5, keep=1, allow_changes="optim.lr")
    config.mesh.update(data=-1, fsdp=1)
    config.data.update(workers=2, device_prefetch=1)
    config.optim.lr = 1e-3
    config.stall_timeout_s = 60
    c = Checkpointer(str(workdir))
    try:
        assert loop.resume_point(c, config) == 4
        # a method's own: the ViT's implementation choices may change for the task that declares them
        config.model.update(attn_impl="xla", remat="dots", scan_layers=True)
        with pytest.raises(ConfigError, match=r"config.model.attn_impl: saved 'auto', now 'xla'"):
            loop.resume_point(c, config)
        assert loop.resume_point(c, config, pretrain.PretrainTask.resume_may_change) == 4
    finally:
        c.close()


# --- Config errors before any compute.


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.batch_size", 0, r"config.data.batch_size=0: expected an integer >= 1"),
        ("mesh.data", 0, r"config.mesh.data=0: expected a size >= 1, or -1"),
        ("mesh.fsdp", -2, r"config.mesh.fsdp=-2: expected a size >= 1, or -1"),
        ("model.patch", 0, r"config.model.patch=0: expected an integer >= 1"),
        ("model.encoder.heads", 3, r"config.model.encoder.heads=3 does not divide config.model.encoder.dim=64"),
        ("seed", -1, r"config.seed=-1: expected an integer >= 0"),
        ("objective.mask_ratio", 1.0, r"config.objective.mask_ratio=1.0: expected a number in \(0, 1\)"),
        ("audio.crop_frames", 8, r"config.audio.crop_frames=8: must be a positive multiple of config.model.patch"),
        ("optim.lr", float("nan"), r"config.optim.lr=nan: expected a finite number >= 0"),
        ("optim.b2", 1.0, r"config.optim.b2=1.0: expected a number in \[0, 1\)"),
        ("objective.center_momentum", float("nan"), r"config.objective.center_momentum=nan"),
        ("objective.teacher_temp", 0.0, r"config.objective.teacher_temp=0.0: expected a finite number > 0"),
        ("nonfinite_max_skips", 0, r"config.nonfinite_max_skips=0: expected an integer >= 1"),
    ],
)
def test_bad_values_fail_before_compute_naming_the_key(tmp_path, key, value, message):
    config = load_config()
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        loop.check_run(config, str(tmp_path), tasks.make_task(config, str(tmp_path)))


def test_distillation_values_fail_before_compute_naming_the_key(tmp_path):
    config = load_config("ssondo.py", "smoke")
    config.distill.temperature = float("inf")
    with pytest.raises(ConfigError, match=r"config.distill.temperature=inf: expected a finite number > 0"):
        loop.check_run(config, str(tmp_path), tasks.make_task(config, str(tmp_path)))


# --- A full disk.


def test_a_full_disk_stops_the_run_with_its_own_error_and_the_rerun_resumes(finished, tmp_path, monkeypatch, capsys):
    """The metrics file's write fails with ENOSPC and closing it then fails too ("I/O operation on closed file"):
    the run stops with the ENOSPC error, not the closing one (a run on a full disk used to end in "handle is
    closed"); main turns it into one line naming the device and the fix; the same command then ends as an
    uninterrupted run."""
    import errno

    from matpac_jax.main import disk_full_message
    from matpac_jax.train.metrics_log import MetricsLog

    workdir = tmp_path / "run"

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "metrics.jsonl"))

    def closed(self):
        raise ValueError("I/O operation on closed file")

    with monkeypatch.context() as m:
        m.setattr(MetricsLog, "flush", full)
        m.setattr(MetricsLog, "close", closed)
        with pytest.raises(OSError) as e:
            tasks.train_and_evaluate(_smoke(), str(workdir))
    assert e.value.errno == errno.ENOSPC
    assert "closing MetricsLog failed too: ValueError: I/O operation on closed file" in capsys.readouterr().err
    message = disk_full_message(e.value, str(workdir))
    assert f"writing {workdir}/metrics.jsonl (No space left on device)" in message and "rerun the same" in message
    tasks.train_and_evaluate(_smoke(), str(workdir))
    assert _metrics(workdir) == _metrics(finished)
