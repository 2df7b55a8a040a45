"""Layer-wise lr decay of MAE (facebookresearch/mae util/lr_decay.py): the scale and weight-decay rule of every
parameter of a tiny ViT against a hand-written table, and an AdamW step with scale_by_layer against per-group AdamW
with lr × scale (torch param groups, util/lr_sched.py:16-18)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close_to_scale

from matpac_jax.finetune.head import AudioSetHead
from matpac_jax.models.layer_decay import encoder_depth, layer_scales, weight_decay_mask
from matpac_jax.models.vit import Tokenizer, Transformer
from matpac_jax.train.optim import scale_by_layer

DIM, DEPTH, DECAY = 16, 2, 0.5
BLOCK_LEAVES = [f"{layer}/{leaf}" for layer, leaves in [("norm1", "scale bias"), ("attn/qkv", "kernel bias"),
                 ("attn/proj", "kernel bias"), ("norm2", "scale bias"), ("mlp/fc1", "kernel bias"),
                 ("mlp/fc2", "kernel bias")] for leaf in leaves.split()]  # fmt: skip


def _tiny_params():
    """The fine-tuning tree: {'tokenizer', 'encoder'} as inference._encode_chunks uses them, plus the AudioSet head."""
    mel = jnp.zeros((2, 32, 32))
    tok = Tokenizer(DIM, 16, 2, 2).init(jax.random.key(0), mel)["params"]
    enc = Transformer(DIM, DEPTH, 2, 2.0).init(jax.random.key(1), jnp.zeros((2, 5, DIM)))["params"]
    head = AudioSetHead(3).init(jax.random.key(2), jnp.zeros((2, 4, DIM)), train=True)["params"]
    return {"tokenizer": tok, "encoder": enc, "head": head}


def _flat(tree) -> dict:
    return {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# MAE get_layer_id_for_vit (lr_decay.py:64-76) with depth 2 -> num_layers 3, scale = 0.5 ** (3 - layer_id):
# patch_embed / cls_token -> 0 (0.125), blocks.0 -> 1 (0.25), blocks.1 -> 2 (0.5), norm / head -> 3 (1.0).
# Weight decay (lr_decay.py:31-35): none for 1-D parameters and for cls_token (no_weight_decay list).
TABLE = {
    "tokenizer/proj/kernel": (0.125, True),
    "tokenizer/proj/bias": (0.125, False),
    "tokenizer/cls_token": (0.125, False),
    **{f"encoder/blocks_0/{n}": (0.25, n.endswith("kernel")) for n in BLOCK_LEAVES},
    **{f"encoder/blocks_1/{n}": (0.5, n.endswith("kernel")) for n in BLOCK_LEAVES},
    "encoder/norm/scale": (1.0, False),
    "encoder/norm/bias": (1.0, False),
    "head/linear/kernel": (1.0, True),
    "head/linear/bias": (1.0, False),
}


def test_every_parameter_gets_mae_layer_scale_and_weight_decay_rule():
    """facebookresearch/mae util/lr_decay.py:23-25 (scales decay ** (num_layers - layer_id)), :64-76 (layer ids),
    :31-35 (no decay for 1-D and no_weight_decay names); hand table above, every parameter of the tree."""
    params = _tiny_params()
    scales, mask = _flat(layer_scales(params, DEPTH, DECAY)), _flat(weight_decay_mask(params))
    assert set(scales) == set(TABLE) and set(mask) == set(TABLE)
    for name, (scale, decays) in TABLE.items():
        assert scales[name] == scale, name
        assert bool(mask[name]) is decays, name


def test_depth_is_read_from_the_tree_and_decay_one_is_off():
    """MAE's default 0.75 (main_finetune.py:70) on ViT-B gives the embedding 0.75**13; m2d (no layer decay, nttcslab/
    eval-audio-repr finetune.py:219-223) is decay 1.0: every scale 1."""
    params = _tiny_params()
    assert encoder_depth(params) == DEPTH
    assert set(jax.tree.leaves(layer_scales(params, DEPTH, 1.0))) == {1.0}
    assert _flat(layer_scales(params, 12, 0.75))["tokenizer/cls_token"] == pytest.approx(0.75**13)
    with pytest.raises(ValueError, match="block 1, but depth=1"):
        layer_scales(params, 1, 0.75)


def _adamw_reference(params, grads_seq, scales, mask, lr, wd):
    """Per-parameter optax.adamw with lr × scale and weight decay only where the mask says (torch param groups)."""
    out = {}
    for name, p in _flat(params).items():
        sched = lambda t, s=scales[name]: s * lr(t)
        tx = optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-6, weight_decay=wd if mask[name] else 0.0)
        state = tx.init(p)
        for grads in grads_seq:
            u, state = tx.update(grads[name], state, p)
            p = optax.apply_updates(p, u)
        out[name] = p
    return out


def test_adamw_with_scale_by_layer_equals_per_group_adamw_with_scaled_lr():
    """MAE util/lr_sched.py:16-18 (param_group lr = lr × lr_scale) with torch AdamW: both the Adam step and the
    decoupled weight decay carry the scale. Three steps on a warm-up schedule, scale_by_layer placed right before
    scale_by_learning_rate, and at the end of optax.adamw's chain: both equal the per-group reference."""
    params = _tiny_params()
    rng = np.random.default_rng(0)
    grads_seq = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in _flat(params).items()} for _ in "abc"]
    lr = optax.linear_schedule(1e-3, 3e-3, 3)
    wd = 0.05
    scales_tree, mask_tree = layer_scales(params, DEPTH, DECAY), weight_decay_mask(params)
    want = _adamw_reference(params, grads_seq, _flat(scales_tree), _flat(mask_tree), lr, wd)

    before_lr = optax.chain(optax.scale_by_adam(0.9, 0.95, 1e-6), optax.add_decayed_weights(wd, mask_tree),
                            scale_by_layer(scales_tree), optax.scale_by_learning_rate(lr))  # fmt: skip
    at_end = optax.chain(optax.adamw(lr, 0.9, 0.95, 1e-6, weight_decay=wd, mask=mask_tree), scale_by_layer(scales_tree))
    treedef = jax.tree.structure(params)
    for tx in (before_lr, at_end):
        p, state = params, tx.init(params)
        step = jax.jit(tx.update)
        for grads in grads_seq:
            g = jax.tree.unflatten(treedef, [grads[k] for k in _flat(params)])
            u, state = step(g, state, p)
            p = optax.apply_updates(p, u)
        for name, value in _flat(p).items():
            assert_close_to_scale(np.asarray(value), np.asarray(want[name]), rtol=1e-5)
    moved = {k: float(np.abs(np.asarray(want[k]) - np.asarray(v)).max()) for k, v in _flat(params).items()}
    assert moved["tokenizer/proj/kernel"] < moved["head/linear/kernel"]  # the scale reached the update
