"""AudioSet (or any labelled records) fine-tuning as a trainer task (train.task.Task): a ViT encoder that
``load_model`` reads (``config.finetune.init_from``: our encoder dir, a pretraining workdir, converted published
weights; '' = from scratch) with the published AudioSet head, trained end to end with sigmoid binary cross-entropy.

Evaluation: every ``config.finetune.eval_every`` steps (the recipes: every epoch, as EVAR, finetune.py:274-277) and
at the end, the model in evaluation mode (running BatchNorm statistics, no augmentation) scores every clip of the
evaluation set (finetune.data.eval_clips); mAP (macro over every class, AP 0 for one without a positive, as EVAR's
eval_map), AUC and d' (finetune.metrics) go to ``WORKDIR/eval.jsonl`` and TensorBoard (``eval/<metric>``). The model
of the best mAP so far is kept apart in ``WORKDIR/best/`` (a model directory that ``load_model`` reads, ``tag`` works,
``convert --to-torch`` writes the published fine-tuned layout), its figures in ``WORKDIR/best.json``: the best
evaluation's mAP is the figure EVAR reports (finetune.py:282-292, 310), the one to compare with published numbers. The
last step is evaluated too: the final model is a candidate for ``best``, as EVAR's last epoch is. At the end: the final
model in ``WORKDIR/model/``, its evaluation with bootstrap 95 % CIs (``config.finetune.bootstrap`` resamples of the
clips) in ``WORKDIR/eval.json``.

Kills: the evaluation history and the best (score and step) are the task's checkpointed evaluation state
(train.task.CheckpointedEvaluation). ``eval.jsonl`` is rewritten from it at every start; ``best/`` is written once the
checkpoint of its step is committed (then ``best.json``, last, marks it whole), and rebuilt at the start from the
restored state when ``best.json`` disagrees with the checkpoint: a kill at any moment resumes to the ``best/`` and
``eval.jsonl`` of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from matpac_jax.audio.frontend import LogMelConfig, log_mel
from matpac_jax.config_lib import NON_NEGATIVE, ConfigError, check_int, check_number
from matpac_jax.fileio import atomic_write_json, atomic_write_text, strict_json
from matpac_jax.finetune.data import eval_clips, train_input
from matpac_jax.finetune.head import head_variables_from_encoder
from matpac_jax.finetune.metrics import bootstrap_ci, classes_without_positive, evaluate_scores
from matpac_jax.finetune.model import FinetuneModel, as_encoder, stored_positions
from matpac_jax.finetune.step import make_program
from matpac_jax.inference import Encoder
from matpac_jax.load import load_model
from matpac_jax.models.layer_decay import vit_layer_ids
from matpac_jax.models.positions import m2d_positions
from matpac_jax.models.vit import RESUME_MAY_CHANGE as VIT_RESUME_MAY_CHANGE
from matpac_jax.models.vit import check_vit_config, sincos_pos_embed_2d
from matpac_jax.train.task import Params, State, StepProgram, TaskInput

EVAL_BATCH = 32


POSITIONS = ("pretrained", "sincos")  # finetune/model.py: the encoder's table moved as m2d does, or sin-cos


def frozen_mask(config: ConfigDict, params: Params) -> Any:
    """True where a parameter gets no update: everything but the head for the frozen-encoder baseline
    (``finetune.freeze_encoder``); ``tokenizer/pos_embed`` when the positions are stored (constants as in m2d,
    ``requires_grad=False``; their gradient is zero already: ``Tokenizer``'s stop_gradient)."""
    freeze_encoder, positions = bool(config.finetune.freeze_encoder), stored_positions(config)

    def frozen(path: tuple, _: Any) -> bool:
        names = tuple(getattr(k, "key", k) for k in path)
        return (freeze_encoder and names[0] != "head") or (positions and names == ("tokenizer", "pos_embed"))

    return jax.tree_util.tree_map_with_path(frozen, params)


def check_finetune(config: ConfigDict) -> None:
    """ConfigError naming the key: the ViT, the head and augmentation settings, the labelled input."""
    check_vit_config(config)
    f = config.finetune
    check_int(config, "finetune.num_classes", 1)
    for key in ("freq_mask", "time_mask", "time_shift", "eval_every", "bootstrap"):
        check_int(config, f"finetune.{key}", 0)
    check_number(config, "finetune.mixup", *NON_NEGATIVE)
    if f.positions not in POSITIONS:
        raise ConfigError(f"config.finetune.positions={f.positions!r}: expected one of {POSITIONS}")
    if config.data.source not in ("records", "demo"):
        raise ConfigError(f"config.data.source={config.data.source!r}: fine-tuning reads labelled 'records' or 'demo'")
    if config.data.source == "records" and not (config.data.train and f.eval):
        raise ConfigError(
            "fine-tuning on records needs --config.data.train=SHARDS and --config.finetune.eval=SHARDS (the "
            "evaluation set, read in full)"
        )
    if config.data.batch_size < 2:
        raise ConfigError("config.data.batch_size must be >= 2: the head's BatchNorm uses the batch's statistics")


def pretrained(config: ConfigDict) -> Encoder | None:
    """The encoder ``config.finetune.init_from`` names, checked to fit the model: ConfigError naming what differs."""
    path = config.finetune.init_from
    if not path:
        return None
    try:
        enc = load_model(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.finetune.init_from={path}: {e}") from None
    if not isinstance(enc, Encoder):
        raise ConfigError(f"config.finetune.init_from={path}: a {enc.describe()['kind']} model, not a ViT encoder")
    e, s = config.model.encoder, enc.spec
    want = {"dim": e.dim, "depth": e.depth, "heads": e.heads, "mlp_ratio": e.mlp_ratio, "patch": config.model.patch,
            "n_mels": config.audio.n_mels, "frontend": LogMelConfig.from_audio_config(config.audio)}  # fmt: skip
    differ = [f"{k}: file {getattr(s, k)!r}, config {v!r}" for k, v in want.items() if getattr(s, k) != v]
    if differ:
        raise ConfigError(f"config.finetune.init_from={path} does not fit config.model / config.audio: {differ}")
    if "pos_embed" in enc.params["tokenizer"] and not stored_positions(config):
        raise ConfigError(
            f"config.finetune.init_from={path} carries its own position table, which "
            f"config.finetune.positions={config.finetune.positions!r} would drop: use 'pretrained'"
        )
    return enc


def pretrained_positions(enc: Encoder, config: ConfigDict) -> np.ndarray:
    """The encoder's position table [F·T0, D] (its stored one, else the sin-cos table of its grid) brought to the
    fine-tuning grid [F·T, D] as m2d does (models.positions: bicubic resampling when longer, cut when shorter)."""
    s, grid_f = enc.spec, config.audio.n_mels // config.model.patch
    table = enc.params["tokenizer"].get("pos_embed")
    if table is None:
        table = sincos_pos_embed_2d(s.dim, grid_f, s.crop_frames // s.patch, cls_row=False)
    return m2d_positions(np.asarray(table), grid_f, config.audio.crop_frames // config.model.patch)


class FinetuneTask:
    console_metrics: tuple[tuple[str, str], ...] = ()
    resume_may_change = VIT_RESUME_MAY_CHANGE

    def __init__(self, config: ConfigDict, workdir: str) -> None:
        self.config, self.workdir = config, workdir
        self.splits: Any = None
        self.history: list[dict] = []  # {'step', metric: value} of every periodic evaluation, as in eval.jsonl
        self.best: dict = {"mAP": -1.0}  # {'step', metric: value} of the best one so far, as in best.json
        # (step, logits, targets) of the latest evaluation: the closing's CI reuses them
        self._scored: tuple[int, np.ndarray, np.ndarray] | None = None
        self._flagged = False  # classes without a positive in the evaluation set: said once
        self._scores = jax.jit(
            lambda params, stats, audio: self.model.apply(
                {"params": params, "batch_stats": stats}, log_mel(audio, self.frontend), train=False
            )
        )

    @property
    def tokens_per_sample(self) -> int:
        a, patch = self.config.audio, self.config.model.patch
        return (a.n_mels // patch) * (a.crop_frames // patch)

    def check(self) -> None:
        check_finetune(self.config)

    def make_input(self) -> TaskInput:
        source, self.splits = train_input(self.config, self.workdir)
        self.eval_set = eval_clips(self.config, self.splits, jax.process_index(), jax.process_count())
        return TaskInput(source)

    def build(self, data: TaskInput) -> StepProgram:
        del data
        c = self.config
        self.model = FinetuneModel.from_config(c)
        self.frontend = LogMelConfig.from_audio_config(c.audio)
        frozen = lambda params: frozen_mask(c, params)  # noqa: E731
        program = make_program(self.model, c, (2, c.audio.n_mels, c.audio.crop_frames), frozen, vit_layer_ids)
        enc = pretrained(c)  # read and checked against the config now, before anything is compiled
        if enc is None:
            return program
        source = f"config.finetune.init_from={c.finetune.init_from}"
        return dataclasses.replace(
            program, initial_weights=lambda abstract: self._weights(enc, abstract), init_from=source
        )

    def _weights(self, enc: Encoder, abstract: State) -> dict:
        """The stored encoder's weights (and its AudioSet head, when it has one of this shape), as part of the state
        (train.initial_weights places them)."""
        params = {k: enc.params[k] for k in ("tokenizer", "encoder")}
        if stored_positions(self.config):  # m2d's positions for this crop (runtime_audio.py:153-166), never trained
            params["tokenizer"] = dict(params["tokenizer"]) | {"pos_embed": pretrained_positions(enc, self.config)}
        head = enc.params.get("head")
        if head is None or np.shape(head["bias"]) != abstract.params["head"]["linear"]["bias"].shape:
            return {"params": params}
        head = head_variables_from_encoder(head)
        return {"params": params | {"head": head["params"]}, "batch_stats": {"head": head["batch_stats"]}}

    # --- Evaluation.

    def scores(self, params: Params, batch_stats: dict) -> tuple[np.ndarray, np.ndarray]:
        """Logits [N, C] and targets [N, C] of the whole evaluation set (every process's share, gathered)."""
        targets = self.eval_set.targets
        out = []
        for chunk in self.eval_set.batches(EVAL_BATCH):
            padded = np.zeros((EVAL_BATCH, *chunk.shape[1:]), chunk.dtype)
            padded[: len(chunk)] = chunk  # one compiled shape
            out.append(np.asarray(self._scores(params, batch_stats, padded))[: len(chunk)])
        logits = np.concatenate(out)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            logits, targets = (np.concatenate(list(multihost_utils.process_allgather(x))) for x in (logits, targets))
        return logits, targets

    def evaluate(self, state: State, ci: bool = False) -> dict:
        step = int(jax.device_get(state.step))
        if self._scored is not None and self._scored[0] == step:
            logits, targets = self._scored[1:]
        else:
            logits, targets = self.scores(state.params, state.batch_stats)
            self._scored = (step, logits, targets)
        missing = classes_without_positive(targets)
        if missing and not self._flagged and jax.process_index() == 0:
            print(
                f"warning: {missing} of {targets.shape[1]} classes have no positive clip in config.finetune.eval: each "
                "counts AP 0 in the mAP (as EVAR's eval_map) and is left out of the AUC; the published evaluation set "
                "has a positive of every class, so this mAP is not comparable with published ones",
                flush=True,
            )
        self._flagged = True
        if ci:
            return bootstrap_ci(logits, targets, n_resamples=self.config.finetune.bootstrap, seed=self.config.seed)
        return evaluate_scores(logits, targets)

    def periodic_probe(self) -> Callable[[int, State, Any], None]:
        every, last = int(self.config.finetune.eval_every), int(self.config.total_steps)

        def run(step: int, state: State, tb: Any) -> None:
            if step != last and (not every or step % every):
                return
            result = self.evaluate(state)
            self.history.append({"step": step, **result})
            if jax.process_index() == 0:
                self._write_history()
                for k, v in result.items():
                    if tb is not None:
                        tb.add_scalar(f"eval/{k}", v, step)
                print(f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)
            if result["mAP"] > self.best["mAP"]:  # strictly better, EVAR finetune.py:282-290
                self.best = {"step": step, **result}  # its model is written once its checkpoint is committed

        return run

    # --- The evaluation state in the checkpoints (train.task.CheckpointedEvaluation).

    def evaluation_state(self) -> dict:
        return {"history": self.history, "best": self.best}

    def restore_evaluation(self, saved: dict | None, step: int, state: State) -> None:
        """The history and the best of checkpoint ``step``; ``eval.jsonl`` rewritten from them, ``best/`` rebuilt
        from ``state`` when ``best.json`` disagrees (a kill after the checkpoint of a new best, before or while its
        model was written). A checkpoint without the item (an older version) takes the files as they are."""
        if saved is None and step:
            saved = {"history": [x for x in self._read_history() if x["step"] <= step], "best": self._read_best()}
        saved = saved or {"history": [], "best": {"mAP": -1.0}}
        self.history, self.best = [dict(x) for x in saved["history"]], dict(saved["best"])
        if jax.process_index() != 0:
            return
        self._write_history()
        if self._read_best() == strict_json(self.best) and os.path.isdir(self._path("best")):
            return
        if self.best.get("step") == step:
            self._write_best(state)
        elif "step" not in self.best:  # left by a run whose checkpoints are gone: this run has no best yet
            shutil.rmtree(self._path("best"), ignore_errors=True)
            if os.path.exists(self._path("best.json")):
                os.remove(self._path("best.json"))
        else:
            print(
                f"warning: {self._path('best.json')} is not the best evaluation that checkpoint {step} records (step "
                f"{self.best['step']}, mAP {self.best['mAP']:.4f}), and the weights of step {self.best['step']} are "
                "in no checkpoint now: best/ is left as it is",
                file=sys.stderr,
                flush=True,
            )

    def evaluation_committed(self, step: int, state: State) -> None:
        if self.best.get("step") == step and jax.process_index() == 0:
            self._write_best(state)

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def _write_history(self) -> None:
        lines = "".join(json.dumps(x) + "\n" for x in self.history)
        atomic_write_text(self._path("eval.jsonl"), lines)

    def _write_best(self, state: State) -> None:
        """The model to WORKDIR/best, then its figures to best.json: best.json names a whole model."""
        as_encoder(self.config, state.params, state.batch_stats).save(self._path("best"))
        atomic_write_json(self._path("best.json"), self.best)

    def _read_history(self) -> list[dict]:
        out = []
        try:
            with open(self._path("eval.jsonl")) as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut by a kill
        except OSError:
            pass
        return out

    def _read_best(self) -> dict:
        try:
            with open(self._path("best.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"mAP": -1.0}

    def closing(self, state: State) -> dict:
        result = self.evaluate(state, ci=True)  # the last step's periodic evaluation's scores, with a CI
        step = int(jax.device_get(state.step))
        if jax.process_index() == 0:
            as_encoder(self.config, state.params, state.batch_stats).save(os.path.join(self.workdir, "model"))
            atomic_write_json(os.path.join(self.workdir, "eval.json"), result)
            print(f"final model (step {step}; WORKDIR/eval.json):")
            print("| metric | value (95 % CI over bootstrap resamples of the clips) |\n|---|---|")
            for k, (v, lo, hi) in result.items():
                print(f"| {k} | {v:.4f} [{lo:.4f}, {hi:.4f}] |")
            print(
                f"published-comparable: mAP {self.best['mAP']:.4f}, the best evaluation (step {self.best.get('step')}; "
                "WORKDIR/best.json, its model WORKDIR/best/): EVAR reports the best epoch's mAP on the evaluation set "
                "(eval-audio-repr finetune.py:282-292, 310)",
                flush=True,
            )
        final = {k: v[0] for k, v in result.items()} | {f"{k}_ci95": (v[2] - v[1]) / 2 for k, v in result.items()}
        return final | {"best_mAP": self.best["mAP"], "best_step": self.best.get("step")}
