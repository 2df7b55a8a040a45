"""S-SONDO distillation as a task of the trainer (train.loop): a student learns to map its own log-mel of a clip to
the teacher's clip embedding of the same clip (SPEC §6).

Input: distill.data (the teacher pass's corpus and embeddings, cluster-balanced). State: distill.step.DistillState
(params, BatchNorm statistics, optimizer). After training, ``closing`` writes the student (backbone only: the
projection head is dropped) to ``WORKDIR/student/`` and, with ``config.probe.enabled``, probes the student's and the
teacher's embeddings side by side on the demo's labelled split (evaluate.harness, ``config.probe.seeds`` seeds).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from matpac_jax.audio.frontend import LogMelConfig, num_frames
from matpac_jax.config_lib import ConfigError
from matpac_jax.data.demo import demo_embeddings, demo_splits
from matpac_jax.distill.corpus import target_stats
from matpac_jax.distill.data import distill_dataset
from matpac_jax.distill.published import initialise_from
from matpac_jax.distill.step import create_distill_state, make_distill_step
from matpac_jax.evaluate.harness import probe_with_ci
from matpac_jax.load import load_model
from matpac_jax.models.student import Student, save_student
from matpac_jax.models.students import count_params, make_student
from matpac_jax.train.optim import lr_schedule, make_optimizer
from matpac_jax.train.task import StepProgram, TaskInput

SCRATCH = "none"  # config.student.init_from: start a student that has ImageNet weights from scratch on purpose
IMAGENET_START = {"mobilenet": "mn", "dymn": "dymn"}  # EfficientAT's {prefix}{width x 10:02d}_im.pt


def check_start(student) -> None:
    """mn / dymn students start from EfficientAT's ImageNet weights, as every published S-SONDO run (configs/ssondo.py
    docstring): refuse, before anything is computed, a run that names neither them nor ``none``."""
    if student.arch in IMAGENET_START and not student.init_from:
        name = f"{IMAGENET_START[student.arch]}{round(10 * student.width):02d}_im.pt"
        raise ConfigError(
            f"config.student.init_from is empty for a {student.arch} student: the published runs start it from "
            f"EfficientAT's ImageNet weights. Download https://github.com/fschmid56/EfficientAT/releases/download/"
            f"v0.0.1/{name} and pass --config.student.init_from={name}, or --config.student.init_from={SCRATCH} to "
            "train from scratch on purpose"
        )


class DistillTask:
    """S-SONDO distillation as a trainer task (train.task.Task)."""

    console_metrics = (("cos_to_teacher", "cos to teacher"),)

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        check_start(config.student)
        self.frontend = LogMelConfig.from_audio_config(config.audio)
        self.samples = int(round(config.audio.seconds * config.audio.sample_rate))
        self.tokens_per_sample = num_frames(self.samples, self.frontend)  # log-mel frames per clip

    def make_input(self) -> TaskInput:
        c = self.config
        if not c.teacher.embeddings or not c.data.train:
            raise ValueError(
                "distillation needs --config.teacher.embeddings=DIR (a teacher-pass workdir) and "
                "--config.data.train='GLOB' (the corpus that pass read)"
            )
        ds = distill_dataset(
            c.data.train, c.teacher.embeddings, global_batch=c.data.batch_size, sample_rate=c.audio.sample_rate,
            seconds=c.audio.seconds, seed=c.seed, balanced=c.distill.balanced, workers=c.data.workers,
        )  # fmt: skip
        emb = np.load(os.path.join(c.teacher.embeddings, "embeddings.npy"), mmap_mode="r")
        return TaskInput(ds, {"target_dim": emb.shape[1]})

    def periodic_probe(self):
        if self.config.probe.every:
            raise ConfigError("config.probe.every: periodic probes are for pretraining; distillation probes at the end")
        return lambda step, state, tb: None

    def build(self, data: TaskInput) -> StepProgram:
        c = self.config
        self.model = make_student(c.student, data.info["target_dim"])
        mel_shape = (1, c.audio.n_mels, self.tokens_per_sample)
        params_shape = jax.eval_shape(lambda: self.model.init(jax.random.key(0), jnp.zeros(mel_shape))["params"])
        tx = make_optimizer(c.optim, c.total_steps, params_shape, c.data.batch_size)
        stats = None if c.distill.targets == "raw" else target_stats(c.teacher.embeddings)
        lr = lr_schedule(c.optim, c.total_steps, c.data.batch_size)
        published = None
        if c.student.init_from not in ("", SCRATCH):  # published weights (EfficientAT / S-SONDO), checked at build
            published = lambda init_fn, abstract: initialise_from(init_fn, c.student, abstract)  # noqa: E731
        return StepProgram(
            init=lambda rng: create_distill_state(self.model, tx, rng, mel_shape),
            step=make_distill_step(self.model, c, tx, self.frontend, lr, stats),
            initial_weights=published,
        )

    def closing(self, state) -> dict | None:
        directory = os.path.join(self.workdir, "student")
        if jax.process_index() == 0:
            save_student(directory, self.config, state)
            print(f"student (backbone, {count_params(state.params['backbone']):,} parameters) written to {directory}")
        if not self.config.probe.enabled:
            return None
        return probe_side_by_side(self.config, Student.load(directory))


def probe_side_by_side(config, student: Student) -> dict:
    """Linear probes of the student's, the initial student's and the teacher's clip embeddings on the demo's
    labelled split (the harness, ``config.probe.seeds`` seeds): {'student', 'init', 'teacher'} and their '_ci95'.
    All three are loaded models (``load_model``'s interface), embedded by the same path as the probe CLI's."""
    d, c = config.data.demo, config
    splits = demo_splits(d.num_train, d.num_test, d.seconds, d.seed, sample_rate=d.sample_rate)
    train = splits[0]
    initial = Student(student.config, Student.initial_variables(student.config, c.seed))
    models = {"student": student, "init": initial, "teacher": load_model(c.teacher.checkpoint)}
    x, labels = {}, None
    for name, m in models.items():
        x[name], labels, _ = demo_embeddings(m, splits, d.sample_rate)
    params = {name: count_params(m.variables["params"] if name != "teacher" else m.params)
              for name, m in models.items()}  # fmt: skip
    seeds = tuple(range(c.seed, c.seed + c.probe.seeds))
    out = {name: probe_with_ci(v, labels, len(train["labels"]), len(train["class_names"]), seeds, c.probe.steps)
           for name, v in x.items()}  # fmt: skip
    if jax.process_index() == 0:
        print("| model | parameters | embedding | demo probe accuracy (mean ± 95 % CI over seeds) |\n|---|---|---|---|")
        for name, r in out.items():
            print(f"| {name} | {params[name]:,} | {x[name].shape[1]} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} |")
    return {name: r["mean"] for name, r in out.items()} | {f"{name}_ci95": r["ci95"] for name, r in out.items()}
