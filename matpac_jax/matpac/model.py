"""The MATPAC / MATPAC++ network: which modules exist and how student and teacher tokens flow (SPEC §2–§3).

Parameters are two plain pytrees:
  student  {'tokenizer', 'encoder', 'predictor', 'cls_head'}   (trained)
  teacher  {'encoder', 'cls_head'}                             (EMA shadows, never differentiated)
The teacher shares the student's tokenizer (patch embedding, positions, CLS token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from matpac_jax.matpac.cls_head import ClsHead
from matpac_jax.matpac.objective import random_masking
from matpac_jax.matpac.predictor import Predictor
from matpac_jax.models.vit import Tokenizer, Transformer


def gather_tokens(tokens: jax.Array, ids: jax.Array) -> jax.Array:
    """tokens [B, N, D], ids [B, n] -> [B, n, D]."""
    return jnp.take_along_axis(tokens, ids[..., None], axis=1)


def with_cls(cls: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.concatenate(
        [jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[2])), tokens], axis=1
    )


def reinit_mlp_xavier(head: dict, rng: jax.Array) -> dict:
    """A cls head's parameters with every MLP kernel re-drawn xavier-uniform and every MLP bias zero; the
    weight-normalised last layer (``weight_v``, ``weight_g``) is kept as it is."""
    out = dict(head)
    names = sorted(k for k in head if k.startswith("mlp_"))
    for name, key in zip(names, jax.random.split(rng, len(names)), strict=True):
        kernel = head[name]["kernel"]
        out[name] = {
            "kernel": jax.nn.initializers.xavier_uniform()(key, kernel.shape, kernel.dtype),
            "bias": jnp.zeros_like(head[name]["bias"]),
        }
    return out


@dataclasses.dataclass(frozen=True)
class MatpacModel:
    tokenizer: Tokenizer
    encoder: Transformer
    teacher_encoder: Transformer
    predictor: Predictor
    cls_head: ClsHead
    n_mels: int
    crop_frames: int
    teacher_head_init: str = "copy_initial"

    @classmethod
    def from_config(cls, config) -> MatpacModel:
        """Build from config.model and config.audio (ConfigDicts)."""
        m, a = config.model, config.audio
        dtype = jnp.dtype(m.dtype)
        impl = m.attn_impl or None
        p = m.patch
        if a.n_mels % p or a.crop_frames % p:
            raise ValueError(
                f"config.audio.n_mels ({a.n_mels}) and config.audio.crop_frames ({a.crop_frames}) "
                f"must be multiples of config.model.patch ({p})"
            )
        grid_f, grid_t = a.n_mels // p, a.crop_frames // p
        e, pr, h = m.encoder, m.predictor, m.cls_head
        trunk = dict(attn_impl=impl, remat=m.remat, attn_pad_to=m.attn_pad_to, scan_layers=m.scan_layers)
        encoder = Transformer(e.dim, e.depth, e.heads, e.mlp_ratio, dtype, **trunk)
        return cls(
            tokenizer=Tokenizer(e.dim, p, grid_f, grid_t, dtype),
            encoder=encoder,
            teacher_encoder=encoder,
            predictor=Predictor(
                pr.dim, e.dim, pr.depth, pr.heads, pr.mlp_ratio, m.mcl_heads, grid_f, grid_t, dtype, **trunk
            ),
            cls_head=ClsHead(h.hidden, h.bottleneck, h.prototypes, dtype),
            n_mels=a.n_mels,
            crop_frames=a.crop_frames,
            teacher_head_init=h.teacher_init,
        )

    @property
    def num_patches(self) -> int:
        return self.tokenizer.grid_freq * self.tokenizer.grid_time

    def init(self, rng: jax.Array) -> tuple[dict, dict]:
        """Fresh (student, teacher) parameters. The teacher encoder is initialised independently (not a copy).

        Cls heads, 'copy_initial' (the reference, SPEC §3; aurianworld/matpac training_matpac/models/model.py:809,
        :814 re-initialise the student head, :361-363 copy ``weight_v``): one head is drawn (MLP N(0, 0.02²), zero
        biases, torch's default uniform ``weight_v``, g = 1) and becomes the teacher head; the student head is the same
        head with its three MLP kernels re-drawn xavier-uniform (biases zero), so ``weight_v`` and g start identical.
        'copy': the student head starts equal to the teacher head.
        """
        k_tok, k_enc, k_teach, k_pred, k_head_t, k_head_s = jax.random.split(rng, 6)
        d = self.tokenizer.dim
        mel = jnp.zeros((1, self.n_mels, self.crop_frames), jnp.float32)
        tokens = jnp.zeros((1, 1 + self.num_patches, d), jnp.float32)
        n_vis = 2
        ids = jnp.arange(self.num_patches)[None]
        teacher_head = self.cls_head.init(k_head_t, jnp.zeros((1, d), jnp.float32))["params"]
        if self.teacher_head_init == "copy_initial":
            student_head = reinit_mlp_xavier(teacher_head, k_head_s)
        elif self.teacher_head_init == "copy":
            student_head = teacher_head
        else:
            raise ValueError(
                f"config.model.cls_head.teacher_init must be 'copy_initial' or 'copy', got {self.teacher_head_init!r}"
            )
        student = {
            "tokenizer": self.tokenizer.init(k_tok, mel)["params"],
            "encoder": self.encoder.init(k_enc, tokens)["params"],
            "predictor": self.predictor.init(k_pred, tokens[:, : 1 + n_vis], ids[:, :n_vis], ids[:, n_vis:])["params"],
            "cls_head": student_head,
        }
        teacher = {"encoder": self.teacher_encoder.init(k_teach, tokens)["params"], "cls_head": teacher_head}
        return student, jax.tree.map(lambda x: jnp.array(x, jnp.float32), teacher)

    def tokenize(self, params: dict, mel: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.tokenizer.apply({"params": params["tokenizer"]}, mel)

    def forward(
        self,
        student: dict,
        teacher: dict,
        mel: jax.Array,
        rng: jax.Array,
        mask_ratio: float,
        ids: tuple[jax.Array, jax.Array] | None = None,
    ) -> dict:
        """One masked-prediction pass on log-mel crops mel [B, F, T]; masks drawn from ``rng``, or given as
        ``ids = (ids_keep [B, Nv], ids_mask [B, Nm])`` (gradient accumulation slices one batch's masks).

        Returns predictions [K, B, Nm, D] for the masked positions and teacher targets z [B, Nm, D] (CLS dropped,
        after the teacher's final norm, no gradient), in the same token order.
        """
        tokens, cls = self.tokenize(student, mel)  # [B, N, D] with positions
        ids_keep, ids_mask = ids if ids is not None else random_masking(rng, mel.shape[0], tokens.shape[1], mask_ratio)
        latents = self.encoder.apply({"params": student["encoder"]}, with_cls(cls, gather_tokens(tokens, ids_keep)))
        preds = self.predictor.apply({"params": student["predictor"]}, latents, ids_keep, ids_mask)
        teacher_in = jax.lax.stop_gradient(with_cls(cls, gather_tokens(tokens, ids_mask)))
        targets = self.teacher_encoder.apply({"params": teacher["encoder"]}, teacher_in)[:, 1:]
        return {"preds": preds, "targets": jax.lax.stop_gradient(targets), "ids_mask": ids_mask}

    def student_logits(self, student: dict, x: jax.Array) -> jax.Array:
        return self.cls_head.apply({"params": student["cls_head"]}, x)

    def teacher_logits(self, teacher: dict, z: jax.Array) -> jax.Array:
        return self.cls_head.apply({"params": teacher["cls_head"]}, z)

    def encode(self, student: dict, mel: jax.Array, return_layers: bool = False):
        """Unmasked student encoder on mel [B, F, T] (T a multiple of the patch, ≤ crop): [B, 1+N, D] (CLS first)."""
        tokens, cls = self.tokenize(student, mel)
        return self.encoder.apply({"params": student["encoder"]}, with_cls(cls, tokens), return_layers=return_layers)
