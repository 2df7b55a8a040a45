"""The trainer: one loop, read top to bottom.

early config checks -> mesh -> input -> model & optimizer -> sharded state (fresh or restored) -> jitted step -> loop
(metrics fetched one step late so the host never stalls the device; checkpoints every N steps, on SIGTERM and at the
end) -> closing probe
"""

from __future__ import annotations

import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from matpac_jax import parallel
from matpac_jax.audio.frontend import LogMelConfig, num_samples_for_frames
from matpac_jax.checkpoint import Checkpointer
from matpac_jax.config_lib import ConfigError
from matpac_jax.flops import count_matmul_flops, peak_flops
from matpac_jax.models.matpac import MatpacModel
from matpac_jax.train.metrics_log import MetricsLog, without_timings
from matpac_jax.train.optim import lr_schedule, make_optimizer
from matpac_jax.train.preemption import PreemptionWatch
from matpac_jax.train.state import create_train_state
from matpac_jax.train.step import NONFINITE_ACTIONS, make_train_step


def frontend_config(config) -> LogMelConfig:
    a = config.audio
    return LogMelConfig(
        a.sample_rate,
        a.n_fft,
        a.win_length,
        a.hop_length,
        a.n_mels,
        a.f_min,
        a.f_max,
        a.log_offset,
        a.norm_mean,
        a.norm_std,
    )


def build(config, mesh):
    """Model, optimizer, jitted sharded init and step for a config on a mesh."""
    model = MatpacModel.from_config(config)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0))[0])
    tx = make_optimizer(config.optim, config.total_steps, params_shape)
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0)))
    state_sharding = parallel.state_shardings(abstract, mesh)
    init_fn = jax.jit(lambda rng: create_train_state(model, tx, rng), out_shardings=state_sharding)
    step_fn = make_train_step(model, config, tx, frontend_config(config), lr_schedule(config.optim, config.total_steps))
    batch_sh = parallel.batch_sharding(mesh)
    repl = parallel.replicated(mesh)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sharding, {"audio": batch_sh}, repl),
        out_shardings=(state_sharding, repl),
        donate_argnums=0,
    )
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    return model, init_fn, train_step, abstract


def crop_samples(config) -> int:
    return num_samples_for_frames(config.audio.crop_frames, frontend_config(config))


def make_input(config):
    """(source, demo splits). The demo source is a step-indexed in-memory batcher; 'records' a grain dataset."""
    crop = crop_samples(config)
    if config.data.source == "demo":
        from matpac_jax.data.demo import demo_splits
        from matpac_jax.data.in_memory import CropBatcher

        d = config.data.demo
        train, test = demo_splits(d.num_train, d.num_test, d.seconds, d.seed)
        return CropBatcher(train["waves"], crop, config.data.batch_size, config.seed), (train, test)
    if config.data.source == "records":
        from matpac_jax.data.pipeline import pretrain_dataset

        dataset = pretrain_dataset(
            config.data.train,
            global_batch=config.data.batch_size,
            crop_samples=crop,
            seed=config.seed,
            short_clips=config.data.short_clips,
            workers=config.data.workers,
        )
        return dataset, None
    raise ValueError(f"config.data.source must be 'demo' or 'records', got {config.data.source!r}")


def batch_iterator(source, first_step: int):
    """Host batches from `first_step` on.

    The demo batcher is indexed by step, so a resumed run sees exactly the batches of an uninterrupted one; a grain
    iterator is moved to its saved position when the checkpoint is restored.
    """
    if callable(source):
        return (source(step) for step in itertools.count(first_step))
    return iter(source)


def tokens_per_sample(config) -> int:
    """Encoder tokens (patches) per crop: (mel bins / patch) x (frames / patch)."""
    return (config.audio.n_mels // config.model.patch) * (config.audio.crop_frames // config.model.patch)


def parse_profile_steps(value: str) -> tuple[int, int] | None:
    """``config.profile_steps``: '' (off) or 'a,b' with 0 <= a < b: trace steps a .. b-1."""
    if not value:
        return None
    try:
        a, b = (int(x) for x in value.split(","))
    except ValueError:
        a = b = -1
    if not 0 <= a < b:
        raise ConfigError(f"config.profile_steps={value!r}: expected 'a,b' with 0 <= a < b (steps a .. b-1 are traced)")
    return a, b


def check_run(config, workdir: str) -> None:
    """Config and environment errors that must surface before any data is read or anything is compiled."""
    if "://" in workdir:
        raise ConfigError(
            f"--workdir={workdir} is a URL: the workdir must be a filesystem path (mount buckets, e.g. with gcsfuse)"
        )
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror}): give a writable directory") from e
    if config.nonfinite not in NONFINITE_ACTIONS:
        raise ConfigError(f"config.nonfinite={config.nonfinite!r}: expected one of {', '.join(NONFINITE_ACTIONS)}")
    c = config.checkpoint
    if c.every < 1 or c.keep < 1 or c.keep_period < 0:
        raise ConfigError(
            f"config.checkpoint: every={c.every} and keep={c.keep} must be >= 1, keep_period={c.keep_period} >= 0"
        )
    if config.log_every < 1 or config.total_steps < 1:
        raise ConfigError(f"config.log_every={config.log_every}, config.total_steps={config.total_steps}: must be >= 1")
    if not 0 <= config.optim.warmup_steps < config.total_steps:
        raise ConfigError(
            f"config.optim.warmup_steps={config.optim.warmup_steps} must be in [0, config.total_steps="
            f"{config.total_steps}): lower it or train longer"
        )
    parse_profile_steps(config.profile_steps)


class Profiler:
    """A jax.profiler trace of steps [a, b) into WORKDIR/profile (``config.profile_steps='a,b'``)."""

    def __init__(self, value: str, workdir: str):
        self.window = parse_profile_steps(value)
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before_step(self, step: int, state) -> None:
        if self.window is None:
            return
        if step == self.window[0] and not self.active:
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.directory)
            self.active = True
        elif step == self.window[1] and self.active:
            self.stop(state)

    def stop(self, state) -> None:
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            if jax.process_index() == 0:
                a, b = self.window
                print(f"profile of steps {a}..{b - 1} written to {self.directory}", flush=True)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (or resume) to ``config.total_steps``; returns {'final_metrics', 'preempted'[, 'probe']}.

    Raises ``NonFiniteError`` (config.nonfinite='stop') after writing WORKDIR/nonfinite_report.json.
    """
    check_run(config, workdir)
    # --- Mesh.
    try:
        mesh = parallel.make_mesh(config.mesh.to_dict())
    except ValueError as e:
        raise ConfigError(f"{e}: set config.mesh to fit {jax.device_count()} devices (-1 = all remaining)") from None
    dp = parallel.data_parallel_size(mesh)
    if config.data.batch_size % dp:
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} is not divisible by the data-parallel "
            f"size {dp} of mesh {dict(mesh.shape)}: choose a multiple of {dp} or change config.mesh"
        )

    # --- Input (first: a data error should surface before any compilation).
    try:
        source, splits = make_input(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        periodic_probe = PeriodicProbe(config, MatpacModel.from_config(config), splits, workdir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.probe.datasets: {e}") from None
    ckpt = Checkpointer.from_config(workdir, config)
    first = ckpt.latest_step() or 0
    batches = batch_iterator(source, first)

    # --- Model, optimizer, state.
    model, init_fn, train_step, abstract = build(config, mesh)
    if first:
        data_iter = None if config.checkpoint.reset_data else batches
        state = ckpt.restore(abstract, data_iter=data_iter)
        if jax.process_index() == 0:
            print(f"resumed from {ckpt.directory} at step {int(state.step)}", flush=True)
    else:
        state = init_fn(jax.random.key(config.seed))

    # --- Loop.
    peak = peak_flops()
    flops = None
    if peak:  # counting traces the step once more: only where an MFU can be reported
        audio = jax.ShapeDtypeStruct((config.data.batch_size, crop_samples(config)), jnp.int16)
        flops = count_matmul_flops(train_step, abstract, {"audio": audio}, jax.random.key(0))
    log = MetricsLog(workdir, config, first, tokens_per_sample(config), flops, peak)
    profiler = Profiler(config.profile_steps, workdir)
    base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    every, preempted, step = config.checkpoint.every, False, first
    try:
        with PreemptionWatch() as watch:
            for step in range(first, config.total_steps):
                if watch.requested(step):  # before taking a batch: the input workers may be going down too
                    preempted = True
                    break
                profiler.before_step(step, state)
                t_start = time.perf_counter()
                batch = parallel.global_batch(next(batches), mesh)
                data_wait = time.perf_counter() - t_start
                state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step))
                log.push(step + 1, metrics, t_start, data_wait)
                if (step + 1) % every == 0:
                    log.flush()  # a non-finite step raises here, before anything is saved
                    ckpt.save(step + 1, state, config, data_iter=batches)
                periodic_probe(step + 1, state.student, log.tb)
            else:
                step = config.total_steps
            log.flush()
            profiler.stop(state)
            if ckpt.latest_step() != step:
                ckpt.save(step, state, config, data_iter=batches, force=True)
            ckpt.wait()
    finally:
        log.close()
        ckpt.close()
        if hasattr(batches, "close"):
            batches.close()  # stops grain worker processes
    if preempted:
        if jax.process_index() == 0:
            print(
                f"preempted: saved step {step} to {ckpt.directory}; rerun the same command to resume from step {step}",
                flush=True,
            )
        return {"final_metrics": without_timings(log.last), "preempted": True}

    result = {"final_metrics": without_timings(log.last), "preempted": False}
    if config.probe.enabled:
        result["probe"] = closing_probe(config, model, state.student, splits)
    return result


def _demo_embeddings(config, model, params, splits) -> tuple[np.ndarray, np.ndarray, int]:
    """Clip embeddings of the demo's train + test clips: (x [N, D], labels [N], number of train clips)."""
    from matpac_jax.embeddings import clip_embeddings

    train, test = splits
    fe = frontend_config(config)
    params = jax.tree.map(jnp.asarray, jax.device_get(params))
    x = np.concatenate(
        [clip_embeddings(model, params, train["waves"], fe), clip_embeddings(model, params, test["waves"], fe)]
    )
    return x, np.concatenate([train["labels"], test["labels"]]), len(train["labels"])


def _probe_demo(config, model, params, splits, seeds) -> dict:
    """The harness (evaluate.harness) on the demo's labelled split: {'mean', 'ci95', 'runs'}."""
    from matpac_jax.evaluate.harness import confidence_interval, probe_split

    x, labels, n_train = _demo_embeddings(config, model, params, splits)
    runs = probe_split(
        x, labels, np.arange(n_train), np.arange(n_train, len(labels)), multilabel=False,
        num_classes=len(splits[0]["class_names"]), seeds=seeds, val_fraction=0.2, max_steps=config.probe.steps,
        eval_every=20,
    )  # fmt: skip
    mean, half = confidence_interval([r["test"] for r in runs])
    return {"mean": mean, "ci95": half, "runs": runs}


def closing_probe(config, model, student, splits) -> dict:
    """Linear probes (the evaluation harness, ``config.probe.seeds`` seeds) of the learned and of the initial encoder
    on the demo's held-out labelled split. The initial encoder is re-created from the seed (initialisation is
    deterministic), so a resumed run compares against the same starting point."""
    seeds = tuple(range(config.seed, config.seed + config.probe.seeds))
    initial_student = model.init(jax.random.key(config.seed))[0]
    out = {name: _probe_demo(config, model, params, splits, seeds)
           for name, params in (("learned", student), ("init", initial_student))}  # fmt: skip
    if jax.process_index() == 0:
        print("| encoder | demo probe accuracy (mean ± 95 % CI over seeds) |\n|---|---|")
        for name, r in out.items():
            print(f"| {name} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} |")
    return {name: r["mean"] for name, r in out.items()} | {f"{name}_ci95": r["ci95"] for name, r in out.items()}


class PeriodicProbe:
    """Probe the current student every ``config.probe.every`` steps during training, on the demo's labelled split
    (demo input) and on ``config.probe.datasets`` ('name=root;name=root', dataset adapters of evaluate.datasets).
    Results go to WORKDIR/probe.jsonl, TensorBoard (probe/<task>) and the console."""

    def __init__(self, config, model, splits, workdir: str):
        self.config, self.model, self.splits = config, model, splits
        self.every = int(config.probe.every)
        self.tasks = []
        if self.every:
            from matpac_jax.evaluate.datasets import load_task

            for item in filter(None, config.probe.datasets.split(";")):
                name, _, root = item.partition("=")
                self.tasks.append(load_task(name.strip(), root.strip()))
        self.path = os.path.join(workdir, "probe.jsonl")

    def __call__(self, step: int, student, tb=None) -> None:
        if not self.every or step % self.every:
            return
        results = {}
        if self.splits is not None:
            results["demo"] = _probe_demo(self.config, self.model, student, self.splits, (self.config.seed,))["mean"]
        if self.tasks:
            from matpac_jax.evaluate.harness import evaluate_task
            from matpac_jax.inference import Encoder, EncoderSpec
            from matpac_jax.probe import embed_task

            params = jax.device_get(student)
            encoder = Encoder(EncoderSpec.from_config(self.config), {k: params[k] for k in ("tokenizer", "encoder")})
            for task in self.tasks:
                x = embed_task(encoder, task, progress=False)
                results[task.name] = evaluate_task(task, x, seeds=(self.config.seed,))["mean"]
        if jax.process_index() == 0 and results:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **results}) + "\n")
            for name, value in results.items():
                if tb is not None:
                    tb.add_scalar(f"probe/{name}", value, step)
            print(f"probe at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()), flush=True)
