"""MATPAC / MATPAC++ pretraining as a task of the trainer (train.loop): model, optimizer, sharded state and step,
the input (demo batcher or grain records pipeline), and the probes (periodic and closing) of the student encoder."""

from __future__ import annotations

import json
import os

import jax

from matpac_jax.audio.frontend import LogMelConfig, num_samples_for_frames
from matpac_jax.config_lib import ConfigError
from matpac_jax.data.demo import demo_embeddings, demo_splits
from matpac_jax.data.in_memory import CropBatcher
from matpac_jax.data.pipeline import pretrain_dataset, train_input
from matpac_jax.evaluate.datasets import load_task
from matpac_jax.evaluate.harness import evaluate_task, probe_with_ci
from matpac_jax.inference import Encoder, EncoderSpec
from matpac_jax.matpac.model import MatpacModel
from matpac_jax.matpac.state import create_train_state
from matpac_jax.matpac.step import make_train_step
from matpac_jax.probe import embed_task
from matpac_jax.train.optim import lr_schedule, make_optimizer
from matpac_jax.train.program import compile_program
from matpac_jax.train.task import StepProgram, TaskInput


def frontend_config(config) -> LogMelConfig:
    return LogMelConfig.from_audio_config(config.audio)


def step_program(config, model: MatpacModel) -> StepProgram:
    """The pure init and step of MATPAC / MATPAC++ for a config."""
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0))[0])
    tx = make_optimizer(config.optim, config.total_steps, params_shape, config.data.batch_size)
    lr = lr_schedule(config.optim, config.total_steps, config.data.batch_size)
    return StepProgram(init=lambda rng: create_train_state(model, tx, rng),
                       step=make_train_step(model, config, tx, frontend_config(config), lr))  # fmt: skip


def build(config, mesh):
    """Model, jitted sharded init and step (train.program) and the sharded abstract state for a config on a mesh."""
    model = MatpacModel.from_config(config)
    init_fn, train_step, abstract = compile_program(step_program(config, model), mesh)
    return model, init_fn, train_step, abstract


def crop_samples(config) -> int:
    return num_samples_for_frames(config.audio.crop_frames, frontend_config(config))


def make_input(config):
    """(source, demo splits). The demo source is a step-indexed in-memory batcher; 'records' and 'tfds' a grain
    dataset."""
    crop = crop_samples(config)
    if config.data.source == "demo":
        d = config.data.demo
        train, test = demo_splits(d.num_train, d.num_test, d.seconds, d.seed)
        return CropBatcher(train["waves"], crop, config.data.batch_size, config.seed), (train, test)
    if config.data.source in ("records", "tfds"):
        dataset = pretrain_dataset(
            train_input(config),
            global_batch=config.data.batch_size,
            crop_samples=crop,
            seed=config.seed,
            short_clips=config.data.short_clips,
            workers=config.data.workers,
        )
        return dataset, None
    raise ValueError(f"config.data.source must be 'demo', 'records' or 'tfds', got {config.data.source!r}")


def tokens_per_sample(config) -> int:
    """Encoder tokens (patches) per crop: (mel bins / patch) x (frames / patch)."""
    return (config.audio.n_mels // config.model.patch) * (config.audio.crop_frames // config.model.patch)


def encoder_of(config, student: dict) -> Encoder:
    """The student encoder of a state as a loaded model (``load_model``'s interface)."""
    params = jax.device_get(student)
    return Encoder(EncoderSpec.from_config(config), {k: params[k] for k in ("tokenizer", "encoder")})


def _probe_demo(config, params, splits, seeds) -> dict:
    """The harness (evaluate.harness) on the demo's labelled split: {'mean', 'ci95', 'runs'}."""
    x, labels, n_train = demo_embeddings(encoder_of(config, params), splits, config.audio.sample_rate)
    return probe_with_ci(x, labels, n_train, len(splits[0]["class_names"]), seeds, config.probe.steps)


def closing_probe(config, model, student, splits) -> dict:
    """Linear probes (the evaluation harness, ``config.probe.seeds`` seeds) of the learned and of the initial encoder
    on the demo's held-out labelled split. The initial encoder is re-created from the seed (initialisation is
    deterministic), so a resumed run compares against the same starting point."""
    seeds = tuple(range(config.seed, config.seed + config.probe.seeds))
    initial_student = jax.jit(model.init)(jax.random.key(config.seed))[0]  # jitted: eager init compiles op by op
    out = {name: _probe_demo(config, params, splits, seeds)
           for name, params in (("learned", student), ("init", initial_student))}  # fmt: skip
    if jax.process_index() == 0:
        print("| encoder | demo probe accuracy (mean ± 95 % CI over seeds) |\n|---|---|")
        for name, r in out.items():
            print(f"| {name} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} |")
    return {name: r["mean"] for name, r in out.items()} | {f"{name}_ci95": r["ci95"] for name, r in out.items()}


class PeriodicProbe:
    """Probe the current student every ``config.probe.every`` steps during training, on the demo's labelled split
    (demo input) and on ``config.probe.datasets`` ((adapter, root) pairs of evaluate.datasets).
    Results go to WORKDIR/probe.jsonl, TensorBoard (probe/<task>) and the console."""

    def __init__(self, config, splits, workdir: str):
        self.config, self.splits = config, splits
        self.every = int(config.probe.every)
        self.tasks = []
        if self.every:
            for item in config.probe.datasets:
                if not (isinstance(item, tuple | list) and len(item) == 2):
                    raise ValueError(f"{item!r}: expected (adapter, root) pairs, e.g. (('esc50', '/data/ESC-50'),)")
                self.tasks.append(load_task(*item))
        self.path = os.path.join(workdir, "probe.jsonl")

    def __call__(self, step: int, student, tb=None) -> None:
        if not self.every or step % self.every:
            return
        results = {}
        if self.splits is not None:
            results["demo"] = _probe_demo(self.config, student, self.splits, (self.config.seed,))["mean"]
        if self.tasks:
            encoder = encoder_of(self.config, student)
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
    """MATPAC / MATPAC++ pretraining as a trainer task (train.task.Task)."""

    console_metrics = (("loss_pred", "pred"), ("loss_cls", "cls"))

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.splits = None
        self.tokens_per_sample = tokens_per_sample(config)

    def make_input(self) -> TaskInput:
        source, self.splits = make_input(self.config)
        return TaskInput(source)

    def periodic_probe(self):
        try:
            probe = PeriodicProbe(self.config, self.splits, self.workdir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config.probe.datasets: {e}") from None
        return lambda step, state, tb: probe(step, state.student, tb)

    def build(self, data: TaskInput) -> StepProgram:
        del data  # the crops' shape is the config's
        self.model = MatpacModel.from_config(self.config)
        return step_program(self.config, self.model)

    def closing(self, state) -> dict | None:
        if not self.config.probe.enabled:
            return None
        return closing_probe(self.config, self.model, state.student, self.splits)
