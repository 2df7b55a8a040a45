"""The trainer: one loop, read top to bottom.

set up mesh -> model & optimizer -> sharded state (fresh or restored) -> input -> jitted step -> loop
(metrics fetched one step late so the host never stalls the device) -> checkpoints -> closing probe
"""

from __future__ import annotations

import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from matpac_jax import parallel
from matpac_jax.audio.frontend import LogMelConfig, num_samples_for_frames
from matpac_jax.checkpoint import Checkpointer
from matpac_jax.models.matpac import MatpacModel
from matpac_jax.train.optim import lr_schedule, make_optimizer
from matpac_jax.train.state import create_train_state
from matpac_jax.train.step import make_train_step


def frontend_config(config) -> LogMelConfig:
    a = config.audio
    return LogMelConfig(
        a.sample_rate,
        a.n_fft,
        a.win_length,
        a.hop_length,
        a.n_mels,
        a.f_min,
        a.f_max,
        a.log_offset,
        a.norm_mean,
        a.norm_std,
    )


def build(config, mesh):
    """Model, optimizer, jitted sharded init and step for a config on a mesh."""
    model = MatpacModel.from_config(config)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0))[0])
    tx = make_optimizer(config.optim, config.total_steps, params_shape)
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0)))
    state_sharding = parallel.state_shardings(abstract, mesh)
    init_fn = jax.jit(lambda rng: create_train_state(model, tx, rng), out_shardings=state_sharding)
    step_fn = make_train_step(model, config, tx, frontend_config(config), lr_schedule(config.optim, config.total_steps))
    batch_sh = parallel.batch_sharding(mesh)
    repl = parallel.replicated(mesh)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sharding, {"audio": batch_sh}, repl),
        out_shardings=(state_sharding, repl),
        donate_argnums=0,
    )
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    return model, init_fn, train_step, abstract


def make_input(config):
    """(source, demo splits). The demo source is a step-indexed in-memory batcher; 'records' a grain dataset."""
    crop = num_samples_for_frames(config.audio.crop_frames, frontend_config(config))
    if config.data.source == "demo":
        from matpac_jax.data.demo import demo_splits
        from matpac_jax.data.in_memory import CropBatcher

        d = config.data.demo
        train, test = demo_splits(d.num_train, d.num_test, d.seconds, d.seed)
        return CropBatcher(train["waves"], crop, config.data.batch_size, config.seed), (train, test)
    if config.data.source == "records":
        from matpac_jax.data.pipeline import pretrain_dataset

        dataset = pretrain_dataset(
            config.data.train,
            global_batch=config.data.batch_size,
            crop_samples=crop,
            seed=config.seed,
            short_clips=config.data.short_clips,
            workers=config.data.workers,
        )
        return dataset, None
    raise ValueError(f"config.data.source must be 'demo' or 'records', got {config.data.source!r}")


def batch_iterator(source, first_step: int):
    """Host batches from `first_step` on.

    The demo batcher is indexed by step, so a resumed run sees exactly the batches of an uninterrupted one; a grain
    iterator is moved to its saved position when the checkpoint is restored.
    """
    if callable(source):
        return (source(step) for step in itertools.count(first_step))
    return iter(source)


def format_line(step: int, total: int, m: dict, rate: float, eta: float) -> str:
    return (
        f"step {step:>7d}/{total}  loss {m['loss']:.4f} (pred {m['loss_pred']:.4f} cls {m['loss_cls']:.4f})"
        f"  lr {m['lr']:.2e}  {rate:,.1f} samples/s  eta {eta / 60:.1f} min"
    )


def train_and_evaluate(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    # --- Mesh.
    mesh = parallel.make_mesh(config.mesh.to_dict())
    dp = parallel.data_parallel_size(mesh)
    if config.data.batch_size % dp:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} is not divisible by the data-parallel "
            f"size {dp} of mesh {dict(mesh.shape)}"
        )

    # --- Input (first: a data error should surface before any compilation).
    source, splits = make_input(config)
    ckpt = Checkpointer(workdir)
    batches = batch_iterator(source, ckpt.latest_step() or 0)

    # --- Model, optimizer, state.
    model, init_fn, train_step, abstract = build(config, mesh)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(abstract, data_iter=batches)
        print(f"resumed from {ckpt.directory} at step {int(state.step)}", flush=True)
    else:
        state = init_fn(jax.random.key(config.seed))

    # --- Loop.
    base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    pending, history = None, []
    t0, first = time.time(), int(state.step)
    with open(metrics_path, "a") as log:
        for step in range(first, config.total_steps):
            batch = parallel.global_batch(next(batches), mesh)
            state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step))
            if pending is not None:  # the previous step's metrics: ready by now, no stall on the current step
                history.append(emit(log, *pending, config, first, t0))
            pending = (step + 1, metrics)
            if (step + 1) % config.checkpoint_every == 0:
                ckpt.save(step + 1, state, config, data_iter=batches)
        if pending is not None:
            history.append(emit(log, *pending, config, first, t0, force=True))
    if ckpt.latest_step() != int(state.step):
        ckpt.save(int(state.step), state, config, data_iter=batches, force=True)
    ckpt.close()
    if hasattr(batches, "close"):
        batches.close()  # stops grain worker processes

    result = {"final_metrics": history[-1] if history else {}}
    if config.probe.enabled:
        result["probe"] = closing_probe(config, model, state.student, splits)
    return result


def emit(log, step: int, metrics, config, first: int, t0: float, force: bool = False) -> dict:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    m["step"] = step
    elapsed = time.time() - t0
    m["samples_per_s"] = (step - first) * config.data.batch_size / max(elapsed, 1e-9)
    log.write(json.dumps(m) + "\n")
    if not np.isfinite(m["loss"]):
        raise FloatingPointError(f"step {step}: loss is {m['loss']} (non-finite); stopping")
    if force or step % config.log_every == 0 or step == first + 1:
        eta = (config.total_steps - step) * elapsed / max(step - first, 1)
        print(format_line(step, config.total_steps, m, m["samples_per_s"], eta), flush=True)
    return m


def closing_probe(config, model, student, splits) -> dict:
    """Linear probe of the learned and the initial encoder on the demo's held-out labelled split.

    The initial encoder is re-created from the seed (initialisation is deterministic), so a resumed run compares
    against the same starting point.
    """
    from matpac_jax.embeddings import clip_embeddings
    from matpac_jax.evaluate.probe import linear_probe

    train, test = splits
    fe = frontend_config(config)
    student = jax.device_get(student)
    initial_student = jax.device_get(model.init(jax.random.key(config.seed))[0])
    out = {}
    for name, params in (("learned", student), ("init", initial_student)):
        params = jax.tree.map(jnp.asarray, params)
        xtr = clip_embeddings(model, params, train["waves"], fe)
        xte = clip_embeddings(model, params, test["waves"], fe)
        res = linear_probe(
            xtr,
            train["labels"],
            xte,
            test["labels"],
            num_classes=len(train["class_names"]),
            seed=config.seed,
            max_steps=config.probe.steps,
        )
        out[name] = res["test_accuracy"]
    return out
