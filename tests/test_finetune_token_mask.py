"""m2d's training-time token masking (nttcslab/m2d patch_m2d.diff:2245-2266 ``random_structured_mask``, used with
``--training_mask 0.5`` by util/ft-as2m.sh:25 and util/ft-as20k.sh:19): the numbers it draws, the tokens it keeps,
that the padded computation is the published one on the visible tokens alone, and that evaluation is unmasked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_scale, load_config

from matpac_jax.finetune import token_mask
from matpac_jax.finetune.data import crop_samples
from matpac_jax.finetune.model import FinetuneModel
from matpac_jax.finetune.step import make_program

F, T, R = 5, 62, 0.5  # the 992-frame grid of the recipes


def test_table_by_hand_for_the_recipe_grid():
    """NF = min(4, int(3.5 u)): 0, 1, 2 with probability 2/7 each, 3 with 1/7; NT = int(62 (0.5 + 0.5/62 − NF/5)) =
    int(31.5), int(19.1), int(6.7), 0; visible (5 − NF)(62 − NT) = 155, 172, 168, 124 of 310."""
    prob, nt, keep = token_mask.keep_table(F, T, R)
    np.testing.assert_allclose(prob, [2 / 7, 2 / 7, 2 / 7, 1 / 7, 0.0], rtol=1e-12, atol=1e-15)
    assert nt[:4].tolist() == [31, 19, 6, 0] and keep[:4].tolist() == [155, 172, 168, 124]
    assert token_mask.max_keep(F, T, R) == 172
    dropped = np.array([155, 138, 142, 186]) / 310  # 310 − visible
    assert token_mask.expected_masked_fraction(F, T, R) == pytest.approx(float(prob[:4] @ dropped), rel=1e-12)
    assert token_mask.expected_masked_fraction(F, T, R) == pytest.approx(0.48664, abs=1e-5)
    with pytest.raises(ValueError, match="training_mask=1.0"):
        token_mask.keep_table(F, T, 1.0)


def test_draws_follow_the_published_statistics():
    """Over 4,000 batches of 4: NF's frequencies within 5 binomial standard errors of 2/7, 2/7, 2/7, 1/7; each example
    marks exactly NF rows and NT(NF) columns; every row and column is marked equally often; the dropped fraction
    averages 48.7 %."""
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    marks, nfs = jax.jit(jax.vmap(lambda k: token_mask.structured_mark(k, 4, F, T, R)))(keys)
    marks, nfs = np.asarray(marks), np.asarray(nfs)
    prob, nt, keep = token_mask.keep_table(F, T, R)
    counts = np.bincount(nfs, minlength=F) / n
    assert np.all(np.abs(counts - prob) <= 5 * np.sqrt(prob * (1 - prob) / n) + 1e-12), counts
    full_rows = marks.all(axis=3)  # [n, B, F]: a marked row is marked in every column
    full_cols = marks.all(axis=2)  # [n, B, T]
    assert np.array_equal(full_rows.sum(-1), np.broadcast_to(nfs[:, None], (n, 4)))
    nt_of = nt[nfs][:, None]
    # a column is entirely marked when chosen, or when all rows are marked (never: NF <= 4)
    assert np.array_equal(full_cols.sum(-1), np.broadcast_to(nt_of, (n, 4)))
    # row / column choice uniform: each row marked with probability E[NF] / F
    row_rate = full_rows.mean(axis=(0, 1))
    assert np.all(np.abs(row_rate - (prob @ np.arange(F)) / F) < 0.02), row_rate
    visible = (~marks).reshape(n, 4, -1).sum(-1)
    assert np.array_equal(visible, np.broadcast_to(keep[nfs][:, None], (n, 4)))
    assert abs(1 - visible.mean() / (F * T) - token_mask.expected_masked_fraction(F, T, R)) < 0.005


def _published_keep(mark: np.ndarray) -> tuple[np.ndarray, int]:
    """patch_m2d.diff:2263-2264 and 2972: ids_shuffle = argsort(mask.view(B, -1), descending=True) (equal keys in
    index order), len_keep = (mask[0] == 0).sum(), ids_keep = ids_shuffle[:, :len_keep]."""
    b = mark.shape[0]
    flat = mark.reshape(b, -1).astype(np.int64)
    ids_shuffle = np.stack([np.argsort(-row, kind="stable") for row in flat])
    len_keep = int((flat[0] == 0).sum())
    return ids_shuffle[:, :len_keep], len_keep


@pytest.mark.parametrize("seed", range(6))
def test_kept_tokens_are_the_published_ids(seed):
    """For the same marks, ``structured_keep`` keeps exactly the published ``ids_keep``, in the same order, padded;
    the visible tokens are the marked ones first (m2d sorts the marks descending)."""
    key = jax.random.key(seed)
    mark, _ = token_mask.structured_mark(key, 3, F, T, R)
    ids, n_keep = token_mask.structured_keep(key, 3, F, T, R)
    want, len_keep = _published_keep(np.asarray(mark))
    assert int(n_keep) == len_keep and ids.shape == (3, 172)
    np.testing.assert_array_equal(np.asarray(ids)[:, :len_keep], want)
    marked = np.asarray(mark).reshape(3, -1).sum(-1)
    for b in range(3):  # every marked token is visible when they are no more than len_keep
        if marked[b] <= len_keep:
            assert set(np.flatnonzero(np.asarray(mark)[b].ravel())) <= set(want[b].tolist())


def _small_config(ratio=0.5):
    c = load_config("finetune_as.py", "smoke")
    c.finetune.training_mask = ratio
    return c


def test_padded_masked_forward_equals_the_visible_tokens_alone():
    """The model with ``keep`` (padded ids, attention limited to CLS + visible, head mean over the visible) equals
    m2d's computation: the encoder run on [CLS; visible tokens] only, the head on their mean."""
    c = _small_config()
    model = FinetuneModel.from_config(c)
    mel = jax.random.normal(jax.random.key(0), (4, 80, c.audio.crop_frames))
    variables = model.init(jax.random.key(1), mel)
    grid = (5, c.audio.crop_frames // 16)
    for seed in range(3):
        ids, n = token_mask.structured_keep(jax.random.key(10 + seed), 4, *grid, 0.5)
        got, _ = model.apply(variables, mel, train=True, keep=(ids, n), mutable=["batch_stats"])

        def published(module, mel, visible):
            tokens, cls = module.tokenizer(mel)
            tokens = jnp.take_along_axis(tokens, visible[:, :, None], axis=1)
            x = jnp.concatenate([jnp.broadcast_to(cls, (4, 1, tokens.shape[-1])), tokens], axis=1)
            return module.head(module.encoder(x)[:, 1:], True)

        want, _ = model.apply(variables, mel, ids[:, : int(n)], method=published, mutable=["batch_stats"])
        assert_close_to_scale(np.asarray(got), np.asarray(want), rtol=1e-5)


def test_training_is_masked_and_evaluation_is_not():
    """m2d/runtime_audio.py:331: mask_ratio = training_mask if self.training else 0. The training step's loss
    depends on the masking; evaluation (train=False, no ``keep``) equals the model on every token, whatever the
    ratio."""
    from matpac_jax.train.program import make_step, optimizer, with_optimizer

    losses = {}
    for ratio in (0.0, 0.5):
        c = _small_config(ratio)
        c.finetune.mixup, c.finetune.freq_mask, c.finetune.time_mask = 0.0, 0, 0  # only the token masking varies
        model = FinetuneModel.from_config(c)
        shape = (4, 80, c.audio.crop_frames)
        c.data.batch_size = 4
        program = make_program(model, c, shape)
        tx, lr = optimizer(program, c)  # the trainer's optimizer and step
        state = with_optimizer(program.init, program.params_field, tx)(jax.random.key(0))
        step = jax.jit(make_step(program, tx, lr))
        audio = jax.random.normal(jax.random.key(3), (4, 16_000 * 2)) * 0.1
        batch = {"audio": audio[:, : crop_samples(c)], "targets": jnp.eye(8)[:4]}
        losses[ratio] = [float(step(state, batch, jax.random.key(s))[1]["loss"]) for s in range(2)]
        mel = jax.random.normal(jax.random.key(4), shape)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        full = model.apply(variables, mel, train=False)
        n = shape[2] // 16 * 5
        every = (jnp.broadcast_to(jnp.arange(n), (4, n)), jnp.int32(n))  # every token, in order
        np.testing.assert_allclose(np.asarray(full), np.asarray(model.apply(variables, mel, keep=every)), rtol=1e-5)
    assert losses[0.0][0] == pytest.approx(losses[0.0][1], rel=1e-6)  # no masking: the key changes nothing here
    assert losses[0.5][0] != pytest.approx(losses[0.5][1], rel=1e-4)  # masking: each key its own visible tokens
