"""The fine-tuning task in the one trainer: labels through the grain pipeline (with the label-frequency weighted
sampler), exact resume, the evaluation's files, and the fine-tuned model as a loaded model whose ``tag`` is the
published head's output and which converts to the published fine-tuned layout and back."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_scale, load_config

from matpac_jax import convert, parallel
from matpac_jax.audio.frontend import LogMelConfig, log_mel
from matpac_jax.checkpoint import Checkpointer
from matpac_jax.config_lib import ConfigError
from matpac_jax.data.demo import write_records
from matpac_jax.finetune.data import crop_samples, eval_clips, record_labels
from matpac_jax.finetune.model import FinetuneModel, as_encoder
from matpac_jax.load import load_encoder
from matpac_jax.models.vit import sincos_pos_embed_2d
from matpac_jax.tasks import make_task, train_and_evaluate
from matpac_jax.train.program import compile_program


def _records_config(data, steps=6):
    """The smoke fine-tuning on record shards of the demo corpus (labels 0..7), label-weighted sampling, two evals."""
    c = load_config("finetune_as.py", "smoke")
    c.data.source, c.data.train, c.data.workers = "records", f"{data}/*.arrayrecord", 0
    c.finetune.eval, c.finetune.balanced, c.finetune.eval_every = f"{data}/*.arrayrecord", True, 3
    c.total_steps, c.mesh = steps, {"data": 1}
    return c


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    data = tmp_path_factory.mktemp("ft_data")
    write_records(str(data), 24, 8, 2.0, 0, 16_000, num_shards=2)
    return data


def test_records_carry_their_labels_and_the_weighted_sampler_reads_them(shards, tmp_path):
    c = _records_config(shards)
    task = make_task(c, str(tmp_path))
    batch = next(iter(task.make_input().source))
    assert batch["audio"].shape == (8, crop_samples(c)) and batch["audio"].dtype == np.int16
    assert batch["targets"].shape == (8, 8) and np.all(batch["targets"].sum(axis=1) == 1)  # one class per demo clip
    labels = record_labels(sorted(map(str, shards.glob("*.arrayrecord"))), 8, str(tmp_path / "labels.npz"))
    evals = eval_clips(c, None)
    audio = np.concatenate(list(evals.batches(5)))  # read 5 clips at a time, the last batch shorter
    assert len(labels) == len(audio) == len(evals) == 24 and np.array_equal(labels, evals.targets > 0)  # all, in order
    assert audio.shape[1] == crop_samples(c) and audio.dtype == np.int16
    half = eval_clips(c, None, 1, 2)  # process 1 of 2: clips 1, 3, ...
    np.testing.assert_array_equal(np.concatenate(list(half.batches(32))), audio[1::2])


def test_finetuning_resumes_exactly_and_writes_a_model_tag_reads(shards, tmp_path):
    straight = train_and_evaluate(_records_config(shards), str(tmp_path / "a"))
    train_and_evaluate(_records_config(shards, steps=3), str(tmp_path / "b"))
    resumed = train_and_evaluate(_records_config(shards), str(tmp_path / "b"))
    assert resumed["final_metrics"] == pytest.approx(straight["final_metrics"], rel=1e-5)  # data order included
    assert resumed["probe"] == pytest.approx(straight["probe"], rel=1e-5)
    for name in ("eval.json", "best.json"):  # the final evaluation with its bootstrap CI, the best one
        a, b = (json.loads((tmp_path / r / name).read_text()) for r in "ab")
        assert a.keys() == b.keys()
        np.testing.assert_allclose(np.array(list(a.values()), float), np.array(list(b.values()), float), rtol=1e-5)
    lines = [json.loads(x) for x in (tmp_path / "b" / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6]
    value, low, high = json.loads((tmp_path / "a" / "eval.json").read_text())["mAP"]
    assert low <= value <= high

    # the final model: a model directory whose tag() is softmax of the published head on the fine-tuned encoder
    c = _records_config(shards)
    enc = load_encoder(str(tmp_path / "a" / "model"))
    assert enc.spec.crop_frames == c.audio.crop_frames and set(enc.params) == {"tokenizer", "encoder", "head"}
    wave = np.asarray(next(eval_clips(c, None).batches(3)), np.float32) / 32767.0
    model = FinetuneModel.from_config(c)
    head = enc.params["head"]
    variables = {"params": {k: enc.params[k] for k in ("tokenizer", "encoder")}
                 | {"head": {"linear": {"kernel": head["kernel"], "bias": head["bias"]}}},
                 "batch_stats": {"head": {"mean": head["norm_mean"], "var": head["norm_var"]}}}  # fmt: skip
    logits = model.apply(variables, log_mel(jnp.asarray(wave), LogMelConfig.from_audio_config(c.audio)))
    want = np.asarray(jax.nn.softmax(logits, axis=-1))
    assert_close_to_scale(enc.tag(wave), want, rtol=1e-4)

    # the published fine-tuned layout (head_norm.*, head.*, pos_embed of the fine-tuning length) and back
    sd = convert.to_torch(enc.spec, jax.device_get(enc.params))
    assert {"head_norm.running_mean", "head_norm.running_var", "head.weight", "head.bias"} <= set(sd)
    fp, tp = c.audio.n_mels // 16, c.audio.crop_frames // 16
    assert sd["pos_embed"].shape == (1, 1 + fp * tp, 64)
    spec, params, _ = convert.from_torch(sd, heads=4)
    from matpac_jax.inference import Encoder

    assert_close_to_scale(Encoder(spec, params).tag(wave), enc.tag(wave), rtol=1e-5)


def test_init_from_loads_the_encoder_and_refuses_another_shape_before_compute(tmp_path):
    c = load_config("finetune_as.py", "smoke")
    model = FinetuneModel.from_config(c)
    v = model.init(jax.random.key(5), jnp.zeros((2, c.audio.n_mels, c.audio.crop_frames)))
    saved = as_encoder(c, v["params"], v["batch_stats"]).save(str(tmp_path / "enc"))
    c.finetune.init_from = saved
    task = make_task(c, str(tmp_path / "w"))
    init_fn, _, abstract = compile_program(task.build(task.make_input()), parallel.make_mesh({"data": 1}), c)
    state = jax.device_get(init_fn(jax.random.key(0)))  # another seed: only the loaded weights can match
    pos = state.params["tokenizer"].pop("pos_embed")  # the encoder's positions, kept (same length: unchanged)
    np.testing.assert_array_equal(pos, sincos_pos_embed_2d(64, 5, c.audio.crop_frames // 16, cls_row=False))
    for k in ("tokenizer", "encoder"):
        jax.tree.map(np.testing.assert_array_equal, state.params[k], jax.device_get(v["params"][k]))
    np.testing.assert_array_equal(state.params["head"]["linear"]["kernel"], v["params"]["head"]["linear"]["kernel"])
    c.model.encoder.depth = 3
    with pytest.raises(ConfigError, match="does not fit config.model / config.audio: .*depth: file 2, config 3"):
        train_and_evaluate(c, str(tmp_path / "run0"))

    c = load_config("finetune_as.py", "smoke")
    c.finetune.init_from = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="config.finetune.init_from=.*neither a model directory"):
        train_and_evaluate(c, str(tmp_path / "run"))
    c = load_config("finetune_as.py", "smoke")
    c.data.source, c.data.train = "records", ""
    with pytest.raises(ConfigError, match="needs --config.data.train=SHARDS and --config.finetune.eval"):
        train_and_evaluate(c, str(tmp_path / "run2"))


def test_frozen_encoder_trains_the_head_only(tmp_path):
    """The frozen-encoder baseline of the demo: after two steps (AdamW with weight decay), the tokenizer and encoder
    are unchanged, the head moved."""
    c = load_config("finetune_as.py", "smoke")
    c.finetune.freeze_encoder, c.mesh = True, {"data": 1}
    task = make_task(c, str(tmp_path))
    data = task.make_input()
    mesh = parallel.make_mesh({"data": 1})
    init_fn, step_fn, _ = compile_program(task.build(data), mesh, c)
    state = init_fn(jax.random.key(0))
    before = jax.device_get(state.params)
    for step in range(2):  # the lr warms up from 0 at step 0
        state, m = step_fn(state, parallel.global_batch(data.source(step), mesh), jax.random.key(step))
    after = jax.device_get(state.params)
    assert float(m["nonfinite"]) == 0.0
    for k in ("tokenizer", "encoder"):
        jax.tree.map(np.testing.assert_array_equal, after[k], before[k])
    assert not np.array_equal(after["head"]["linear"]["kernel"], before["head"]["linear"]["kernel"])


def _shorter_encoder(tmp_path) -> str:
    """A ViT of the smoke shape pretrained (here: initialised) on 128-frame crops (8 time patches), saved."""
    c0 = load_config("finetune_as.py", "smoke")
    c0.audio.crop_frames = 128
    v = FinetuneModel.from_config(c0).init(jax.random.key(5), jnp.zeros((2, c0.audio.n_mels, 128)))
    return as_encoder(c0, v["params"], v["batch_stats"]).save(str(tmp_path / "enc128"))


def test_finetuning_beyond_the_pretraining_length_resamples_the_positions_as_m2d_and_saves_them(tmp_path):
    """160-frame fine-tuning (10 time patches) from a 128-frame encoder (8): the state starts from the 5x8 sin-cos
    table resampled bicubically to 5x10 (nttcslab/m2d runtime_audio.py:153-158), which training never changes and the
    saved model reproduces."""
    from test_positions import torch_formula_bicubic

    c = load_config("finetune_as.py", "smoke")
    c.finetune.init_from, c.mesh = _shorter_encoder(tmp_path), {"data": 1}
    task = make_task(c, str(tmp_path / "w"))
    data = task.make_input()
    mesh = parallel.make_mesh({"data": 1})
    init_fn, step_fn, _ = compile_program(task.build(data), mesh, c)
    state = init_fn(jax.random.key(0))
    start = jax.device_get(state.params["tokenizer"])
    grid = np.moveaxis(sincos_pos_embed_2d(64, 5, 8, cls_row=False).reshape(5, 8, 64), -1, 0)
    want = np.moveaxis(torch_formula_bicubic(grid, (5, 10), align_corners=False), 0, -1).reshape(50, 64)
    np.testing.assert_allclose(start["pos_embed"], want, rtol=0, atol=1e-5)  # values of scale 1
    assert np.max(np.abs(want - sincos_pos_embed_2d(64, 5, 10, cls_row=False))) > 0.1  # not the sin-cos table
    for step in range(2):  # AdamW with weight decay: the positions are constants all the same
        state, m = step_fn(state, parallel.global_batch(data.source(step), mesh), jax.random.key(step))
    after = jax.device_get(state.params)
    assert float(m["nonfinite"]) == 0.0
    np.testing.assert_array_equal(after["tokenizer"]["pos_embed"], start["pos_embed"])
    assert not np.array_equal(after["tokenizer"]["cls_token"], start["cls_token"])

    enc = load_encoder(as_encoder(c, state.params, state.batch_stats).save(str(tmp_path / "ft")))
    np.testing.assert_array_equal(jax.device_get(enc.params["tokenizer"]["pos_embed"]), start["pos_embed"])
    wave = (0.1 * np.random.default_rng(3).standard_normal((2, crop_samples(c)))).astype(np.float32)
    mel = log_mel(jnp.asarray(wave), LogMelConfig.from_audio_config(c.audio))
    logits = task.model.apply({"params": after, "batch_stats": jax.device_get(state.batch_stats)}, mel)
    assert_close_to_scale(enc.tag(wave), np.asarray(jax.nn.softmax(logits, axis=-1)), rtol=1e-4)


def test_sincos_positions_are_a_named_choice_and_never_drop_a_stored_table(tmp_path):
    c = load_config("finetune_as.py", "smoke")
    c.finetune.init_from, c.finetune.positions, c.mesh = _shorter_encoder(tmp_path), "sincos", {"data": 1}
    task = make_task(c, str(tmp_path / "w"))
    init_fn, _, _ = compile_program(task.build(task.make_input()), parallel.make_mesh({"data": 1}), c)
    assert "pos_embed" not in jax.device_get(init_fn(jax.random.key(0))).params["tokenizer"]  # the exact sin-cos
    c.finetune.positions = "interpolated"
    with pytest.raises(ConfigError, match="config.finetune.positions='interpolated': expected one of"):
        train_and_evaluate(c, str(tmp_path / "run"))
    c.finetune.positions = "pretrained"  # a fine-tuned model (stored table) as the start of a 'sincos' fine-tuning
    state = jax.device_get(init_fn(jax.random.key(0)))
    stored = dict(state.params["tokenizer"]) | {"pos_embed": sincos_pos_embed_2d(64, 5, 10, cls_row=False) + 1}
    ft = as_encoder(c, dict(state.params) | {"tokenizer": stored}, state.batch_stats).save(str(tmp_path / "ft"))
    c.finetune.init_from, c.finetune.positions = ft, "sincos"
    with pytest.raises(ConfigError, match="carries its own position table, which .*'sincos' would drop"):
        make_task(c, str(tmp_path / "w2")).build(None)


def test_evaluation_reports_the_best_as_published_and_flags_classes_without_positives(shards, tmp_path, capsys):
    """EVAR evaluates after every epoch and reports the best epoch's mAP (eval-audio-repr finetune.py:274-292, 310):
    the recipes evaluate every epoch, the final model is a candidate too (here eval_every 4 of 6 steps: the final
    evaluation at step 6 competes with step 4's), the closing report names best.json's mAP as the published-comparable
    figure, and a class without a positive in the evaluation set (a 9th unit for 8 labels) is flagged once."""
    for variant, epoch in (("as2m", 3125), ("as20k", 321)):
        assert load_config("finetune_as.py", variant).finetune.eval_every == epoch
    c = _records_config(shards)
    c.finetune.eval_every, c.finetune.num_classes = 4, 9
    out = train_and_evaluate(c, str(tmp_path))["probe"]
    periodic = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    final = json.loads((tmp_path / "eval.json").read_text())
    best = json.loads((tmp_path / "best.json").read_text())
    assert [x["step"] for x in periodic] == [4, 6]  # the last step too: the final model is a candidate
    assert periodic[1]["mAP"] == final["mAP"][0]
    assert best["mAP"] == max(periodic[0]["mAP"], final["mAP"][0])
    assert best["step"] == (6 if final["mAP"][0] > periodic[0]["mAP"] else 4)
    assert (out["best_mAP"], out["best_step"]) == (best["mAP"], best["step"])
    assert Checkpointer(str(tmp_path)).all_steps() == [3, 4, 6]  # every 3 steps, and each evaluation's own
    printed = capsys.readouterr().out
    assert f"published-comparable: mAP {best['mAP']:.4f}, the best evaluation (step {best['step']};" in printed
    assert printed.count("warning: 1 of 9 classes have no positive clip") == 1


# --- A kill at any point of an evaluation and its checkpoint resumes to the outputs of an uninterrupted run.


class Killed(BaseException):
    """Raised by a hook in place of a SIGKILL: nothing in the trainer catches it (its cleanups run, as a kill's
    would not, but they write nothing the kill could not have left)."""


def _eval_config(shards):
    """Evaluations and checkpoints at steps 2, 4 and 6."""
    c = _records_config(shards)
    c.finetune.eval_every = c.checkpoint.every = 2
    return c


@pytest.fixture(scope="module")
def uninterrupted_evals(shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("evals") / "reference"
    train_and_evaluate(_eval_config(shards), str(workdir))
    return workdir


def _outputs(workdir) -> tuple[list, dict, dict]:
    """eval.jsonl's lines, best.json, best/'s weights."""
    lines = [json.loads(x) for x in (workdir / "eval.jsonl").read_text().splitlines()]
    best = json.loads((workdir / "best.json").read_text())
    return lines, best, dict(np.load(workdir / "best" / "weights.npz"))


def _kill_at(monkeypatch, point: str, step: int) -> None:
    """Make the run die at ``point`` of the evaluation of ``step``."""
    from matpac_jax.finetune import task as ft

    def at_step(original, step_of):
        def hooked(*args, **kwargs):
            if step_of(*args, **kwargs) == step:
                raise Killed(point)
            return original(*args, **kwargs)

        return hooked

    if point == "during the evaluation":
        monkeypatch.setattr(ft.FinetuneTask, "evaluate", at_step(ft.FinetuneTask.evaluate, lambda s, st, **k: st.step))
    elif point == "after its eval.jsonl line, before its checkpoint":
        monkeypatch.setattr(Checkpointer, "save", at_step(Checkpointer.save, lambda s, n, *a, **k: n))
    elif point == "after its checkpoint, before best/":
        monkeypatch.setattr(ft.FinetuneTask, "_write_best", at_step(ft.FinetuneTask._write_best, lambda s, st: st.step))
    elif point == "after best/'s weights, before best.json":
        written = ft.atomic_write_json

        def write_json(path, obj):
            if path.endswith("best.json") and obj["step"] == step:
                raise Killed(point)
            written(path, obj)

        monkeypatch.setattr(ft, "atomic_write_json", write_json)
    else:  # after best.json: the next training step never starts
        committed = ft.FinetuneTask.evaluation_committed

        def then_die(self, n, state):
            committed(self, n, state)
            if n == step:
                raise Killed(point)

        monkeypatch.setattr(ft.FinetuneTask, "evaluation_committed", then_die)


@pytest.mark.parametrize(
    "point",
    [
        "during the evaluation",
        "after its eval.jsonl line, before its checkpoint",
        "after its checkpoint, before best/",
        "after best/'s weights, before best.json",
        "after best.json",
    ],
)
def test_a_kill_at_any_point_of_an_evaluation_resumes_to_the_uninterrupted_best_and_eval_log(
    shards, uninterrupted_evals, tmp_path, monkeypatch, point
):
    """The evaluation state (history, best score and step) is in the checkpoints: killed at ``point`` of a new best's
    evaluation, the resumed run ends with the ``eval.jsonl``, ``best.json`` and ``best/`` weights of an uninterrupted
    run (the issue's case: killed after step 4's line and before ``best/``, it ended with best/ = step 6 and
    eval.jsonl steps [2, 4, 2, 4, 6])."""
    want_lines, want_best, want_weights = _outputs(uninterrupted_evals)
    assert [x["step"] for x in want_lines] == [2, 4, 6]
    step = 4  # a new best, not the last: every point of the sequence is reached, and the run goes on after it
    assert want_lines[1]["mAP"] > want_lines[0]["mAP"]
    with monkeypatch.context() as m:
        _kill_at(m, point, step)
        with pytest.raises(Killed):
            train_and_evaluate(_eval_config(shards), str(tmp_path))
    train_and_evaluate(_eval_config(shards), str(tmp_path))
    lines, best, weights = _outputs(tmp_path)
    assert lines == want_lines and best == want_best
    assert weights.keys() == want_weights.keys()
    for k in weights:
        np.testing.assert_array_equal(weights[k], want_weights[k], err_msg=k)
