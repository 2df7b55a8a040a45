"""Layer-wise learning-rate decay of MAE's fine-tuning (facebookresearch/mae util/lr_decay.py:15-76, from BEiT).

MAE's ``param_groups_lrd`` gives every parameter a layer id (``get_layer_id_for_vit``, lr_decay.py:64-76): 0 for
``cls_token``, ``pos_embed`` and ``patch_embed.*``; i + 1 for ``blocks.i.*``; depth + 1 for everything else (final
norm, head). Its learning rate is scaled by ``layer_decay ** (depth + 1 - layer_id)`` (lr_decay.py:23-25, applied as
``param_group["lr"] = lr * lr_scale`` every step, util/lr_sched.py:16-18), and it gets no weight decay when it is
1-D (biases, norm scales) or in the model's ``no_weight_decay()`` list (lr_decay.py:31-35; main_finetune.py:283-285
passes ``{'pos_embed', 'cls_token', 'dist_token'}``). MAE's default decay is 0.75 (main_finetune.py:70; AudioMAE
main_finetune_as.py:75 too). **m2d's published AudioSet fine-tuning uses no layer decay**: one parameter group, LARS
(AS2M) or SGD (AS20K) without weight decay (nttcslab/eval-audio-repr finetune.py:219-223), so 1.0 (off) is the m2d
setting.

Our names (``matpac_jax.models.vit``, as ``inference._encode_chunks`` uses them): ``tokenizer/{proj, cls_token}``
(the patch embedding and CLS token; the sin-cos positions are not parameters) -> 0, ``encoder/blocks_{i}/...`` ->
i + 1, anything else (``encoder/norm``, ``head``) -> depth + 1.

``train.optim.scale_by_layer(scales)`` multiplies each leaf's update by its scale. Torch's AdamW with a group lr of
lr × s moves p by −lr·s·(adam + wd·p): both the Adam step and the decoupled decay carry s. In an optax chain that is
``scale_by_layer`` anywhere after the Adam direction and the added decayed weights — right before
``scale_by_learning_rate``, or at the very end of the chain (every later step is a multiplication by the lr).
With LAMB / LARS put it after the trust ratio (at the end), else the ratio cancels it.
"""

from __future__ import annotations

import re

import jax

_BLOCK = re.compile(r"blocks_(\d+)")
_EMBEDDING = ("tokenizer", "patch_embed", "cls_token", "pos_embed")  # layer 0 (MAE lr_decay.py:69-72)
_NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "dist_token")  # timm VisionTransformer.no_weight_decay()


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def layer_id(names: tuple[str, ...], depth: int) -> int:
    """MAE's ``get_layer_id_for_vit`` on a parameter path (tuple of names): 0 embedding, i + 1 in block i,
    depth + 1 elsewhere."""
    for name in names:
        if name in _EMBEDDING:
            return 0
        m = _BLOCK.fullmatch(name)
        if m:
            i = int(m.group(1))
            if i >= depth:
                raise ValueError(f"parameter {'/'.join(names)} is in block {i}, but depth={depth}: pass the "
                                 "encoder's depth (encoder_depth(params))")  # fmt: skip
            return i + 1
    return depth + 1


def encoder_depth(params) -> int:
    """Number of transformer blocks (``blocks_{i}``) in a parameter tree."""
    ids = {int(m.group(1)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
           for m in map(_BLOCK.fullmatch, _names(path)) if m}  # fmt: skip
    return max(ids) + 1 if ids else 0


def layer_scales(params, depth: int, decay: float):
    """Pytree like ``params`` of Python floats ``decay ** (depth + 1 - layer_id)`` (1.0 everywhere for decay 1)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: float(decay) ** (depth + 1 - layer_id(_names(path), depth)), params
    )


def weight_decay_mask(params):
    """True where MAE's ``param_groups_lrd`` applies weight decay: parameters of 2 or more dimensions that are not
    tokens or positions (biases, norm scales and the CLS token are excluded)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and _names(path)[-1] not in _NO_WEIGHT_DECAY, params
    )


def vit_layer_ids(params) -> tuple[dict, int]:
    """(a tree like ``params`` of MAE layer ids, the encoder's depth): what ``StepProgram.layer_ids`` gives the
    trainer's optimizer for a ViT (``config.optim.layer_decay``)."""
    depth = encoder_depth(params)
    return jax.tree_util.tree_map_with_path(lambda path, _: layer_id(_names(path), depth), params), depth
