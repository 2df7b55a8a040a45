"""The ViT encoder behind ``load_model`` (matpac_jax.load) for MATPAC / MATPAC++ encoders, ours or converted
published ones, with or without the AudioSet head (SPEC §5, "precise" mode):

    from matpac_jax import load_model
    enc = load_model("runs/pp")                        # a training workdir, one of its checkpoints/<step>, or a
    out = enc.embed(wave, sample_rate=44_100)           # model directory written by `python -m matpac_jax.convert`
    out["clip"]    # [B, 3840]       time-mean of the last layer's frame features
    out["frames"]  # [B, T, 3840]    one every 160 ms: the 5 frequency tokens of a time step, concatenated
    enc.embed(wave, 16_000, layers=True)["layers"]  # [B, 12, T, 3840], the last one after the final LayerNorm
    enc.embed_clips([wave_a, wave_b], 16_000)       # clips of different lengths together: [{'clip', 'frames'}, ...]

Audio at any rate is resampled to 16 kHz (soxr HQ), turned into the log-mel of SPEC §1 on the device, and cut into
chunks of ``crop_frames`` (608) frames; the last chunk is zero-padded to a multiple of 16 frames and sees the
positional table truncated along time. Chunks of all clips are encoded together in jitted batches of ``chunk_batch``
chunks split over every local device, so the memory needed is bounded whatever the audio length (1 s to hours) and
all devices work. Padding frames of the last chunk are part of the output, as in the published extractor.

A few compiled programs serve every clip length (``TRACES`` counts them). The waveform is zero-padded to a length
bucket (four per octave of frames) before the log-mel, and only the frames inside the true samples are kept: framing
has no centring and the normalisation is a constant, so they are the unpadded frames. A last chunk of ``p`` patches
is encoded in a chunk of the next power of two of patches (``crop_frames / 16`` at most) with the extra tokens
masked out of the attention, so its real tokens see exactly the tokens they saw unpadded. Batches are padded to
powers of two.

``Encoder.save`` writes a model directory (matpac_jax.saved_model, kind 'vit': the spec is the encoder's shape and
front-end; the weights ``tokenizer/...``, ``encoder/...``, optionally ``head/...`` for the 527-class AudioSet head and
``probe/...``). The positions are the sin-cos table of the chunk's grid unless the weights hold ``tokenizer/pos_embed``
[F·T, D] (a model fine-tuned from a shorter pretraining crop, m2d's resampled table; an imported non-sin-cos table).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from matpac_jax.audio.frontend import LogMelConfig, log_mel, num_frames, num_samples_for_frames
from matpac_jax.audio.io import resample
from matpac_jax.fileio import sha256_arrays
from matpac_jax.models.buckets import MEL_BATCH_SAMPLES, MIN_FRAME_BUCKET, TRACES, bucket
from matpac_jax.models.vit import Tokenizer, Transformer
from matpac_jax.saved_model import write_model_dir
from matpac_jax.trees import flatten


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Everything but the weights: the ViT's shape and the audio front-end."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch: int = 16
    n_mels: int = 80
    crop_frames: int = 608
    frontend: LogMelConfig = LogMelConfig()

    @classmethod
    def from_config(cls, config) -> EncoderSpec:
        e = config.model.encoder
        a = config.audio
        frontend = LogMelConfig.from_audio_config(a)
        return cls(e.dim, e.depth, e.heads, e.mlp_ratio, config.model.patch, a.n_mels, a.crop_frames, frontend)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> EncoderSpec:
        """The spec of a ``model.json``, every field's type and range checked (ValueError naming the field): a
        ``patch: 0`` or ``dim: "64"`` fails here, not at the first embed."""
        if not isinstance(d, dict) or not isinstance(d.get("frontend"), dict):
            raise ValueError("the spec is not an object with a 'frontend' object")
        _same_keys("spec", d, [f.name for f in dataclasses.fields(cls)])
        frontend = [f.name for f in dataclasses.fields(LogMelConfig)]
        _same_keys("frontend", d["frontend"], frontend, optional=set(frontend) - {*_FRONTEND_INTS, *_FRONTEND_FLOATS})
        ints = ("dim", "depth", "heads", "patch", "n_mels", "crop_frames")
        for where, obj, names in (("", d, ints), ("frontend.", d["frontend"], _FRONTEND_INTS)):
            for k in names:
                if type(obj[k]) is not int or obj[k] <= 0:
                    raise ValueError(f"{where}{k} = {obj[k]!r}: expected an integer > 0")
        for where, obj, names in (("", d, ("mlp_ratio",)), ("frontend.", d["frontend"], _FRONTEND_FLOATS)):
            for k in names:
                nullable = k in ("norm_mean", "norm_std") and obj[k] is None
                if not nullable and (type(obj[k]) not in (int, float) or not np.isfinite(obj[k])):
                    raise ValueError(f"{where}{k} = {obj[k]!r}: expected a finite number")
        if d["n_mels"] % d["patch"] or d["crop_frames"] % d["patch"] or d["dim"] % d["heads"]:
            raise ValueError(
                f"patch {d['patch']} must divide n_mels {d['n_mels']} and crop_frames {d['crop_frames']}, and heads "
                f"{d['heads']} must divide dim {d['dim']}"
            )
        if d["frontend"]["n_mels"] != d["n_mels"] or d["mlp_ratio"] <= 0 or d["frontend"]["norm_std"] == 0:
            raise ValueError("frontend.n_mels must equal n_mels, mlp_ratio be > 0 and frontend.norm_std not 0")
        return cls(**{**d, "frontend": LogMelConfig(**d["frontend"])})


_FRONTEND_INTS = ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels")
_FRONTEND_FLOATS = ("f_min", "f_max", "log_offset", "norm_mean", "norm_std")


def _same_keys(where: str, obj: dict, names: list[str], optional: set = frozenset()) -> None:
    """No unknown field; none missing but the ``optional`` ones (added later, their defaults what was used before)."""
    missing, extra = sorted(set(names) - set(obj) - set(optional)), sorted(set(obj) - set(names))
    if missing or extra:
        raise ValueError(f"{where}: missing fields {missing}, unknown fields {extra}")


def _log_mel_program(wave, cfg: LogMelConfig):
    TRACES["log_mel"] += 1
    return log_mel(wave, cfg)


_log_mel_jit = jax.jit(_log_mel_program, static_argnums=1)


def _encode_chunks(spec: EncoderSpec, params: dict, mel: jax.Array, patches: jax.Array, layers: bool) -> jax.Array:
    """mel chunks [N, F, t] (t a patch multiple), chunk i with ``patches[i]`` real patches along time ->
    [N, L, t/patch, Fp*D] (L = depth, or 1: the last layer). The tokens go in time-major order (attention does not
    depend on the order: positions are added before), so that the padding patches of each chunk are a suffix that
    ``kv_lengths`` masks: the real tokens' outputs are those of the chunk cut after its real patches."""
    TRACES["encoder"] += 1
    fp = spec.n_mels // spec.patch
    stored = "pos_embed" in params["tokenizer"]  # a table kept with the weights (models.positions), else sin-cos
    tokenizer = Tokenizer(spec.dim, spec.patch, fp, spec.crop_frames // spec.patch, stored_positions=stored)
    encoder = Transformer(spec.dim, spec.depth, spec.heads, spec.mlp_ratio)
    tokens, cls = tokenizer.apply({"params": params["tokenizer"]}, mel)  # [N, Fp*Tp, D] freq-major
    n, _, d = tokens.shape
    tokens = jnp.transpose(tokens.reshape(n, fp, -1, d), (0, 2, 1, 3)).reshape(n, -1, d)  # time-major
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)).astype(tokens.dtype), tokens], axis=1)
    kv = 1 + fp * patches.astype(jnp.int32)
    last, every = encoder.apply({"params": params["encoder"]}, x, return_layers=True, kv_lengths=kv)
    stack = jnp.stack(every if layers else [last], axis=1)[:, :, 1:]  # drop CLS: [N, L, Tp*Fp, D]
    return stack.reshape(n, stack.shape[1], -1, fp * d)  # a time step's Fp tokens, concatenated in frequency order


@functools.lru_cache(maxsize=16)
def _sharded_encoder(mesh):
    """``_encode_chunks`` with the chunks split over ``mesh``'s devices and the parameters replicated; one per mesh, so
    that every Encoder on those devices shares the compiled programs."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    return jax.jit(_encode_chunks, static_argnums=(0, 4), in_shardings=(replicated, split, split), out_shardings=split)


def weights_digest(params: dict) -> str:
    """Content digest of the parameters the embeddings depend on (``tokenizer`` and ``encoder``): the same weights give
    the same digest whatever file they came from, other weights another one."""
    used = {k: params[k] for k in ("tokenizer", "encoder") if k in params}
    return sha256_arrays(flatten(jax.device_get(used), leaf=np.asarray))


def weight_template(spec: EncoderSpec, stored_positions: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """'/'-path -> shape and dtype of the ``tokenizer`` and ``encoder`` weights of the ViT ``spec`` describes
    (``jax.eval_shape`` of their init: nothing is computed)."""
    fp, tp = spec.n_mels // spec.patch, spec.crop_frames // spec.patch
    tokenizer = Tokenizer(spec.dim, spec.patch, fp, tp, stored_positions=stored_positions)
    encoder = Transformer(spec.dim, spec.depth, spec.heads, spec.mlp_ratio)
    key = jax.random.key(0)
    mel = jax.ShapeDtypeStruct((1, spec.n_mels, spec.crop_frames), jnp.float32)
    x = jax.ShapeDtypeStruct((1, 1 + fp * tp, spec.dim), jnp.float32)
    shapes = {
        "tokenizer": jax.eval_shape(tokenizer.init, key, mel)["params"],
        "encoder": jax.eval_shape(encoder.init, key, x)["params"],
    }
    return flatten(shapes)


def _optional_shapes(spec: EncoderSpec, flat: dict) -> dict[str, tuple]:
    """Shapes of the optional groups present in ``flat``: the AudioSet head (all four arrays or none) and the probe;
    their class count is the one their arrays agree on (a stored [C] bias, else the kernel's last axis)."""

    def classes(group: str) -> int:
        bias, kernel = np.shape(flat.get(f"{group}/bias", ())), np.shape(flat.get(f"{group}/kernel", ()))
        return bias[0] if len(bias) == 1 else kernel[-1] if len(kernel) == 2 else 1

    shapes: dict[str, tuple] = {}
    if any(k.startswith("head/") for k in flat):
        c, d = classes("head"), spec.dim
        shapes |= {"head/norm_mean": (d,), "head/norm_var": (d,), "head/kernel": (d, c), "head/bias": (c,)}
    if any(k.startswith("probe/") for k in flat):
        kernel, inputs = np.shape(flat.get("probe/kernel", ())), (spec.dim, spec.dim * spec.n_mels // spec.patch)
        width = kernel[0] if len(kernel) == 2 and kernel[0] in inputs else spec.dim  # on the CLS or the frames
        shapes |= {"probe/kernel": (width, classes("probe")), "probe/bias": (classes("probe"),)}
    return shapes


class Encoder:
    """A loaded encoder; ``params`` = {'tokenizer', 'encoder'[, 'head'][, 'probe']} (see the module docstring)."""

    @classmethod
    def from_saved(cls, spec: dict, weights: dict, where: str = "the encoder") -> Encoder:
        """An encoder from a model directory's spec and weights, checked against the ViT the spec describes: every
        field's type and range, and every weight's shape and dtype against ``weight_template`` and the optional
        groups (``_optional_shapes``), no weight missing or unknown. ValueError naming ``where`` and the problem."""
        fix = "write the directory again (convert, a training or fine-tuning run's end)"
        try:
            parsed = EncoderSpec.from_json(spec)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where}/model.json does not describe a ViT encoder ({e}): {fix}") from None
        flat = flatten(weights, leaf=np.asarray)
        want = {k: (v.shape, v.dtype) for k, v in weight_template(parsed, "tokenizer/pos_embed" in flat).items()}
        want |= {k: (shape, np.dtype(np.float32)) for k, shape in _optional_shapes(parsed, flat).items()}
        kept = ("predictor/", "cls_head/", "teacher/cls_head/", "center")  # pretraining groups convert writes back
        teacher = {f"teacher/{k}": v for k, v in want.items() if k.startswith("encoder/")}
        if any(k.startswith("teacher/encoder/") for k in flat):
            want |= teacher
        missing = sorted(set(want) - set(flat))
        unknown = sorted(k for k in set(flat) - set(want) if not k.startswith(kept))
        problems = [f"missing {missing[:4]}"] * bool(missing) + [f"unknown {unknown[:4]}"] * bool(unknown)
        for k in sorted(set(want) & set(flat)):
            shape, dtype = want[k]
            if flat[k].dtype != dtype or flat[k].shape != tuple(shape):
                problems.append(f"{k} is {flat[k].dtype}{list(flat[k].shape)}, expected {dtype}{list(shape)}")
        if problems:
            raise ValueError(f"{where}: weights that are not this ViT's ({'; '.join(problems[:4])}): {fix}")
        return cls(parsed, weights)

    def __init__(self, spec: EncoderSpec, params: dict, chunk_batch: int = 16, devices=None):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.spec = spec
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.array(devices), ("data",))
        self.chunk_batch = chunk_batch
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.device_put(jax.tree.map(jnp.asarray, params), replicated)

    @property
    def chunk_batch(self) -> int:
        return self._chunk_batch

    @chunk_batch.setter
    def chunk_batch(self, value: int) -> None:
        """Chunks per device call, rounded up to a multiple of the device count (each device gets the same share)."""
        n = self.mesh.devices.size
        self._chunk_batch = max(n, -(-int(value) // n) * n)

    def _padded_size(self, n: int) -> int:
        """Chunks per device call for ``n`` chunks: the next power of two, a multiple of the device count, at most
        ``chunk_batch``: a few compiled shapes (log2 of chunk_batch), and one clip is not padded to a full batch."""
        ndev = self.mesh.devices.size
        return min(self.chunk_batch, -(-bucket(n) // ndev) * ndev)

    # --- What every loaded model tells (matpac_jax.load.Model).

    @property
    def sample_rate(self) -> int:
        """The rate the front-end reads; ``embed`` resamples other rates to it."""
        return self.spec.frontend.sample_rate

    @property
    def min_samples(self) -> int:
        """The shortest clip ``embed`` takes (one analysis window)."""
        return self.spec.frontend.n_fft

    @property
    def embedding_dim(self) -> int:
        return (self.spec.n_mels // self.spec.patch) * self.spec.dim

    @property
    def frame_rate(self) -> float:
        """Frame embeddings per second (one per patch of frames: 6.25 for the published 16 kHz / hop 160 / patch 16)."""
        return self.spec.frontend.sample_rate / (self.spec.frontend.hop_length * self.spec.patch)

    def describe(self) -> dict:
        """Everything but the weights (what caches of its embeddings are keyed on, with ``weights_digest``)."""
        return {"kind": "vit", **self.spec.to_json()}

    def weights_digest(self) -> str:
        """``weights_digest`` of these parameters (with ``spec``: what caches of its embeddings are keyed on)."""
        return weights_digest(self.params)

    def save(self, directory: str) -> str:
        """A model directory (saved_model: ``model.json`` + ``weights.npz``, kind 'vit'), written atomically."""
        return write_model_dir(directory, "vit", self.spec.to_json(), jax.device_get(self.params))

    # --- The forward pass.

    def _encode_chunks(self, params: dict, mel: jax.Array, layers: bool) -> jax.Array:
        """mel chunks [N, F, t] (t a patch multiple, no padding patches) -> [N, L, t/patch, Fp*D]."""
        patches = jnp.full((mel.shape[0],), mel.shape[2] // self.spec.patch, jnp.int32)
        return _encode_chunks(self.spec, params, mel, patches, layers)

    def _waves(self, wave, sample_rate: int) -> list[np.ndarray]:
        """float32 clips at the front-end's rate from [B, samples], [samples] or a list of [samples_i], at any rate."""
        if isinstance(wave, list | tuple):
            clips = [np.asarray(w, np.float32) for w in wave]
            if any(c.ndim != 1 for c in clips):
                raise ValueError("expected a list of 1-D waveforms [samples]")
        else:
            wave = np.asarray(wave, np.float32)
            if wave.ndim not in (1, 2):
                raise ValueError(f"expected a waveform [samples] or a batch [B, samples], got shape {wave.shape}")
            clips = list(wave[None] if wave.ndim == 1 else wave)
        rate, need = self.spec.frontend.sample_rate, self.spec.frontend.n_fft
        if sample_rate != rate:
            clips = [resample(c, sample_rate, rate) for c in clips]
        for c in clips:
            if c.shape[0] < need:
                raise ValueError(
                    f"audio of {c.shape[0]} samples at {rate} Hz is shorter than one analysis window ({need} samples)"
                )
        return clips

    def _mels(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """Per clip (float32 [samples] at the front-end's rate) its log-mel [F, T] on the host. Clips are zero-padded
        to the frame bucket of their length and batched by bucket (a power of two of clips, at most
        ``MEL_BATCH_SAMPLES`` samples unless one clip is longer); the frames past each clip's own count are dropped."""
        cfg = self.spec.frontend
        frames = [num_frames(c.shape[0], cfg) for c in clips]
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(frames):
            groups.setdefault(bucket(max(t, MIN_FRAME_BUCKET), 4), []).append(i)
        pending = []
        for frames_b, idx in sorted(groups.items()):
            samples = num_samples_for_frames(frames_b, cfg)
            cap = 1 << max(0, (MEL_BATCH_SAMPLES // samples).bit_length() - 1)
            for s in range(0, len(idx), cap):
                part = idx[s : s + cap]
                batch = np.zeros((bucket(len(part)), samples), np.float32)
                for row, i in enumerate(part):
                    n = min(clips[i].shape[0], samples)  # samples past the last full frame are never read
                    batch[row, :n] = clips[i][:n]
                pending.append((part, _log_mel_jit(batch, cfg)))
        out: list = [None] * len(clips)
        for part, mel in pending:
            host = np.asarray(mel)
            for row, i in enumerate(part):
                out[i] = host[row, :, : frames[i]]
        return out

    def _features(self, mels: list[np.ndarray], layers: bool) -> list[np.ndarray]:
        """Per clip log-mel [F, T] -> its features [L, ceil(T / patch), Fp*D] (numpy): the chunks of every clip,
        grouped by patch bucket, in batches of at most ``chunk_batch`` split over the devices."""
        crop, patch = self.spec.crop_frames, self.spec.patch
        jobs: dict[int, list] = {}
        pieces: list[list] = [[] for _ in mels]
        for i, mel in enumerate(mels):
            for start in range(0, mel.shape[1], crop):
                part = mel[:, start : start + crop]
                patches = -(-part.shape[1] // patch)
                jobs.setdefault(min(crop // patch, bucket(patches)), []).append((i, len(pieces[i]), part, patches))
                pieces[i].append(None)
        run = _sharded_encoder(self.mesh)
        used = {k: self.params[k] for k in ("tokenizer", "encoder")}
        pending = []
        for width, items in sorted(jobs.items()):
            for s in range(0, len(items), self.chunk_batch):
                group = items[s : s + self.chunk_batch]
                size = self._padded_size(len(group))
                batch = np.zeros((size, self.spec.n_mels, width * patch), np.float32)  # zeros: the published padding
                count = np.full(size, width, np.int32)
                for row, (_, _, part, patches) in enumerate(group):
                    batch[row, :, : part.shape[1]] = part
                    count[row] = patches
                pending.append((group, run(self.spec, used, batch, count, layers)))
        for group, feats in pending:
            host = np.asarray(feats)  # [size, L, width, Fp*D]
            for row, (i, c, _, patches) in enumerate(group):
                pieces[i][c] = host[row, :, :patches]
        return [np.concatenate(p, axis=1) for p in pieces]

    def log_mel(self, wave, sample_rate: int = 16_000) -> jax.Array:
        """float waveform(s) [B, samples] or [samples] at any rate -> normalised log-mel [B, F, T] (a device array)."""
        return jnp.asarray(np.stack(self._mels(self._waves(wave, sample_rate))))

    def embed(self, wave, sample_rate: int = 16_000, layers: bool = False) -> dict:
        """{'clip': [B, Fp*D], 'frames': [B, T, Fp*D]} and, with ``layers``, 'layers': [B, depth, T, Fp*D] (numpy)."""
        clips = self._waves(wave, sample_rate)
        if len({c.shape[0] for c in clips}) > 1:
            raise ValueError("embed() takes clips of one length ([B, samples]); embed_clips() takes a list of lengths")
        feats = np.stack(self._features(self._mels(clips), layers))
        frames = feats[:, -1]
        out = {"clip": frames.mean(axis=1), "frames": frames}
        if layers:
            out["layers"] = feats
        return out

    def embed_clips(self, waves, sample_rate: int = 16_000, layers: bool = False) -> list[dict]:
        """Clips of any lengths (a list of [samples_i]) embedded together: per clip {'clip': [Fp*D], 'frames':
        [T_i, Fp*D]} and, with ``layers``, 'layers': [depth, T_i, Fp*D], each what ``embed`` gives for that clip
        alone (up to float rounding)."""
        out = []
        for feats in self._features(self._mels(self._waves(list(waves), sample_rate)), layers):
            one = {"clip": feats[-1].mean(axis=0), "frames": feats[-1]}
            if layers:
                one["layers"] = feats
            out.append(one)
        return out

    def tag(self, wave, sample_rate: int = 16_000) -> np.ndarray:
        """AudioSet class probabilities [B, 527] of a fine-tuned checkpoint with its head (SPEC §5): last-layer tokens
        averaged over frequency, time-mean, BatchNorm (running statistics, no affine, eps 1e-5), linear, softmax.
        Column ``i`` is the ``i``-th AudioSet class sorted by mid (``data.audioset_classes``)."""
        if "head" not in self.params:
            raise ValueError("this encoder has no AudioSet head: tag() needs a fine-tuned checkpoint with head.*")
        frames = self.embed(wave, sample_rate)["frames"].astype(np.float64)  # [B, T, Fp*D]
        b, t, _ = frames.shape
        x = frames.reshape(b, t, -1, self.spec.dim).mean(axis=(1, 2))  # freq-average, then time-mean: [B, D]
        h = {k: np.asarray(v, np.float64) for k, v in jax.device_get(self.params["head"]).items()}
        x = (x - h["norm_mean"]) / np.sqrt(h["norm_var"] + 1e-5)
        logits = x @ h["kernel"] + h["bias"]
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)
