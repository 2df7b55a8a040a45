"""Pure Flax (Linen) modules: ViT encoder pieces, predictor with MCL heads, DINO-style classification head."""

from matpac_jax.models.cls_head import ClsHead
from matpac_jax.models.predictor import Predictor
from matpac_jax.models.vit import Block, Tokenizer, Transformer, sincos_pos_embed_2d

__all__ = ["Block", "ClsHead", "Predictor", "Tokenizer", "Transformer", "sincos_pos_embed_2d"]
