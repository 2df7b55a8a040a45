"""DyMN ("dymn10"), the S-SONDO student of EfficientAT's models/dymn, and its EfficientAT state-dict import.

Published definitions checked (fschmid56/EfficientAT @ a425fdc): models/dymn/model.py:73-74 (BatchNorm eps 1e-3),
:80-87 (stem), :107-115 (last 1×1 conv to 6 × 160), :177-178 (``embed`` = pooled features before the classifier),
:234-252 (block table); models/dymn/dy_block.py:76-94 (K kernels stored [1, 1, K, out·in·k·k]), :103-131 (attention
softmax(Linear(h) / τ) and per-example convolution), :154-155 and :170-188 (DY-ReLU-B), :195-201 (coordinate
attention), :214-254 (context generation), :276-281 (residual, context size), :286-388 (block layers), :390-409
(block forward). S-SONDO (MedAliAdlouni/ssondo @ f89abf2): training_ssondo/utils/student_models/dymn/model.py:157-176
(the student's output is that pooled 960-d embedding, no classifier), training_ssondo/knowledge_distillation_training/
config.py:396-401 (dymn10_im, pretrain_final_temp 30.0; ``update_params`` is never called, so τ stays 30).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from dymn_reference import dymn_embed, random_state_dict

from matpac_jax.distill.published import StateDictMismatch
from matpac_jax.models.dymn import DyMN, abstract_variables, from_torch_state_dict

FAST = {"xla_backend_optimization_level": 0}  # compile in seconds; the numerics are unchanged


def test_dymn10_parameter_count():
    """8,643,312 parameters at width 1.0, as EfficientAT's DyMN without its classifier (S-SONDO's dymn10 backbone).

    Per dynamic block (input C, kernel k, expanded E, output O, context H; K = 4 kernels, M = 2):
    context ``H·C + 2H + 2(E·H + E)``; expansion (only E ≠ C) ``K·E·C + (H·K + K) + 2E``; depthwise
    ``K·E·k² + (H·K + K) + 2E``; DY-ReLU ``H·2M·E + 2M·E``; projection ``K·O·E + (H·K + K) + 2O``. With
    H = clip(E // 4 rounded to 8, 32, 128):
      (C, k, E, O, H) = (16, 3, 16, 16, 32): 5,672 | (16, 3, 64, 24, 32): 26,492 | (24, 3, 72, 24, 32): 32,236 |
      (24, 5, 72, 40, 32): 41,484 | (40, 5, 120, 40, 32): 76,460 ×2 | (40, 3, 240, 80, 64): 222,028 |
      (80, 3, 200, 80, 48): 199,484 | (80, 3, 184, 80, 48): 183,900 ×2 | (80, 3, 480, 112, 120): 747,836 |
      (112, 3, 672, 112, 128): 1,165,484 | (112, 5, 672, 160, 128): 1,337,612 | (160, 5, 960, 160, 128): 2,094,284 ×2
    = 8,485,040; stem 3·3·1·16 + 2·16 = 176; last conv 160·960 + 2·960 = 155,520; total 8,643,312 (the published
    model with its ImageNet classifier, 960·1280 + 1280 + 1280·1000 + 1000 more, has 11,154,392).
    """
    model = DyMN()
    out, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 128, 624))))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 8_643_312
    assert out.shape == (2, 960)
    # BatchNorm mean and var: stem 16; blocks: joint_norm ΣH 1,032, exp_norm ΣE (E ≠ C) 5,000, depth_norm ΣE 5,016,
    # proj_norm ΣO 1,208; last conv 960
    assert sum(x.size for x in jax.tree.leaves(variables["batch_stats"])) == 2 * (16 + 12_256 + 960)


def test_forward_matches_published_numpy_reference():
    """A random state dict in the published key layout (classifier and ``num_batches_tracked`` included, which the
    import drops), loaded into DyMN at width 0.4 (same keys, smaller layers), matches the float64 NumPy forward of
    tests/dymn_reference.py within 1e-5 of the output's scale. τ = 0.5 so that the K-kernel attention is far from
    uniform (a mis-ordered kernel shows) and τ ≠ 1 (a missing or misplaced division by τ shows)."""
    width, tau = 0.4, 0.5
    sd = random_state_dict(width, seed=3)
    variables = from_torch_state_dict(sd, width=width, temperature=tau)
    abstract = abstract_variables(DyMN(width=width, temperature=tau))
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda a: a.shape, abstract)  # every variable, no other
    x = np.random.default_rng(4).normal(size=(2, 1, 64, 48)).astype(np.float32)
    forward = jax.jit(DyMN(width=width, temperature=tau).apply).lower(variables, x).compile(FAST)
    got = np.asarray(forward(variables, x), np.float64)
    want = dymn_embed(x, sd, width, tau)
    assert got.shape == want.shape == (2, 6 * 64)
    scale = np.abs(want).max()
    assert want.std() > 0.05 * scale  # a non-degenerate output
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def test_unknown_and_missing_keys_fail_by_name():
    sd = random_state_dict(0.4)
    del sd["layers.3.depth_conv.residuals.0.bias"]
    sd["layers.3.depth_conv.attention.weight"] = np.zeros((4, 32))
    with pytest.raises(StateDictMismatch) as e:
        from_torch_state_dict(sd, width=0.4)
    assert e.value.missing == ["layers.3.depth_conv.residuals.0.bias"]
    assert e.value.unknown == ["layers.3.depth_conv.attention.weight"]
    assert "layers.3.depth_conv.residuals.0.bias" in str(e.value)
    assert "layers.3.depth_conv.attention.weight" in str(e.value)


def test_wrong_width_and_wrong_constants_fail():
    sd = random_state_dict(0.4)
    with pytest.raises(StateDictMismatch, match=r"wrong shapes: .*layers\.\d+\..*another width"):
        from_torch_state_dict(sd, width=0.5)
    sd["layers.2.depth_act.lambdas"] = np.array([1.0, 1.0, 1.0, 1.0])
    with pytest.raises(StateDictMismatch, match=r"layers\.2\.depth_act\.lambdas"):
        from_torch_state_dict(sd, width=0.4)
    with pytest.raises(ValueError, match=r"\[B, F, T\] or \[B, 1, F, T\]"):
        DyMN().init(jax.random.PRNGKey(0), jnp.zeros((2, 3, 64, 64)))


def test_make_student_builds_dymn():
    from matpac_jax.models.students import make_student

    student = mlc.ConfigDict(dict(arch="dymn", width=1.0, channels=32, blocks=(1, 1, 2, 1), head_hidden=1280,
                                  dropout=0.2))  # fmt: skip
    distiller = make_student(student)
    assert isinstance(distiller.backbone, DyMN)
    assert (distiller.backbone.width, distiller.backbone.temperature) == (1.0, 30.0)
