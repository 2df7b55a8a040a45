"""A trained S-SONDO student behind ``load_model`` (matpac_jax.load): ``save_student`` (called at the end of
distillation) writes ``WORKDIR/student`` as a model directory (matpac_jax.saved_model, kind 'student': the spec holds
the ``student`` and ``audio`` config sections, the weights the backbone's ``params`` and ``batch_stats``);
``load_model(directory).embed(wave, sample_rate)`` gives its embeddings; distill.export turns it into ONNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from matpac_jax.audio.frontend import LogMelConfig, log_mel, num_frames
from matpac_jax.audio.io import resample
from matpac_jax.distill.students import make_student
from matpac_jax.fileio import sha256_arrays
from matpac_jax.saved_model import flatten, read_model_dir, write_model_dir

_FIX = "save the student again (a distillation run writes WORKDIR/student at its end) or restore the directory"


def _check_leaf(template: np.ndarray, value) -> None:
    if np.shape(value) != template.shape:
        raise ValueError(f"an array of shape {np.shape(value)} where the student has {template.shape}")


def save_student(directory: str, config, state) -> str:
    """The backbone of a distillation state (params and BatchNorm statistics, float32) with the config's student and
    front-end, as a model directory; the projection head is dropped (SPEC §6)."""
    host = jax.device_get({"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]})
    return Student(student_spec(config), host).save(directory, step=int(state.step))


def student_spec(config) -> mlc.ConfigDict:
    """The ``student`` and ``audio`` sections of a run's config (a ConfigDict or a dict)."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k))
    sections = {k: get(k) for k in ("student", "audio")}
    return mlc.ConfigDict({k: v.to_dict() if hasattr(v, "to_dict") else dict(v) for k, v in sections.items()})


class Student:
    """A student backbone with its front-end: ``embed(wave, sample_rate)`` -> {'clip': [B, d]} (any rate: resampled
    to the student's, soxr HQ; the whole clip is pooled, so there are no frame embeddings)."""

    frame_rate = None  # the backbone pools over the whole clip

    def __init__(self, config, variables: dict):
        self.config = config  # {'student', 'audio'}
        self.backbone = make_student(config.student).backbone
        self.frontend = LogMelConfig.from_audio_config(config.audio)
        self.variables = jax.tree.map(jnp.asarray, variables)
        self._embed = jax.jit(lambda v, w: self.backbone.apply(v, log_mel(w, self.frontend)))

    @classmethod
    def from_saved(cls, spec: dict, weights: dict, where: str = "the student") -> Student:
        """A student from a model directory's spec and weights, checked against the student the spec describes:
        ValueError naming ``where`` and the fix for anything that does not fit."""
        try:
            config = mlc.ConfigDict({k: spec[k] for k in ("student", "audio")})
            shapes = jax.eval_shape(cls._init_fn(config), jax.random.key(0))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where} does not describe a student ({type(e).__name__}: {e}): {_FIX}") from None
        template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
        try:
            if set(flatten(weights)) != set(flatten(template)):
                raise KeyError(f"parameters {sorted(set(flatten(weights)) ^ set(flatten(template)))[:5]}... differ")
            variables = jax.tree.map(lambda t, w: np.asarray(w, t.dtype), template, weights)
            jax.tree.map(_check_leaf, template, weights)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{where}: weights that are not this student's ({type(e).__name__}: {e}): {_FIX}"
            ) from None
        return cls(config, variables)

    @classmethod
    def load(cls, directory: str) -> Student:
        """A student model directory (``save_student``'s); ValueError naming the file and the fix otherwise."""
        kind, spec, weights = read_model_dir(directory)
        if kind != "student":
            raise ValueError(f"{directory} holds a {kind!r} model, not a student: {_FIX}")
        return cls.from_saved(spec, weights, where=directory)

    def save(self, directory: str, step: int | None = None) -> str:
        spec = self.config.to_dict() | ({} if step is None else {"step": step})
        return write_model_dir(directory, "student", spec, jax.device_get(self.variables))

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

    # --- What every loaded model tells (matpac_jax.load.Model).

    @property
    def sample_rate(self) -> int:
        return self.frontend.sample_rate

    @property
    def min_samples(self) -> int:
        return self.frontend.n_fft

    @property
    def embedding_dim(self) -> int:
        wave = jax.ShapeDtypeStruct((1, int(self.config.audio.seconds * self.sample_rate)), jnp.float32)
        return int(
            jax.eval_shape(lambda w: self.backbone.apply(self.variables, log_mel(w, self.frontend)), wave).shape[-1]
        )

    def describe(self) -> dict:
        return {"kind": "student", **self.config.to_dict()}

    def weights_digest(self) -> str:
        return sha256_arrays(flatten(jax.device_get(self.variables)))

    def _clips(self, wave, sample_rate: int | None) -> list[np.ndarray]:
        if isinstance(wave, list | tuple):
            clips = [np.asarray(w, np.float32) for w in wave]
        else:
            clips = list(np.atleast_2d(np.asarray(wave, np.float32)))
        if sample_rate is not None and sample_rate != self.sample_rate:
            clips = [resample(c, sample_rate, self.sample_rate) for c in clips]
        for c in clips:
            if c.ndim != 1 or c.shape[0] < self.min_samples:
                raise ValueError(f"expected 1-D clips of at least {self.min_samples} samples at {self.sample_rate} "
                                 f"Hz, got shape {c.shape}")  # fmt: skip
        return clips

    def embed(self, wave, sample_rate: int | None = None, batch_size: int = 64) -> dict:
        """{'clip': [B, d]} for clips of one length ([B, samples] or [samples])."""
        clips = self._clips(wave, sample_rate)
        if len({c.shape[0] for c in clips}) > 1:
            raise ValueError("embed() takes clips of one length ([B, samples]); embed_clips() takes a list of lengths")
        wave = np.stack(clips)
        out = [
            np.asarray(self._embed(self.variables, wave[i : i + batch_size])) for i in range(0, len(wave), batch_size)
        ]
        return {"clip": np.concatenate(out)}

    def embed_clips(self, waves, sample_rate: int | None = None) -> list[dict]:
        """Per clip of any length {'clip': [d]} (clips of one length are embedded together)."""
        clips = self._clips(list(waves), sample_rate)
        out: list = [None] * len(clips)
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(clips):
            by_length.setdefault(c.shape[0], []).append(i)
        for idx in by_length.values():
            emb = self.embed(np.stack([clips[i] for i in idx]))["clip"]
            for row, i in enumerate(idx):
                out[i] = {"clip": emb[row]}
        return out
