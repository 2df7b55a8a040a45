"""A trained S-SONDO student outside the trainer: ``save_student`` (called at the end of distillation) writes
``WORKDIR/student/{student.json, variables.msgpack}``; ``Student.load(directory).embed(wave, sample_rate)`` gives its
embeddings; distill.export turns it into ONNX."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from matpac_jax.audio.frontend import LogMelConfig, log_mel, num_frames
from matpac_jax.audio.io import resample
from matpac_jax.distill.students import make_student


def save_student(directory: str, config, state) -> str:
    """``student.json`` (the student and front-end config) and ``variables.msgpack`` (backbone params and BatchNorm
    statistics, float32) of a trained student; the projection head is dropped (SPEC §6)."""
    os.makedirs(directory, exist_ok=True)
    host = jax.device_get({"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]})
    with open(os.path.join(directory, "variables.msgpack.tmp"), "wb") as f:
        f.write(serialization.to_bytes(host))
    os.replace(os.path.join(directory, "variables.msgpack.tmp"), os.path.join(directory, "variables.msgpack"))
    meta = {"student": config.student.to_dict(), "audio": config.audio.to_dict(), "step": int(state.step)}
    with open(os.path.join(directory, "student.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return directory


class Student:
    """A student backbone with its front-end: ``embed(wave, sample_rate)`` -> embeddings [B, d] (any rate: resampled
    to the student's, soxr HQ; the whole clip is pooled). ``Student.load(WORKDIR/student)`` for a trained one."""

    def __init__(self, config, variables: dict):
        self.config = config  # {'student', 'audio'}
        self.backbone = make_student(config.student).backbone
        self.frontend = LogMelConfig.from_audio_config(config.audio)
        self.variables = jax.tree.map(jnp.asarray, variables)
        self._embed = jax.jit(lambda v, w: self.backbone.apply(v, log_mel(w, self.frontend)))

    @classmethod
    def load(cls, directory: str) -> Student:
        import ml_collections as mlc

        with open(os.path.join(directory, "student.json")) as f:
            config = mlc.ConfigDict(json.load(f))
        shapes = jax.eval_shape(cls._init_fn(config), jax.random.key(0))
        template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
        with open(os.path.join(directory, "variables.msgpack"), "rb") as f:
            return cls(config, serialization.from_bytes(template, f.read()))

    @staticmethod
    def _init_fn(config):
        """key -> the backbone's variables as the distillation state initialises them (the whole model's init with
        that key: parameters are drawn per module path, so the head's size does not change the backbone's)."""
        model = make_student(config.student)
        fe = LogMelConfig.from_audio_config(config.audio)
        mel = jnp.zeros((1, fe.n_mels, num_frames(int(config.audio.seconds * fe.sample_rate), fe)))

        def init(key):
            v = model.init({"params": key, "dropout": key}, mel)
            return {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}

        return init

    @staticmethod
    def initial_variables(config, seed: int) -> dict:
        """The backbone's initial variables for ``seed`` (``DistillState`` starts from ``key(config.seed)``)."""
        return jax.device_get(jax.jit(Student._init_fn(config))(jax.random.key(seed)))

    @property
    def sample_rate(self) -> int:
        return self.frontend.sample_rate

    def embed(self, wave, sample_rate: int | None = None, batch_size: int = 64) -> np.ndarray:
        wave = np.atleast_2d(np.asarray(wave, np.float32))
        if sample_rate is not None and sample_rate != self.sample_rate:
            wave = np.stack([resample(w, sample_rate, self.sample_rate) for w in wave])
        out = [
            np.asarray(self._embed(self.variables, wave[i : i + batch_size])) for i in range(0, len(wave), batch_size)
        ]
        return np.concatenate(out)
