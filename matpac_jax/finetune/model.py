"""The fine-tuned model: the ViT encoder every method shares (models/vit) and the published AudioSet head.

    log-mel [B, F, T] -> Tokenizer (patches + positions, T / patch time patches) -> [CLS; tokens]
      -> Transformer -> tokens (CLS dropped) -> AudioSetHead (token mean, BatchNorm without affine, linear) -> logits

In training the step may pass the visible tokens of m2d's token masking (``keep``, finetune.token_mask); evaluation
passes none and sees every token.

Parameters ``{'tokenizer', 'encoder', 'head'}``, BatchNorm statistics ``{'head': {'mean', 'var'}}``: the encoder's
names are those of ``inference.Encoder`` (and of a pretraining state's student), so pretrained weights load by name.
The positions are constants. From a pretrained encoder (``config.finetune.init_from``, ``positions='pretrained'``, the
default) they are that encoder's table brought to the input's length as m2d does: bicubically resampled when the
fine-tuning crop is longer (992 frames, the published fine-tuned MATPAC++, against 608; nttcslab/m2d
``m2d/runtime_audio.py:153-158``, models.positions), cut when shorter; the model then keeps them with its weights
(``tokenizer/pos_embed``), so a saved fine-tuned model reproduces them. From scratch, or with ``positions='sincos'``,
they are the sin-cos table of the input's length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from matpac_jax.audio.frontend import LogMelConfig
from matpac_jax.finetune.head import AudioSetHead, head_params_for_encoder
from matpac_jax.inference import Encoder, EncoderSpec
from matpac_jax.models.vit import Tokenizer, Transformer


class FinetuneModel(nn.Module):
    tokenizer: Tokenizer
    encoder: Transformer
    head: AudioSetHead

    def __call__(self, mel: jax.Array, train: bool = False, keep: tuple[jax.Array, jax.Array] | None = None):
        """mel [B, F, T] -> logits [B, num_classes] (float32). ``keep`` = (ids [B, L], n_keep) from
        ``token_mask.structured_keep``: only the first ``n_keep`` of the tokens ``ids`` (positions already added)
        follow CLS through the encoder and are averaged by the head (m2d's training-time masking); None: every token."""
        tokens, cls = self.tokenizer(mel)
        b, _, d = tokens.shape
        lengths, n_valid = None, None
        if keep is not None:
            ids, n_valid = keep
            tokens = jnp.take_along_axis(tokens, ids[:, :, None], axis=1)  # [B, L, D]
            lengths = jnp.full((b,), 1 + n_valid, jnp.int32)  # CLS + the visible tokens; the rest is padding
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(tokens.dtype), tokens], axis=1)
        return self.head(self.encoder(x, kv_lengths=lengths)[:, 1:], train, n_valid)

    @classmethod
    def from_config(cls, config) -> FinetuneModel:
        m, a = config.model, config.audio
        dtype = jnp.dtype(m.dtype)
        e, p = m.encoder, m.patch
        trunk = dict(attn_impl=m.attn_impl or None, remat=m.remat, attn_pad_to=m.attn_pad_to, scan_layers=m.scan_layers)
        return cls(
            tokenizer=Tokenizer(e.dim, p, a.n_mels // p, a.crop_frames // p, dtype, stored_positions(config)),
            encoder=Transformer(e.dim, e.depth, e.heads, e.mlp_ratio, dtype, **trunk),
            head=AudioSetHead(config.finetune.num_classes),
        )


def stored_positions(config) -> bool:
    """Whether the model keeps its positions as weights: fine-tuning from a pretrained encoder with its positions."""
    return bool(config.finetune.init_from) and config.finetune.positions == "pretrained"


def encoder_spec(config) -> EncoderSpec:
    """The fine-tuned model's spec as a loaded ViT (its chunk length is the fine-tuning input length)."""
    e, a = config.model.encoder, config.audio
    frontend = LogMelConfig.from_audio_config(a)
    return EncoderSpec(e.dim, e.depth, e.heads, e.mlp_ratio, config.model.patch, a.n_mels, a.crop_frames, frontend)


def as_encoder(config, params: dict, batch_stats: dict) -> Encoder:
    """A fine-tuning state's weights as a loaded ViT with its AudioSet head (``save`` writes a model directory that
    ``load_model`` reads and ``convert --to-torch`` turns into the published fine-tuned layout)."""
    host = jax.device_get({"params": params, "batch_stats": batch_stats})
    head = head_params_for_encoder({"params": host["params"]["head"], "batch_stats": host["batch_stats"]["head"]})
    weights = {k: jax.tree.map(np.asarray, host["params"][k]) for k in ("tokenizer", "encoder")} | {"head": head}
    return Encoder(encoder_spec(config), weights)
