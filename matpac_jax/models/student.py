"""A trained S-SONDO student behind ``load_model`` (matpac_jax.load): ``save_student`` (called at the end of
distillation) writes ``WORKDIR/student`` as a model directory (matpac_jax.saved_model, kind 'student': the spec holds
the ``student`` and ``audio`` config sections, the weights the backbone's ``params`` and ``batch_stats``);
``load_model(directory).embed(wave, sample_rate)`` gives its embeddings; distill.export turns it into ONNX.

A few compiled programs serve every clip length, as for the ViT encoder (matpac_jax.inference, whose ``bucket`` and
``TRACES`` this uses: ``TRACES['student']`` counts the programs). A clip is zero-padded to the frame bucket of its
length (four per octave, at least ``MIN_FRAME_BUCKET`` frames), clips of one bucket are embedded together in batches
of at most ``batch_size`` clips and ``MEL_BATCH_SAMPLES`` samples padded to a power of two (zero rows): a bucket costs
at most 1 + log2(batch_size) programs over a whole run, whatever the number of lengths. The log-mel frames inside
the clip are the unpadded ones (no centring), and the backbone gets each clip's true frame count: every convolution
across time sees zeros past it and every pooling over time leaves it out (models.padding), so each clip's embedding
is its unpadded one up to float rounding, not bit for bit (the masked program sums in other orders). Measured on
random-initialised students (tests/test_student_buckets.py; max |padded - unpadded| / max |unpadded| per clip, clips
of 1 to 144 frames in buckets of 64 to 160 frames, CPU float32): at most 4.5e-7 for MobileNetV3 and ERes2Net, 2.1e-7
for DyMN. Bit for bit: the rows beside zero rows of batch padding (rows do not interact at inference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from matpac_jax.audio.frontend import LogMelConfig, log_mel, num_frames, num_samples_for_frames
from matpac_jax.audio.io import resample
from matpac_jax.fileio import sha256_arrays
from matpac_jax.models.buckets import MEL_BATCH_SAMPLES, MIN_FRAME_BUCKET, TRACES, bucket
from matpac_jax.models.students import make_student
from matpac_jax.saved_model import read_model_dir, write_model_dir
from matpac_jax.trees import flatten

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


def _embed_program(backbone, frontend: LogMelConfig, variables: dict, wave: jax.Array, frames: jax.Array):
    """wave [N, samples] (zero-padded past each row's end) -> embeddings [N, d], pooled over each row's first
    ``frames[i]`` log-mel frames."""
    TRACES["student"] += 1
    return backbone.apply(variables, log_mel(wave, frontend), frames=frames)


# One program per (backbone, front-end, bucket, batch size), shared by every Student of that architecture.
_embed_jit = jax.jit(_embed_program, static_argnums=(0, 1))


def padded_batches(frames: list[int], batch_size: int, min_bucket: int = MIN_FRAME_BUCKET, max_samples=None, cfg=None):
    """Yields (bucket frames, rows of ``frames`` in it, padded batch size) covering every clip once: clips grouped by
    frame bucket (``bucket(max(t, min_bucket), 4)``), at most ``batch_size`` per batch (and, with ``max_samples``, at
    most that many waveform samples of front-end ``cfg`` unless one clip is longer), each batch padded to the next
    power of two; so a bucket costs at most 1 + log2(batch_size) programs over any number of calls."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(frames):
        groups.setdefault(bucket(max(t, min_bucket), 4), []).append(i)
    for frames_b, idx in sorted(groups.items()):
        cap = max(1, 1 << (max(1, batch_size).bit_length() - 1))  # a power of two
        if max_samples is not None:
            cap = min(cap, 1 << max(0, (max_samples // num_samples_for_frames(frames_b, cfg)).bit_length() - 1))
        for s in range(0, len(idx), cap):
            part = idx[s : s + cap]
            yield frames_b, part, bucket(len(part))


class Student:
    """A student backbone with its front-end: ``embed(wave, sample_rate)`` -> {'clip': [B, d]} (any rate: resampled
    to the student's, soxr HQ; the whole clip is pooled, so there are no frame embeddings)."""

    frame_rate = None  # the backbone pools over the whole clip

    def __init__(self, config, variables: dict):
        self.config = config  # {'student', 'audio'}
        self.backbone = make_student(config.student).backbone
        self.frontend = LogMelConfig.from_audio_config(config.audio)
        self.variables = jax.tree.map(jnp.asarray, variables)

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
        """The shortest clip ``embed`` takes: one analysis window, or as many as the backbone needs (ERes2Net: 17
        frames, two time steps for TSTP's standard deviation after its 16-fold downsampling)."""
        return num_samples_for_frames(self.backbone.min_frames, self.frontend)

    @functools.cached_property
    def embedding_dim(self) -> int:
        """The embedding's size, from the shapes of one forward pass (traced once per Student, nothing compiled)."""
        wave = jax.ShapeDtypeStruct((1, int(self.config.audio.seconds * self.sample_rate)), jnp.float32)
        return int(
            jax.eval_shape(lambda w: self.backbone.apply(self.variables, log_mel(w, self.frontend)), wave).shape[-1]
        )

    def describe(self) -> dict:
        return {"kind": "student", **self.config.to_dict()}

    def weights_digest(self) -> str:
        return sha256_arrays(flatten(jax.device_get(self.variables), leaf=np.asarray))

    def _clips(self, wave, sample_rate: int | None) -> list[np.ndarray]:
        if isinstance(wave, list | tuple):
            clips = [np.asarray(w, np.float32) for w in wave]
        else:
            clips = list(np.atleast_2d(np.asarray(wave, np.float32)))
        if sample_rate is not None and sample_rate != self.sample_rate:
            clips = [resample(c, sample_rate, self.sample_rate) for c in clips]
        for c in clips:
            if c.ndim != 1 or c.shape[0] < self.min_samples:
                need = f"1-D clips of at least {self.min_samples} samples at {self.sample_rate} Hz"
                raise ValueError(f"expected {need}, got shape {c.shape}")
        return clips

    def _embed_all(self, clips: list[np.ndarray], batch_size: int) -> np.ndarray:
        """[len(clips), d] for clips of any lengths (at the front-end's rate): see the module docstring."""
        cfg = self.frontend
        frames = [num_frames(c.shape[0], cfg) for c in clips]
        pending = []
        for frames_b, part, size in padded_batches(frames, batch_size, MIN_FRAME_BUCKET, MEL_BATCH_SAMPLES, cfg):
            samples = num_samples_for_frames(frames_b, cfg)
            wave = np.zeros((size, samples), np.float32)
            count = np.full(size, frames_b, np.int32)  # zero rows: pooled over the whole bucket, then dropped
            for row, i in enumerate(part):
                n = min(clips[i].shape[0], samples)  # samples past the last full frame are never read
                wave[row, :n] = clips[i][:n]
                count[row] = frames[i]
            pending.append((part, _embed_jit(self.backbone, cfg, self.variables, wave, count)))
        out = np.zeros((len(clips), self.embedding_dim), np.float32)
        for part, emb in pending:
            out[part] = np.asarray(emb)[: len(part)]
        return out

    def embed(self, wave, sample_rate: int | None = None, batch_size: int = 64) -> dict:
        """{'clip': [B, d]} for clips of one length ([B, samples] or [samples]), ``batch_size`` clips per call."""
        clips = self._clips(wave, sample_rate)
        if len({c.shape[0] for c in clips}) > 1:
            raise ValueError("embed() takes clips of one length ([B, samples]); embed_clips() takes a list of lengths")
        return {"clip": self._embed_all(clips, batch_size)}

    def embed_clips(self, waves, sample_rate: int | None = None, batch_size: int = 64) -> list[dict]:
        """Per clip of any length {'clip': [d]}: clips of one length bucket are embedded together."""
        return [{"clip": e} for e in self._embed_all(self._clips(list(waves), sample_rate), batch_size)]
