"""MATPAC / MATPAC++ pretraining as a task of the trainer (train.loop): model, optimizer, sharded state and step,
the input (demo batcher or grain records pipeline), and the probes (periodic and closing) of the student encoder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
from ml_collections import ConfigDict

from matpac_jax.audio.frontend import LogMelConfig, num_samples_for_frames
from matpac_jax.config_lib import ConfigError
from matpac_jax.data.demo import demo_embeddings, demo_splits
from matpac_jax.data.in_memory import CropBatcher
from matpac_jax.data.pipeline import pretrain_dataset, train_input
from matpac_jax.evaluate.datasets import Task as ProbeTask
from matpac_jax.evaluate.datasets import load_task
from matpac_jax.evaluate.harness import evaluate_task, probe_with_ci
from matpac_jax.inference import Encoder, EncoderSpec
from matpac_jax.matpac.checks import check_pretrain
from matpac_jax.matpac.model import MatpacModel
from matpac_jax.matpac.step import make_program
from matpac_jax.models.vit import RESUME_MAY_CHANGE as VIT_RESUME_MAY_CHANGE
from matpac_jax.probe import embed_task
from matpac_jax.train.program import compile_program
from matpac_jax.train.task import State, StepProgram, TaskInput


def frontend_config(config: ConfigDict) -> LogMelConfig:
    return LogMelConfig.from_audio_config(config.audio)


def build(
    config: ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[MatpacModel, Callable[[jax.Array], State], Callable, Any]:
    """Model, jitted sharded init and step (train.program) and the sharded abstract state for a config on a mesh."""
    model = MatpacModel.from_config(config)
    init_fn, train_step, abstract = compile_program(make_program(model, config), mesh, config)
    return model, init_fn, train_step, abstract


def crop_samples(config: ConfigDict) -> int:
    return num_samples_for_frames(config.audio.crop_frames, frontend_config(config))


def make_input(config: ConfigDict) -> tuple[Any, tuple[dict, dict] | None]:
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


def tokens_per_sample(config: ConfigDict) -> int:
    """Encoder tokens (patches) per crop: (mel bins / patch) x (frames / patch)."""
    return (config.audio.n_mels // config.model.patch) * (config.audio.crop_frames // config.model.patch)


def encoder_of(config: ConfigDict, student: dict) -> Encoder:
    """The student encoder of a state as a loaded model (``load_model``'s interface)."""
    params = jax.device_get(student)
    return Encoder(EncoderSpec.from_config(config), {k: params[k] for k in ("tokenizer", "encoder")})


def _probe_demo(config: ConfigDict, params: dict, splits: tuple[dict, dict], seeds: tuple[int, ...]) -> dict:
    """The harness (evaluate.harness) on the demo's labelled split: {'mean', 'ci95', 'runs'}."""
    x, labels, n_train = demo_embeddings(encoder_of(config, params), splits, config.audio.sample_rate)
    return probe_with_ci(x, labels, n_train, len(splits[0]["class_names"]), seeds, config.probe.steps)


def closing_probe(config: ConfigDict, model: MatpacModel, student: dict, splits: tuple[dict, dict]) -> dict:
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

    def __init__(self, config: ConfigDict, splits: tuple[dict, dict] | None, workdir: str) -> None:
        self.config, self.splits = config, splits
        self.every = int(config.probe.every)
        self.tasks: list[ProbeTask] = []
        if self.every:
            for item in config.probe.datasets:
                if not (isinstance(item, tuple | list) and len(item) == 2):
                    raise ValueError(f"{item!r}: expected (adapter, root) pairs, e.g. (('esc50', '/data/ESC-50'),)")
                self.tasks.append(load_task(*item))
        self.path = os.path.join(workdir, "probe.jsonl")

    def __call__(self, step: int, student: dict, tb: Any = None) -> None:
        if not self.every or step % self.every:
            return
        results: dict[str, float] = {}
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
    resume_may_change = VIT_RESUME_MAY_CHANGE

    def __init__(self, config: ConfigDict, workdir: str) -> None:
        self.config, self.workdir = config, workdir
        self.splits: tuple[dict, dict] | None = None

    @property
    def tokens_per_sample(self) -> int:
        return tokens_per_sample(self.config)

    def check(self) -> None:
        check_pretrain(self.config)

    def make_input(self) -> TaskInput:
        source, self.splits = make_input(self.config)
        return TaskInput(source)

    def periodic_probe(self) -> Callable[[int, State, Any], None]:
        try:
            probe = PeriodicProbe(self.config, self.splits, self.workdir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config.probe.datasets: {e}") from None
        return lambda step, state, tb: probe(step, state.student, tb)

    def build(self, data: TaskInput) -> StepProgram:
        del data  # the crops' shape is the config's
        self.model = MatpacModel.from_config(self.config)
        return make_program(self.model, self.config)

    def closing(self, state: State) -> dict | None:
        if not self.config.probe.enabled:
            return None
        assert self.splits is not None  # probe.enabled needs the demo input (check_pretrain)
        return closing_probe(self.config, self.model, state.student, self.splits)
