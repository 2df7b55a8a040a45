"""MATPAC / MATPAC++ pretraining as a task of the trainer (train.loop): model, optimizer, sharded state and step,
the input (demo batcher or grain records pipeline), and the probes (periodic and closing) of the student encoder."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from matpac_jax import parallel
from matpac_jax.audio.frontend import LogMelConfig, num_samples_for_frames
from matpac_jax.config_lib import ConfigError
from matpac_jax.models.matpac import MatpacModel
from matpac_jax.train.optim import lr_schedule, make_optimizer
from matpac_jax.train.state import create_train_state
from matpac_jax.train.step import make_train_step


def frontend_config(config) -> LogMelConfig:
    return LogMelConfig.from_audio_config(config.audio)


def build(config, mesh):
    """Model, optimizer, jitted sharded init and step for a config on a mesh."""
    model = MatpacModel.from_config(config)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0))[0])
    tx = make_optimizer(config.optim, config.total_steps, params_shape, config.data.batch_size)
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0)))
    state_sharding = parallel.state_shardings(abstract, mesh)
    init_fn = jax.jit(lambda rng: create_train_state(model, tx, rng), out_shardings=state_sharding)
    step_fn = make_train_step(
        model,
        config,
        tx,
        frontend_config(config),
        lr_schedule(config.optim, config.total_steps, config.data.batch_size),
    )
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


def tokens_per_sample(config) -> int:
    """Encoder tokens (patches) per crop: (mel bins / patch) x (frames / patch)."""
    return (config.audio.n_mels // config.model.patch) * (config.audio.crop_frames // config.model.patch)


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
    from matpac_jax.evaluate.harness import probe_with_ci

    x, labels, n_train = _demo_embeddings(config, model, params, splits)
    return probe_with_ci(x, labels, n_train, len(splits[0]["class_names"]), seeds, config.probe.steps)


def closing_probe(config, model, student, splits) -> dict:
    """Linear probes (the evaluation harness, ``config.probe.seeds`` seeds) of the learned and of the initial encoder
    on the demo's held-out labelled split. The initial encoder is re-created from the seed (initialisation is
    deterministic), so a resumed run compares against the same starting point."""
    seeds = tuple(range(config.seed, config.seed + config.probe.seeds))
    initial_student = jax.jit(model.init)(jax.random.key(config.seed))[0]  # jitted: eager init compiles op by op
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


class PretrainTask:
    """What the trainer needs from pretraining (train.loop.train_and_evaluate)."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.splits = None
        self.tokens_per_sample = tokens_per_sample(config)

    def make_input(self):
        source, self.splits = make_input(self.config)
        return source

    def periodic_probe(self):
        model = MatpacModel.from_config(self.config)  # its geometry is checked by config_lib.check_config
        try:
            probe = PeriodicProbe(self.config, model, self.splits, self.workdir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config.probe.datasets: {e}") from None
        return lambda step, state, tb: probe(step, state.student, tb)

    def build(self, mesh):
        self.model, init_fn, train_step, abstract = build(self.config, mesh)
        return init_fn, train_step, abstract

    def batch_spec(self) -> dict:
        """The batches make_input yields: float32 from the demo batcher, int16 PCM from records. It must match, or
        the memory report compiles another program than the one the loop runs."""
        dtype = jnp.float32 if self.config.data.source == "demo" else jnp.int16
        return {"audio": jax.ShapeDtypeStruct((self.config.data.batch_size, crop_samples(self.config)), dtype)}

    def closing(self, state) -> dict | None:
        if not self.config.probe.enabled:
            return None
        return closing_probe(self.config, self.model, state.student, self.splits)
