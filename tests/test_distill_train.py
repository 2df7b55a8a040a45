"""S-SONDO distillation through the trainer: the ramp-down schedule against a hand computation, the student's input
pipeline (resampling, targets by key, key checks, exact resume), the step (learning, BatchNorm, the non-finite guard,
target standardisation), and a run that resumes from a checkpoint exactly as an uninterrupted one."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from matpac_jax.audio.io import from_int16, to_int16
from matpac_jax.config_lib import ConfigError
from matpac_jax.data.records import ClipRecord, encode_record, shard_name, write_shard
from matpac_jax.distill.data import distill_dataset
from matpac_jax.distill.teacher_pass import cluster, fit_clip, target_stats
from matpac_jax.train.optim import warmup_ramp_down

RATE_IN, DIM, N = 16_000, 24, 12


def test_warmup_ramp_down_matches_efficientat_formula_by_hand():
    lr, warm, start, length, last = 8e-4, 10, 40, 20, 0.01
    sched = warmup_ramp_down(lr, warm, start, length, last)
    for t in (0, 1, 5, 9, 10, 25, 40, 41, 50, 59, 60, 61, 100):
        up = np.exp(-5.0 * (1.0 - max(t, 1) / warm) ** 2) if t < warm else 1.0
        if t <= start:
            down = 1.0
        elif t - start < length:
            down = last + (1.0 - last) * (length - t + start) / length
        else:
            down = last
        np.testing.assert_allclose(float(sched(t)), lr * up * down, rtol=1e-6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 clips at 16 kHz (0.3 to 1.4 s) in 2 shards, and a fake teacher pass: random 24-d embeddings, k-means (k=3)."""
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    waves = {f"c{i:02d}": (0.1 * rng.standard_normal(int((0.3 + 0.1 * i) * RATE_IN))).astype(np.float32) for i in
             range(N)}  # fmt: skip
    keys = sorted(waves)
    for s in range(2):
        write_shard(shard_name(root / "corpus", s, 2), [encode_record(ClipRecord(k, waves[k])) for k in keys[s::2]])
    order = keys[0::2] + keys[1::2]  # record i of the sorted shards
    teacher = root / "teacher"
    teacher.mkdir()
    emb = rng.standard_normal((N, DIM)).astype(np.float32) + 3.0
    np.save(teacher / "embeddings.npy", emb)
    (teacher / "keys.json").write_text(json.dumps(order))
    cluster(str(teacher), k=3, log=lambda *_: None)
    return {"glob": str(root / "corpus" / "*.arrayrecord"), "teacher": str(teacher), "waves": waves, "order": order,
            "emb": emb}  # fmt: skip


def _dataset(corpus, **kw):
    args = dict(global_batch=4, sample_rate=32_000, seconds=1.0, seed=3, balanced=True, process_index=0,
                process_count=1)  # fmt: skip
    return distill_dataset(corpus["glob"], corpus["teacher"], **(args | kw))


def test_pipeline_resamples_clips_and_pairs_each_with_its_teacher_embedding(corpus):
    it = iter(_dataset(corpus))
    row = {k: i for i, k in enumerate(corpus["order"])}
    for _ in range(3):
        batch = next(it)
        assert batch["audio"].shape == (4, 32_000) and batch["audio"].dtype == np.int16
        assert batch["target"].shape == (4, DIM)
        for audio, target in zip(batch["audio"], batch["target"], strict=True):
            i = int(np.argmin(np.abs(corpus["emb"] - target).sum(1)))
            np.testing.assert_array_equal(target, corpus["emb"][i])
            key = corpus["order"][i]
            want = fit_clip(to_int16(corpus["waves"][key]), RATE_IN, 32_000, 1.0)  # first 1 s, padded, resampled
            np.testing.assert_allclose(from_int16(audio), want, atol=1.5 / 32767)
            assert row[key] == i


def test_pipeline_resumes_exactly_and_is_deterministic(corpus):
    ds = _dataset(corpus)
    it = iter(ds)
    for _ in range(2):
        next(it)
    state = it.get_state()
    rest = [next(it)["target"] for _ in range(3)]
    again = iter(_dataset(corpus))
    again.set_state(state)
    for want in rest:
        np.testing.assert_array_equal(next(again)["target"], want)
    other = iter(_dataset(corpus, seed=4))
    assert not all(np.array_equal(next(other)["target"], next(iter(ds))["target"]) for _ in range(3))


def test_pipeline_rejects_another_corpus_and_a_missing_teacher_pass(corpus, tmp_path):
    write_shard(shard_name(tmp_path, 0, 1), [encode_record(ClipRecord(f"x{i}", np.zeros(100))) for i in range(N)])
    it = iter(distill_dataset(str(tmp_path / "*.arrayrecord"), corpus["teacher"], global_batch=2, sample_rate=32_000,
                              seconds=1.0, seed=0, process_index=0, process_count=1))  # fmt: skip
    with pytest.raises(ValueError, match="the teacher pass embedded 'c"):
        next(it)
    with pytest.raises(ValueError, match="lacks keys.json, embeddings.npy, clusters.npz"):
        distill_dataset(corpus["glob"], str(tmp_path), global_batch=2, sample_rate=32_000, seconds=1.0, seed=0)


def _config(corpus, steps=6, **distill):
    """A tiny ERes2Net run; its step compiles to the same program for every ``steps`` (the schedule does not depend
    on it), so the tests share one compilation through the persistent cache."""
    c = load_config("ssondo.py", "smoke,student=eres2net")
    c.total_steps, c.checkpoint.every, c.log_every = steps, 3, 1
    c.optim.warmup_steps, c.optim.ramp_down_start, c.optim.ramp_down_steps = 1, 40, 1
    c.audio.seconds, c.audio.n_mels = 1.0, 32
    c.student.channels, c.student.blocks, c.student.head_hidden = 4, (1, 1, 1, 1, 1), 16  # S-SONDO's five stages
    c.teacher.embeddings, c.data.train, c.data.batch_size = corpus["teacher"], corpus["glob"], 4
    c.probe.enabled = False
    c.mesh = {"data": 2}
    for k, v in distill.items():
        c.distill[k] = v
    return c


def _build(config):
    from matpac_jax import parallel
    from matpac_jax.distill.task import DistillTask
    from matpac_jax.train.program import compile_program

    task = DistillTask(config, "/nonexistent")
    data = task.make_input()
    mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
    init_fn, step_fn, _ = compile_program(
        task.build(data), mesh, config
    )  # the trainer's program: guard, shardings, donation
    return task, iter(data.source), init_fn, step_fn


def test_step_learns_moves_batchnorm_and_keeps_the_state_on_nonfinite_targets(corpus):
    from matpac_jax import parallel

    config = _config(corpus, steps=40, mixup=0.3)
    task, batches, init_fn, step_fn = _build(config)
    mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
    batch = parallel.global_batch(next(batches), mesh)
    state = init_fn(jax.random.key(0))
    first_stats = jax.device_get(state.batch_stats)
    losses = []
    for i in range(15):  # one fixed batch: the student must fit it
        state, m = step_fn(state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.batch_stats, first_stats)
    assert min(jax.tree.leaves(moved)) > 0
    bad = dict(batch, target=batch["target"].at[0, 0].set(jnp.nan))
    before, step = jax.device_get(state.params), int(state.step)
    state2, m = step_fn(state, bad, jax.random.key(99))  # donates state
    assert float(m["nonfinite"]) == 1.0 and int(state2.step) == step + 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state2.params), before)


def test_bfloat16_compute_keeps_float32_state_and_follows_the_float32_step(corpus):
    """``student.dtype='bfloat16'`` (the published 16-bit mixed run): the convolutions run in bfloat16, while the
    parameters, optimizer moments and BatchNorm statistics stay float32 and the step's loss and updated parameters
    follow the float32 step's from the same state and batch."""
    from matpac_jax import parallel

    mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = _config(corpus)
        config.student.dtype = dtype
        task, batches, init_fn, step_fn = _build(config)
        batch = parallel.global_batch(next(batches), mesh)
        state = init_fn(jax.random.key(0))
        start = jax.device_get(state.params)
        hlo = step_fn.lower(state, batch, jax.random.key(1)).as_text()
        state, m = step_fn(state, batch, jax.random.key(1))
        delta = jax.tree.map(lambda a, b: np.ravel(a - b), jax.device_get(state.params), start)
        runs[dtype] = (jax.device_get(state), float(m["loss"]), float(m["grad_norm"]), hlo, np.concatenate(
            jax.tree.leaves(delta)))  # fmt: skip
    (_, loss32, g32, hlo32, d32), (s16, loss16, g16, hlo16, d16) = runs["float32"], runs["bfloat16"]
    assert "bf16" not in hlo32 and "bf16" in hlo16 and "convolution" in hlo16
    floats = {x.dtype for x in jax.tree.leaves((s16.params, s16.opt_state, s16.batch_stats)) if x.dtype != np.int32}
    assert floats == {np.dtype("float32")}  # int32: the optimizer's step counts
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32), (loss16, loss32)
    # bfloat16 keeps 8 bits of mantissa: the gradient norm moves by ~10 % here (BatchNorm over 4 clips), and Adam's
    # first update, ~lr·sign(g), agrees in sign on ~93 % of the weights
    assert abs(g16 - g32) <= 0.2 * g32, (g16, g32)
    assert np.mean(np.sign(d16) == np.sign(d32)) > 0.85


def test_standardised_targets_are_the_teacher_embeddings_z_scored_over_the_corpus(corpus):
    from matpac_jax.distill.step import make_program, normalize_targets

    mean, std = target_stats(corpus["teacher"])
    ref = corpus["emb"].astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, ref.std(0), rtol=1e-5)
    t = corpus["emb"][:3]
    np.testing.assert_allclose(normalize_targets(t, "standardize", (mean, std)), (t - ref.mean(0)) / ref.std(0),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(normalize_targets(t, "center", (mean, std)), t - ref.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(normalize_targets(t, "raw", None), t)
    with pytest.raises(ValueError, match="config.distill.targets='whiten'"):
        make_program(None, _config(corpus, targets="whiten"), (1, 8, 8))


def test_distill_run_resumes_exactly_and_writes_the_student(corpus, tmp_path):
    from matpac_jax.load import load_model
    from matpac_jax.models.student import Student
    from matpac_jax.tasks import train_and_evaluate

    straight = train_and_evaluate(_config(corpus, mixup=0.3), str(tmp_path / "a"))
    part = train_and_evaluate(_config(corpus, steps=3, mixup=0.3), str(tmp_path / "b"))
    assert part["final_metrics"]["step"] == 3
    resumed = train_and_evaluate(_config(corpus, mixup=0.3), str(tmp_path / "b"))
    assert resumed["final_metrics"] == pytest.approx(straight["final_metrics"], rel=1e-5)
    student = Student.load(str(tmp_path / "b" / "student"))
    wave = 0.1 * np.random.default_rng(0).standard_normal((2, 16_000)).astype(np.float32)
    e = student.embed(wave, 16_000)["clip"]
    assert e.shape == (2, 2 * 4 * 4 * 32 // 16) and np.isfinite(e).all()  # TSTP: 2 x 4·4 channels x 32/16 mel rows
    from_run = load_model(str(tmp_path / "b"))  # the workdir's latest checkpoint: the same student
    assert isinstance(from_run, Student) and from_run.embedding_dim == e.shape[1]
    np.testing.assert_array_equal(from_run.embed(wave, 16_000)["clip"], e)
    assert json.loads((tmp_path / "b" / "student" / "model.json").read_text())["spec"]["step"] == 6
    with pytest.raises(ConfigError, match="config.teacher.embeddings"):
        c = _config(corpus)
        c.teacher.embeddings = ""
        train_and_evaluate(c, str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c" / "checkpoints")


def test_recipe_students_include_dymn10_and_need_their_imagenet_start_or_none():
    """configs/ssondo.py: student=dymn10 and the 'students' sweep include EfficientAT's DyMN; an mn10 / dymn10 run
    without config.student.init_from stops before compute naming the key and the file to download (the published
    runs start from mn10_im / dymn10_im); 'none' starts from scratch on purpose and loads nothing; ERes2Net, the
    demo and smoke variants need nothing."""
    from matpac_jax.distill.task import DistillTask
    from matpac_jax.sweep import load_sweeps
    from matpac_jax.train.task import TaskInput

    assert load_config("ssondo.py", "student=dymn10").student.arch == "dymn"
    sweeps = load_sweeps(os.path.join(os.path.dirname(__file__), "..", "configs", "ssondo.py"))
    assert [s["student.arch"] for s in sweeps["students"]] == ["mobilenet", "dymn", "eres2net"]
    for arg, name in ((None, "mn10_im.pt"), ("student=dymn10", "dymn10_im.pt")):
        c = load_config("ssondo.py", arg)
        with pytest.raises(ConfigError, match=rf"config.student.init_from .*{name}.*init_from=none"):
            DistillTask(c, "/nonexistent").check()
        c.student.init_from = "none"
        DistillTask(c, "/nonexistent").check()  # accepted: from scratch on purpose
    for arg in ("student=eres2net", "smoke", "demo", "demo,student=mn10"):
        DistillTask(load_config("ssondo.py", arg), "/nonexistent").check()
    c = load_config("ssondo.py", "smoke")
    c.distill.targets = "raw"  # no corpus statistics to read
    smoke = DistillTask(c, "/nonexistent")
    assert smoke.build(TaskInput(None, {"target_dim": 8})).initial_weights is None  # 'none' reads no file
